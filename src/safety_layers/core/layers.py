"""Layer ranges: 0-based, inclusive on both ends, parsed once.

``"6-12"`` means decoder blocks 6, 7, ..., 12. Every module takes a :class:`LayerRange`
and asks it for an explicit index list (the same form as PEFT's ``layers_to_transform``),
so no code anywhere compares layer numbers with ``<`` or ``range(begin, end)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SafetyLayersError


@dataclass(frozen=True)
class LayerRange:
    """Decoder blocks ``start`` through ``end``, both included, 0-based."""

    start: int
    end: int

    def __post_init__(self):
        if self.start < 0 or self.end < self.start:
            raise SafetyLayersError(
                f"invalid layer range {self.start}-{self.end}: write it as START-END with "
                "0 <= START <= END (0-based, inclusive)"
            )

    @classmethod
    def parse(cls, text: "str | LayerRange | tuple[int, int] | list[int]") -> "LayerRange":
        """Accept ``"6-12"``, ``"6..12"``, ``"[6,12]"``, ``"7"``, ``(6, 12)`` or a LayerRange."""
        if isinstance(text, LayerRange):
            return text
        if isinstance(text, (tuple, list)):
            if len(text) != 2:
                raise SafetyLayersError(f"a layer range needs two bounds, got {list(text)}")
            return cls(int(text[0]), int(text[1]))
        if isinstance(text, int):
            return cls(text, text)
        s = str(text).strip().strip("[]() ")
        for sep in ("..", "-", ",", ":"):
            if sep in s:
                a, _, b = s.partition(sep)
                break
        else:
            a = b = s
        try:
            return cls(int(a), int(b))
        except ValueError:
            raise SafetyLayersError(
                f"cannot read layer range {text!r}: write it as START-END, e.g. 6-12 "
                "(0-based, both ends included)"
            ) from None

    @property
    def indices(self) -> list[int]:
        return list(range(self.start, self.end + 1))

    def __len__(self) -> int:
        return self.end - self.start + 1

    def __contains__(self, layer: int) -> bool:
        return self.start <= layer <= self.end

    def __str__(self) -> str:
        return f"{self.start}-{self.end}"

    def check(self, num_layers: int) -> "LayerRange":
        """Raise a one-line error unless the range lies inside a model of ``num_layers`` blocks."""
        if self.end >= num_layers:
            raise SafetyLayersError(
                f"layer range {self} is outside the model: it has {num_layers} decoder layers, "
                f"numbered 0-{num_layers - 1} (ranges are 0-based and inclusive)"
            )
        return self
