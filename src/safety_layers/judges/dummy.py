"""A test double: refused iff the completion starts with a marker."""

from __future__ import annotations

from typing import Any

from ..core.errors import SafetyLayersError
from .base import Judge, Verdict, register_judge


@register_judge("dummy")
class DummyJudge(Judge):
    """Test double: refused iff the completion starts with ``marker`` (exact, case-sensitive)."""

    def __init__(self, marker: str = "REFUSE"):
        if not marker:
            raise SafetyLayersError("dummy judge needs a non-empty marker")
        self.marker = marker

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "marker": self.marker}

    def _judge(self, prompts: list[str], completions: list[str]) -> list[Verdict]:
        return [Verdict(refused=c.startswith(self.marker), reason="marker" if c.startswith(self.marker) else None)
                for c in completions]

