"""Layer transplant: the donor's layers (or parts of them) in the base model, saved and evaluated.

The paper copies Llama-3-8B-Instruct's layers 16-31 into Llama-3-8B and scores coherence
(A.5.3). Run in both directions on an aligned model and its base, the transplant is a causal
test of a band: put the aligned band into the base (does refusal follow it?) and the base's
band into the aligned model (does refusal leave with it?), against bands of the same width
elsewhere.

:func:`transplant` loads both models, checks that they share architecture and shapes,
evaluates the base and the donor (their completions are cached, so repeated transplants pay
once), copies the parts, saves ``<run>/model`` (safetensors, with ``manifest.json``: what was
copied from where) and evaluates it with :func:`safety_layers.evaluate.evaluate`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.config import from_mapping
from ..core.config import settle
from ..core.errors import SafetyLayersError
from ..core.layers import LayerRange
from ..core.models import Blocks, LoadedModel
from ..core.runs import read_json, write_json

#: What a transplant can copy from each layer: the attention sub-module, the MLP sub-module, the norms.
PARTS = ("attn", "mlp", "norms")
KNOB = {"cli": False}


@dataclass
class TransplantConfig:
    """Settings of one transplant (``safety-layers transplant``)."""

    base: str = field(default="smollm2-135m-instruct", metadata={
        "help": "model that receives the layers: alias, local folder, .gguf file or hub id"})
    donor: str = field(default="demo", metadata={"help": "model the layers are copied from (same architecture)"})
    layers: str | None = field(default=None, metadata={
        "help": "layers to copy, 0-based inclusive, e.g. 10-14"})
    parts: str = field(default="attn,mlp,norms", metadata={
        "help": "parts of each layer to copy: comma-separated attn, mlp, norms (all three: the whole layer)"})
    evaluate: dict | None = field(default_factory=dict, metadata={
        "help": "EvaluateConfig settings for the transplanted model (and base and donor); null: no evaluation",
        **KNOB})
    compare: bool = field(default=True, metadata={
        "help": "evaluate the base and the donor too (their completions are cached)", **KNOB})
    out: str | None = field(default=None, metadata={
        "help": "run folder; the model goes to OUT/model (default runs/transplant-<base>-<layers>-<time>)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing run folder", **KNOB})
    progress: bool = field(default=True, metadata={"help": "show progress bars", **KNOB})

    def __post_init__(self):
        settle(self)                      # the fields' types, checked from their annotations
        if not self.layers:
            raise SafetyLayersError("no layers given: pass --layers START-END (0-based, inclusive), e.g. 10-14")
        self.layers = str(LayerRange.parse(self.layers))
        self.parts = ",".join(parse_parts(self.parts))

    def evaluate_config(self):
        from ..evaluate import EvaluateConfig

        values = {k: v for k, v in (self.evaluate or {}).items() if k not in ("model", "out", "overwrite")}
        return from_mapping(EvaluateConfig, {"progress": self.progress, **values}, "transplant evaluate")


def parse_parts(text) -> list[str]:
    parts = [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise SafetyLayersError(f"unknown part(s) {', '.join(bad) or '(none)'}: choose from {', '.join(PARTS)}")
    return [p for p in PARTS if p in parts]


def part_parameters(blocks: Blocks, layer: int, part: str) -> dict[str, torch.nn.Parameter]:
    """Parameters of one part of one layer, by name in the model: the whole attention or MLP
    sub-module (weights, biases, q/k norms), or the layer's own norms."""
    block = blocks.layers[layer]
    if part == "norms":
        subs = [n for n in blocks.spec.norms if hasattr(block, n)]
    else:
        subs = list(dict.fromkeys(path.split(".")[0] for name, path in blocks.spec.components.items()
                                  if name.startswith(part + ".")))
    out = {}
    for sub in subs:
        for name, p in block.get_submodule(sub).named_parameters(prefix=blocks.param_name(layer, sub)):
            out[name] = p
    return out


def check_compatible(base: LoadedModel, donor: LoadedModel, layers: LayerRange) -> None:
    """One line naming the first mismatch: architecture, layer count, or a tensor's shape."""
    bt = getattr(base.model.config, "model_type", None)
    dt = getattr(donor.model.config, "model_type", None)
    if bt != dt:
        raise SafetyLayersError(f"base is a {bt} model, donor a {dt} model: a transplant needs two models of one "
                                "architecture (e.g. an aligned model and its base)")
    for who, lm in (("base", base), ("donor", donor)):
        try:
            layers.check(lm.num_layers)
        except SafetyLayersError as e:
            raise SafetyLayersError(f"{who}: {e}") from None
    b_emb, d_emb = base.model.get_input_embeddings().weight, donor.model.get_input_embeddings().weight
    if b_emb.shape != d_emb.shape:
        raise SafetyLayersError(f"shape mismatch: base embeddings {tuple(b_emb.shape)}, donor {tuple(d_emb.shape)}: "
                                "the models differ in vocabulary or width; use two models of one family")


def copy_layers(base: LoadedModel, donor: LoadedModel, layers: LayerRange, parts) -> dict:
    """Copy ``parts`` of ``layers`` from donor into base in place (shapes checked before any copy);
    return what was copied and how far each part was from the donor's."""
    check_compatible(base, donor, layers)
    plan, per_layer = [], []
    for i in layers.indices:
        row = {"layer": i}
        for part in parts:
            theirs = part_parameters(donor.blocks, i, part)
            ours = part_parameters(base.blocks, i, part)
            if set(theirs) != set(ours):
                missing = sorted(set(theirs) ^ set(ours))[0]
                raise SafetyLayersError(f"layer {i} {part}: {missing} exists in only one model; use two models of "
                                        "one architecture")
            diff = sq = 0.0
            for name, p in ours.items():
                q = theirs[name]
                if p.shape != q.shape:
                    raise SafetyLayersError(f"shape mismatch at {name}: base {tuple(p.shape)}, donor "
                                            f"{tuple(q.shape)}; use two models of one family and size")
                diff += float((p.detach().double() - q.detach().double()).pow(2).sum())
                sq += float(p.detach().double().pow(2).sum())
                plan.append((p, q, name))
            row[part] = (diff / sq) ** 0.5 if sq else None
        per_layer.append(row)
    with torch.no_grad():
        for p, q, _ in plan:
            p.copy_(q.to(device=p.device, dtype=p.dtype))
    return {"tensors": [n for _, _, n in plan], "params": sum(p.numel() for p, _, _ in plan),
            "relative_difference": per_layer}


@dataclass
class TransplantResult:
    """What one transplant copied and how each model did (``result.json``)."""

    base: str
    donor: str
    layers: list[int]
    parts: list[str]
    model_dir: str
    copied_tensors: int
    copied_params: int
    total_params: int
    relative_difference: list[dict]
    evaluation: dict = field(default_factory=dict)    # {"transplant"|"base"|"donor": metrics and counts}
    seconds: dict = field(default_factory=dict)

    def to_json(self, path) -> Path:
        return write_json(path, self)

    @classmethod
    def from_json(cls, path) -> "TransplantResult":
        return from_mapping(cls, read_json(path, "transplant result"), str(path))


def _save(lm: LoadedModel, folder: Path, manifest: dict, overwrite: bool) -> None:
    """The model as safetensors with its manifest, appearing whole or not at all."""
    from ..core.runs import atomic_dir

    with atomic_dir(folder, overwrite) as tmp:
        lm.model.save_pretrained(tmp, safe_serialization=True)
        lm.tokenizer.save_pretrained(tmp)
        write_json(tmp / "manifest.json", manifest)


def _scores(res) -> dict:
    """Rates, counts and the LLM judge's score of an EvaluateResult, as the table needs them."""
    out = {}
    for key, r in (("harmful", res.harmful), ("over_refusal", res.over_refusal)):
        if r is not None:
            out[key] = {"rate": r.rate, "count": r.count, "decided": r.decided, "n": r.n, "ci": r.ci,
                        "judge": r.judge, "llm_score": r.harmful_score}
    if res.quality is not None:
        out["rouge_l"] = res.quality.rouge_l
    return out


def _evaluate(ecfg, lm: LoadedModel, folder: Path) -> dict:
    from ..evaluate import evaluate

    return _scores(evaluate(ecfg, model=lm, run_dir=folder))


def _manifest(cfg: TransplantConfig, base, donor, layers, parts, copied: dict, fp: dict) -> dict:
    from ..core.runs import environment

    return {"format": "hf-model", "kind": "transplant", "layers": [layers.start, layers.end], "parts": parts,
            "base": {"name": cfg.base, "source": base.source, "fingerprint": fp["base"]},
            "donor": {"name": cfg.donor, "source": donor.source, "fingerprint": fp["donor"]},
            "num_layers": base.num_layers, "copied": {"tensors": len(copied["tensors"]), "params": copied["params"],
                                                      "names": copied["tensors"]},
            "relative_difference": copied["relative_difference"], "env": environment()}


def transplant(cfg: TransplantConfig, *, base=None, donor=None, run_dir=None) -> TransplantResult:
    """Copy ``cfg.parts`` of ``cfg.layers`` from the donor into the base, save and evaluate it.

    ``base`` / ``donor`` may be loaded models (the base is changed in place); otherwise
    ``cfg.base`` / ``cfg.donor`` are loaded. ``run_dir`` (default ``cfg.out``) receives
    ``model/`` (with ``manifest.json``), ``eval/<transplant|base|donor>/`` and ``result.json``.
    """
    from ..core.models import load_or_use
    from ..core.runs import default_run_dir

    t0, seconds = time.perf_counter(), {}
    layers, parts = LayerRange.parse(cfg.layers), parse_parts(cfg.parts)
    run = Path(run_dir or cfg.out or default_run_dir("transplant", cfg.base, str(layers)))
    ecfg = cfg.evaluate_config() if cfg.evaluate is not None else None
    b = load_or_use(base if base is not None else cfg.base)
    d = load_or_use(donor if donor is not None else cfg.donor)
    check_compatible(b, d, layers)
    fp = {"base": b.fingerprint(), "donor": d.fingerprint()}
    evaluation = {}
    if ecfg is not None and cfg.compare:
        t = time.perf_counter()
        evaluation = {"base": _evaluate(ecfg, b, run / "eval" / "base"),
                      "donor": _evaluate(ecfg, d, run / "eval" / "donor")}
        seconds["evaluate_base_donor"] = round(time.perf_counter() - t, 3)
    copied = copy_layers(b, d, layers, parts)
    _save(b, run / "model", _manifest(cfg, b, d, layers, parts, copied, fp), overwrite=cfg.overwrite)
    if ecfg is not None:
        t = time.perf_counter()
        evaluation["transplant"] = _evaluate(ecfg, b, run / "eval" / "transplant")
        seconds["evaluate"] = round(time.perf_counter() - t, 3)
    seconds["total"] = round(time.perf_counter() - t0, 3)
    result = TransplantResult(base=cfg.base, donor=cfg.donor, layers=[layers.start, layers.end], parts=parts,
                              model_dir=str(run / "model"), copied_tensors=len(copied["tensors"]),
                              copied_params=copied["params"], total_params=sum(p.numel() for p in b.model.parameters()),
                              relative_difference=copied["relative_difference"], evaluation=evaluation,
                              seconds=seconds)
    result.to_json(run / "result.json")
    return result
