"""Existence analysis (paper §3.2-3.3): does the model tell normal from malicious prompts, and where?

:func:`analyze` reads every decoder block's last-token hidden state for a normal and a
malicious prompt set, computes the statistics of :mod:`.curves` (cosine curves, angle gaps,
probe, initial range with a bootstrap interval) and, given a reference model (the unaligned
base), the per-layer difference between the two models on the same prompts. A gap is evidence
of safety layers only against such a reference, or on sets matched in style: a model that
refuses nothing already separates prompts that differ in form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..core.config import from_mapping, settle
from ..core.errors import SafetyLayersError
from ..core.placement import device_settings
from ..core.runs import read_json, write_json
from .curves import Curves, analyze_states

#: research knobs: YAML and Python only, no command-line flag
KNOB = {"cli": False}


@dataclass
@device_settings(map_flag=True)
class AnalyzeConfig:
    """Settings of one existence analysis (``safety-layers analyze``)."""

    model: str = field(default="demo", metadata={
        "help": "model: alias (demo, smollm2-135m-instruct), local folder, .gguf file or Hugging Face id"})
    normal: str = field(default="normal", metadata={
        "help": "normal prompt set: built-in name (normal), FILE[:COLUMN], advbench:FILE, xstest-safe:FILE, hf:ID"})
    malicious: str = field(default="malicious", metadata={
        "help": "malicious prompt set (built-in: malicious; e.g. advbench:harmful_behaviors.csv)"})
    limit: int | None = field(default=None, metadata={"help": "use only the first LIMIT prompts of each set"})
    template: str | None = field(default=None, metadata={
        "help": "prompt template: chat (the model's own), alpaca (the paper's), alpaca_short, plain "
                "(default: chat; paper mode: alpaca)", "default": "chat", "paper": "alpaca"})
    pairs: int = field(default=500, metadata={
        "help": "random pairs per pair type for the mean±std curves, drawn with the released code's seeds "
                "(paper: 500)", **KNOB})
    bootstrap: int = field(default=200, metadata={
        "help": "prompt resamples for the interval of the initial range (0: off)", **KNOB})
    range_curve: str | None = field(default=None, metadata={
        "help": "gap curve the initial range is read from: centred, raw, or paper (the paper's definition: "
                "mean of per-pair angles over the sampled pairs)",
        "default": "centred", "paper": "paper", **KNOB})
    probe: bool = field(default=True, metadata={"help": "fit a per-layer linear probe N vs M", **KNOB})
    final_norm: bool = field(default=True, metadata={
        "help": "apply the final norm to the last layer's vector, as the paper's code does", **KNOB})
    reference_model: str | None = field(default=None, metadata={
        "help": "second model (e.g. the unaligned base) analysed on the same prompts; the report shows "
                "aligned-minus-reference curves"})
    seed: int = field(default=0, metadata={"help": "random seed of the probe's folds and the bootstrap", **KNOB})
    paper: bool = field(default=False, metadata={
        "help": "paper mode: Alpaca template, initial range from the raw gap in the paper's definition, fp32 (settings you give keep their value)"})
    out: str | None = field(default=None, metadata={"help": "run folder (default runs/analyze-<model>-<time>)"})
    overwrite: bool = field(default=False, metadata={"help": "reuse an existing, non-empty run folder", **KNOB})
    progress: bool = field(default=True, metadata={"help": "show progress bars", **KNOB})
    paper_set: list = field(init=False, default_factory=list, metadata={
        "help": "what paper mode set (the fields left unset), for the record", **KNOB})

    def __post_init__(self):
        self.paper_set = settle(self)
        if self.pairs < 1:
            raise SafetyLayersError(f"--pairs must be at least 1, got {self.pairs}")


@dataclass
class AnalyzeResult:
    """Per-layer statistics of one model (``result.json``); layers 0-based, ranges inclusive."""

    model: str
    num_layers: int
    template: str
    normal: str
    malicious: str
    n_normal: int
    n_malicious: int
    pairs: int
    raw: Curves
    centred: Curves
    probe_accuracy: list[float]
    range_curve: str
    initial_range: list[int] | None
    range_rule: str
    bootstrap: dict = field(default_factory=dict)
    reference: dict | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self, path: str | Path) -> Path:
        """Write ``result.json`` (atomically)."""
        return write_json(path, self)

    @classmethod
    def from_json(cls, path: str | Path) -> "AnalyzeResult":
        """A result written by :meth:`to_json` (an analyze run folder's ``result.json``); one-line errors."""
        data = read_json(path, "analyze result")
        for name in ("raw", "centred"):
            data[name] = from_mapping(Curves, data.get(name), f"{path} ({name} curves)")
        return from_mapping(cls, data, str(path))


def _states(model, cfg: AnalyzeConfig, normal, malicious, tag=""):
    from ..engine.activations import last_token_states

    hn = last_token_states(model, normal.prompts, cfg.template, final_norm=cfg.final_norm,
                           progress=cfg.progress, desc=f"{tag}normal")
    hm = last_token_states(model, malicious.prompts, cfg.template, final_norm=cfg.final_norm,
                           progress=cfg.progress, desc=f"{tag}malicious")
    return hn, hm


def shared_template(lm, ref, template: str) -> str:
    """Give the reference model the aligned model's prompt format; say which format both use.

    A base model usually has no chat template, and ``chat`` would fall back to "User:/Assistant:"
    for it while the aligned model keeps its own, so the difference would compare formats. With
    ``chat`` the aligned model's chat template is set on the reference tokenizer (same family,
    same vocabulary), so both render the same text; any other template is one format already.
    """
    from ..core.prompts import resolve_template

    used = resolve_template(lm.tokenizer, template)
    if used != "chat":
        return used
    ref.tokenizer.chat_template = lm.tokenizer.chat_template
    return "chat (the aligned model's chat template, on both models)"


def _reference(lm, cfg: AnalyzeConfig, normal, malicious, stats: dict) -> dict:
    """The reference model's curves on the same prompts, rendered in the aligned model's format, and
    the model's minus the reference's."""
    from ..core.models import load_or_use

    ref = load_or_use(cfg.reference_model, cfg)
    if len(ref.blocks) != len(lm.blocks):
        raise SafetyLayersError(
            f"reference model has {len(ref.blocks)} layers, the model {len(lm.blocks)}: compare models of one family")
    template = shared_template(lm, ref, cfg.template)
    rn, rm = _states(ref, cfg, normal, malicious, tag="reference ")
    rstats = analyze_states(rn, rm, pairs=cfg.pairs, range_curve=cfg.range_curve, bootstrap=0,
                            seed=cfg.seed, probe=cfg.probe)
    return {
        "model": cfg.reference_model, "template": template,
        "raw_gap": rstats["raw"].gap_exact, "centred_gap": rstats["centred"].gap_exact,
        "probe_accuracy": rstats["probe_accuracy"], "initial_range": rstats["initial_range"],
        "raw_gap_difference": [a - b for a, b in zip(stats["raw"].gap_exact, rstats["raw"].gap_exact)],
        "centred_gap_difference": [a - b for a, b in zip(stats["centred"].gap_exact, rstats["centred"].gap_exact)],
        "probe_difference": [a - b for a, b in zip(stats["probe_accuracy"], rstats["probe_accuracy"])],
    }


def _write(run_dir: Path, cfg: AnalyzeConfig, result: AnalyzeResult, lm, normal, malicious, hn, hm) -> None:
    """``config.json``, ``env.json``, the hidden states, the two figures and ``result.json``."""
    from safetensors.torch import save_file

    from ..core.runs import environment
    from .plots import plot_analysis, plot_probe

    run_dir = Path(run_dir)
    write_json(run_dir / "config.json", cfg)
    write_json(run_dir / "env.json", {**environment(lm), "model_fingerprint": lm.fingerprint(),
                                      "normal_source": normal.source, "malicious_source": malicious.source})
    save_file({"normal": hn.contiguous(), "malicious": hm.contiguous()}, str(run_dir / "hidden_states.safetensors"))
    plot_analysis(result, run_dir / "analysis.png")
    plot_probe(result, run_dir / "probe.png")
    result.to_json(run_dir / "result.json")


def analyze(cfg: AnalyzeConfig | None = None, *, model=None, run_dir=None) -> AnalyzeResult:
    """Run the existence analysis and, if ``run_dir`` is given, write the run folder.

    ``model`` may be a loaded model (notebooks reuse one across steps); otherwise
    ``cfg.model`` is loaded.
    """
    from ..core.data import load_prompts
    from ..core.models import load_or_use

    cfg = cfg or AnalyzeConfig()
    normal = load_prompts(cfg.normal, cfg.limit).require(2, "normal prompts")
    malicious = load_prompts(cfg.malicious, cfg.limit).require(2, "malicious prompts")
    lm = load_or_use(model if model is not None else cfg.model, cfg)
    hn, hm = _states(lm, cfg, normal, malicious)
    stats = analyze_states(hn, hm, pairs=cfg.pairs, range_curve=cfg.range_curve, bootstrap=cfg.bootstrap,
                           seed=cfg.seed, probe=cfg.probe)
    reference = _reference(lm, cfg, normal, malicious, stats) if cfg.reference_model else None
    notes = []
    if stats["initial_range"] is None:
        notes.append("no gap rises out of the early layers: this model shows no initial safety-layer range "
                     "on these prompts (is it aligned? compare with --reference-model)")
    result = AnalyzeResult(
        model=lm.name, num_layers=len(lm.blocks), template=cfg.template, normal=normal.name,
        malicious=malicious.name, n_normal=len(normal), n_malicious=len(malicious), pairs=cfg.pairs,
        raw=stats["raw"], centred=stats["centred"], probe_accuracy=stats["probe_accuracy"],
        range_curve=cfg.range_curve, initial_range=stats["initial_range"], range_rule=stats["range_rule"],
        bootstrap=stats["bootstrap"], reference=reference, notes=notes)
    if run_dir is not None:
        _write(run_dir, cfg, result, lm, normal, malicious, hn, hm)
    return result
