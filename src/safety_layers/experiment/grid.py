"""The cells of an experiment: scenario and method labels, the band each method freezes, cell ids.

Cell ids are ``<scenario>__<method>__lr<lr:g>__seed<seed>``, e.g.
``implicit__sppft__lr0.0001__seed0``. Methods: ``full``, ``sppft``, ``lora``, ``sppft-lora``,
``freeze-before`` / ``freeze-after`` (the ablation of the paper's Table 8 with a band of the
same size right before / after the located one, clipped at the model's edge) and
``freeze:A-B`` (any band, id ``freeze-A-B``; Table 8 freezes e.g. ``freeze:0-5`` and
``freeze:13-31``); the scan's families ``scan:W[/S]`` and ``random:W[xK][@SEED]`` expand into
``freeze-A-B`` windows and ``freeze-set-a.b.c`` layer sets (:mod:`.scan`). Scenarios:
``normal``, ``implicit``, ``backdoor``, ``harmful-p<p>``
(``harmful`` is p=0.1).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from ..core.errors import SafetyLayersError
from ..core.layers import LayerRange
from . import scan

BASE_METHODS = ("full", "sppft", "freeze-before", "freeze-after", "lora", "sppft-lora", "nfft", "lisa", "rdpo",
                "rdpo-sppft")
SCENARIO_KINDS = ("normal", "implicit", "backdoor", "harmful")


def parse_scenario(label: str) -> tuple[str, float | None]:
    """``"harmful-p0.05"`` -> ("harmful", 0.05); ``"implicit"`` -> ("implicit", None)."""
    m = re.fullmatch(r"harmful(?:-p|:|@)(\d*\.?\d+)", label)
    if m:
        return "harmful", float(m.group(1))
    if label in SCENARIO_KINDS:
        return label, (0.1 if label == "harmful" else None)
    raise SafetyLayersError(f"unknown scenario {label!r}: use {', '.join(SCENARIO_KINDS[:3])} or harmful-p<p> "
                            "(e.g. harmful-p0.05)")


def scenario_label(spec) -> str:
    kind, p = parse_scenario(str(spec).strip())
    return f"harmful-p{p:g}" if kind == "harmful" else kind


def method_label(spec) -> str:
    """Canonical method name; ``freeze:A-B`` becomes ``freeze-A-B``."""
    s = str(spec).strip()
    m = re.fullmatch(r"freeze[:-](\d+)-(\d+)", s)
    if m:
        band = LayerRange(int(m.group(1)), int(m.group(2)))
        return f"freeze-{band.start}-{band.end}"
    if s in BASE_METHODS:
        return s
    if (family := scan.family_label(s)) is not None:
        return family
    close = difflib.get_close_matches(s, BASE_METHODS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise SafetyLayersError(f"unknown method {s!r}{hint}: use {', '.join(BASE_METHODS)}, freeze:A-B, scan:W[/S] "
                            "or random:W[xK][@SEED]")


def method_band(method: str, band: LayerRange, num_layers: int) -> tuple[str, LayerRange | list[int] | None, str | None]:
    """(finetune method, band it freezes or skips, note) for an experiment method; a scan's random
    set gives ``("freeze-set", [layers], None)``."""
    k = len(band)
    if method in ("full", "lora", "lisa", "rdpo"):
        return method, None, None
    if method in ("sppft", "sppft-lora", "rdpo-sppft"):
        return method, band, None
    if method == "nfft":
        return method, band, "the band sets how many weights NFFT freezes; they lie across every layer"
    if (layers := scan.set_layers(method)) is not None:
        return "freeze-set", layers, None
    if method == "freeze-before":
        if band.start == 0:
            raise SafetyLayersError(f"freeze-before: the band {band} starts at layer 0, no layer lies before it")
        ab = LayerRange(max(0, band.start - k), band.start - 1)
    elif method == "freeze-after":
        if band.end >= num_layers - 1:
            raise SafetyLayersError(f"freeze-after: the band {band} ends at the last layer ({num_layers - 1})")
        ab = LayerRange(band.end + 1, min(num_layers - 1, band.end + k))
    else:
        m = re.fullmatch(r"freeze-(\d+)-(\d+)", method)
        if not m:
            raise SafetyLayersError(f"unknown method {method!r}")
        return "freeze", LayerRange(int(m.group(1)), int(m.group(2))).check(num_layers), None
    note = None if len(ab) == k else f"clipped at the model's edge: {len(ab)} layers instead of {k}"
    return "freeze", ab, note


def cell_id(scenario: str, method: str, lr: float, seed: int) -> str:
    return f"{scenario}__{method}__lr{lr:g}__seed{seed}"


@dataclass(frozen=True)
class Cell:
    scenario: str
    method: str
    lr: float
    seed: int

    @property
    def id(self) -> str:
        return cell_id(self.scenario, self.method, self.lr, self.seed)


def grid(cfg, num_layers: int | None = None) -> list[Cell]:
    """Every cell of an ExperimentConfig, scenario-major, then learning rate, seed and method
    (comparable cells adjacent). The scan's method families (:mod:`.scan`) expand into one method
    per window or random set; that needs the model's ``num_layers``."""
    methods = cfg.methods
    if num_layers is not None:
        methods = scan.expand(methods, num_layers)
    elif any(scan.is_family(m) for m in methods):
        raise SafetyLayersError("a scan's cells depend on the model's layer count: call grid(cfg, num_layers)")
    return [Cell(s, m, lr, seed) for s in cfg.scenarios for lr in cfg.lrs_for(s) for seed in cfg.seeds
            for m in methods]
