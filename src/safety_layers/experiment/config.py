"""Settings of one SPPFT experiment (``safety-layers experiment run.yaml``).

An :class:`ExperimentConfig` holds the grid (scenarios x methods x learning rates x seeds),
how every cell fine-tunes (the top-level training keys, the same names as
:class:`~safety_layers.finetune.FinetuneConfig`'s), and one typed config per step, built from
the YAML sections: ``evaluate:`` an :class:`~safety_layers.evaluate.EvaluateConfig`,
``analysis:`` an :class:`~safety_layers.analysis.AnalyzeConfig`, ``locate:`` a
:class:`~safety_layers.locate.LocateConfig` and ``drift:`` a :class:`DriftConfig`. The
experiment's ``model`` is every section's model, and its ``template`` and ``paper`` flow
into every section that does not set them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from ..analysis import AnalyzeConfig
from ..core.config import from_mapping, init_fields, load_yaml, settle
from ..core.errors import SafetyLayersError
from ..core.layers import LayerRange
from ..core.placement import device_settings
from ..core.runs import to_jsonable
from ..evaluate import EvaluateConfig
from ..finetune.config import BASELINE_FIELDS, PAPER_LRS, PAPER_TRAINING
from ..locate import LocateConfig
from .grid import BASE_METHODS, SCENARIO_KINDS, method_label, parse_scenario, scenario_label

#: Settings a rerun may change: they add or drop cells, or only change what is written.
GRID_FIELDS = ("name", "scenarios", "methods", "lrs", "lr_overrides", "seeds", "keep_models", "drift")
#: Step settings the experiment decides, so its sections may not set them.
SECTION_FIXED = ("model", "out", "overwrite", "progress", "device", "dtype", "device_map")
#: The training settings a cell's FinetuneConfig takes from the experiment under the same name.
FINETUNE_KEYS = ("template", "train_on_inputs", "paper", "freeze_norms", "max_length", "lora_r", "lora_alpha", "dtype",
                "device")
_DERIVED = ("paper_set",)
_YAML = {"cli": False}   # a setting for YAML files and Python, not a command-line flag
_SECTIONS = {"evaluate": EvaluateConfig, "analysis": AnalyzeConfig, "locate": LocateConfig}


def check_section_keys(section: str, values, allowed) -> None:
    """``unknown key(s) in SECTION: a, b; allowed: ...`` for every key of ``values`` not in ``allowed``."""
    if not isinstance(values, dict):
        raise SafetyLayersError(f"{section} must be a mapping of settings, got {type(values).__name__}")
    unknown = sorted(set(values) - set(allowed), key=str)
    if unknown:
        raise SafetyLayersError(f"unknown key(s) in {section}: {', '.join(map(str, unknown))}; "
                                f"allowed: {', '.join(sorted(allowed))}")


@dataclass
class DriftConfig:
    """What the drift diagnostics compute (the ``drift:`` section of an experiment config)."""

    enabled: bool = field(default=True, metadata={"help": "compute drift diagnostics for every tuned cell"})
    weights: bool = field(default=True, metadata={"help": "per-layer relative weight change"})
    gap: bool = field(default=True, metadata={"help": "re-run the existence analysis on the tuned model"})
    band_holds: bool = field(default=True, metadata={
        "help": "over-rejection refusals with the band scaled by alpha, tuned vs untuned"})
    alpha: float | None = field(default=None, metadata={
        "help": "scale for band_holds (> 1); None: the locate result's alpha when it scaled up, else 1.2"})
    over_rejection: str = field(default="over-rejection", metadata={"help": "prompt set for band_holds"})
    limit: int | None = field(default=None, metadata={"help": "use only the first LIMIT over-rejection prompts"})
    judge: str = field(default="keyword", metadata={
        "help": "keyword (generate + keyword judge) or proxy (first-token proxy, calibrated on the untuned model)"})
    max_new_tokens: int = field(default=16, metadata={"help": "tokens generated per prompt (paper's code: 16)"})
    components: str = field(default="paper", metadata={"help": "what scaling multiplies: paper, no-o-proj, attn, mlp"})

    def __post_init__(self):
        if self.judge not in ("keyword", "proxy"):
            raise SafetyLayersError(f"drift judge must be keyword or proxy, got {self.judge!r}")
        if self.alpha is not None and not self.alpha > 1:
            raise SafetyLayersError(f"drift alpha must be > 1 (the band is amplified), got {self.alpha}")
        if self.max_new_tokens < 1:
            raise SafetyLayersError(f"drift max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.limit is not None and self.limit < 1:
            raise SafetyLayersError(f"drift limit must be >= 1, got {self.limit}")

    @classmethod
    def from_value(cls, value) -> "DriftConfig":
        """``True``/``False``/None, a mapping of fields, or a DriftConfig."""
        if isinstance(value, DriftConfig):
            return value
        if value is None or value is True:
            return cls()
        if value is False:
            return cls(enabled=False)
        if not isinstance(value, dict):
            raise SafetyLayersError(f"drift must be true, false or a mapping of drift settings, got {value!r}")
        check_section_keys("drift", value, init_fields(cls))
        return cls(**value)


@dataclass
@device_settings
class ExperimentConfig:
    """One SPPFT experiment (``safety-layers experiment run.yaml``).

    The settings come from the YAML file (or Python); on the command line only ``name``,
    which picks one experiment of a file that holds several.
    """

    model: str = field(default="demo", metadata={"help": "model alias, folder or hub id", **_YAML})
    name: str | None = field(default=None, metadata={
        "help": "label; picks one document of a YAML file that holds several"})
    band: str | None = field(default=None, metadata={
        "help": "the safety band, 0-based inclusive (e.g. 6-12); None: locate it or read analyze's initial range",
        **_YAML})
    locate: LocateConfig | dict | None = field(default=None, metadata={
        "help": "LocateConfig settings ({} = defaults): find the band with safety_layers.locate", **_YAML})
    analysis: AnalyzeConfig | dict | None = field(default=None, metadata={
        "help": "AnalyzeConfig settings: run the existence analysis (its initial range is the band of last resort)",
        **_YAML})
    data: str | None = field(default=None, metadata={
        "help": "benign instruction file (JSON/JSONL/CSV of instruction, input, output) the scenarios are built from",
        **_YAML})
    n: int | dict | None = field(default=None, metadata={
        "help": "rows per scenario (backdoor: per half; harmful: normal rows); an int or {scenario: n}; None: all",
        **_YAML})
    data_seed: int = field(default=0, metadata={
        "help": "seed of the scenario row sampling (same data for every seed)", **_YAML})
    harmful_data: str | None = field(default=None, metadata={
        "help": "harmful pairs for the harmful scenario, e.g. AdvBench harmful_behaviors.csv", **_YAML})
    scenario_options: dict = field(default_factory=dict, metadata={
        "help": "ScenarioConfig options: prefix, trigger, trigger_position", **_YAML})
    scenarios: list = field(default_factory=lambda: ["normal", "implicit"], metadata={
        "help": "normal, implicit, backdoor, harmful-p<p> (harmful = harmful-p0.1)", **_YAML})
    methods: list = field(default_factory=lambda: ["full", "sppft"], metadata={
        "help": f"{', '.join(BASE_METHODS)}, freeze:A-B", **_YAML})
    lrs: list | None = field(default=None, metadata={
        "help": "learning rates (default: [1e-4]; paper mode: the paper's Table 6 rate of the model)", **_YAML})
    lr_overrides: dict = field(default_factory=dict, metadata={
        "help": "learning rates per scenario kind or label, e.g. {harmful: [1e-5]} (paper Tab.6)", **_YAML})
    seeds: list = field(default_factory=lambda: [0], metadata={"help": "training seeds", **_YAML})
    epochs: float = field(default=3.0, metadata={"help": "training epochs (paper: 3)", **_YAML})
    batch_size: int = field(default=4, metadata={"help": "per-device batch size (paper: 4)", **_YAML})
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation steps (paper's code: 32)", **_YAML})
    warmup_steps: int | None = field(default=None, metadata={
        "help": "linear warmup steps (default: 0; paper mode: 100)", "default": 0,
        "paper": PAPER_TRAINING["warmup_steps"], **_YAML})
    max_steps: int | None = field(default=None, metadata={"help": "stop after this many optimizer steps", **_YAML})
    max_length: int = field(default=256, metadata={"help": "tokens per training example (paper: 256)", **_YAML})
    template: str | None = field(default=None, metadata={
        "help": "prompt template for training, evaluation and analysis (default: chat; paper mode: alpaca)",
        "default": "chat", "paper": "alpaca", **_YAML})
    train_on_inputs: bool | None = field(default=None, metadata={
        "help": "loss on prompt tokens too (the paper's code; default off, on in paper mode)",
        "default": False, "paper": True, **_YAML})
    paper: bool = field(default=False, metadata={
        "help": "paper mode: Alpaca template, loss on inputs, warmup 100, Table 6 learning rates, paper evaluation "
                "(for settings left unset)", **_YAML})
    freeze_norms: bool = field(default=False, metadata={"help": "also freeze the band's norms", **_YAML})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank", **_YAML})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha", **_YAML})
    win_rate: bool = field(default=False, metadata={
        "help": "AlpacaEval-style win rate of each cell's quality answers over the untuned model's "
                "(needs evaluate.quality, judge_url and judge_model)", **_YAML})
    method_options: dict = field(default_factory=dict, metadata={
        "help": "FinetuneConfig settings of the baselines, e.g. {compliant_model: ..., lisa_rho: 1, nfft_samples: 128}",
        **_YAML})
    training_args: dict = field(default_factory=dict, metadata={
        "help": "any other transformers TrainingArguments, e.g. {bf16: true, gradient_checkpointing: true}", **_YAML})
    evaluate: EvaluateConfig | dict = field(default_factory=dict, metadata={
        "help": "EvaluateConfig settings: malicious, over_rejection, quality, limit, max_new_tokens, judges, judge_model...",
        **_YAML})
    drift: DriftConfig | dict | bool = field(default_factory=dict, metadata={
        "help": "DriftConfig settings, or false to skip drift", **_YAML})
    keep_models: bool = field(default=False, metadata={
        "help": "keep each tuned model (disk!) instead of deleting it", **_YAML})
    paper_set: list = field(init=False, default_factory=list, metadata={
        "help": "what paper mode set (filled in, not a setting)", "cli": False})

    def __post_init__(self):
        self.paper_set = settle(self)
        self._paper_lrs()
        self._check_grid()
        self._check_training()
        check_section_keys("scenario_options", self.scenario_options, ("prefix", "trigger", "trigger_position"))
        check_section_keys("method_options", self.method_options, BASELINE_FIELDS)
        if any(parse_scenario(s)[0] == "harmful" for s in self.scenarios) and not self.harmful_data:
            raise SafetyLayersError("the harmful scenario needs harmful_data: a file of harmful pairs "
                                    "(e.g. AdvBench harmful_behaviors.csv)")
        if self.band is not None:
            self.band = str(LayerRange.parse(self.band))
            if self.locate is not None:
                raise SafetyLayersError("give either band: START-END or a locate section, not both")
        self.evaluate = self._section("evaluate", self.evaluate)
        self.analysis = self._section("analysis", self.analysis) if self.analysis is not None else None
        self.locate = self._section("locate", self.locate) if self.locate is not None else None
        self.drift = DriftConfig.from_value(self.drift)

    def _check_grid(self) -> None:
        for name in ("scenarios", "methods", "lrs", "seeds"):
            v = getattr(self, name)
            if isinstance(v, (str, int, float)):
                setattr(self, name, [v])
            if not getattr(self, name):
                raise SafetyLayersError(f"{name} is empty: give at least one")
        self.scenarios = [scenario_label(s) for s in self.scenarios]
        self.methods = [method_label(m) for m in self.methods]
        for name in ("scenarios", "methods"):
            dup = sorted({x for x in getattr(self, name) if getattr(self, name).count(x) > 1})
            if dup:
                raise SafetyLayersError(f"{name} lists {', '.join(dup)} twice")
        self.lrs = [_lr(x) for x in self.lrs]
        self.seeds = [_int(x, "seed") for x in self.seeds]
        for name in ("lrs", "seeds"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise SafetyLayersError(f"{name} lists a value twice: {values}")
        for key, lrs in self.lr_overrides.items():
            if key not in SCENARIO_KINDS and key not in self.scenarios:
                raise SafetyLayersError(f"lr_overrides key {key!r} is neither a scenario kind "
                                        f"({', '.join(SCENARIO_KINDS)}) nor one of the scenarios {self.scenarios}")
            self.lr_overrides[key] = [_lr(x) for x in (lrs if isinstance(lrs, list) else [lrs])]
        if isinstance(self.n, dict):
            for k, v in self.n.items():
                if k not in SCENARIO_KINDS and k not in self.scenarios:
                    raise SafetyLayersError(f"n key {k!r} is neither a scenario kind nor one of {self.scenarios}")
                _int(v, f"n[{k}]")
        elif self.n is not None:
            _int(self.n, "n")

    def _paper_lrs(self) -> None:
        """Learning rates left unset: the paper's Table 6 rate of its four models in paper mode (and 1e-5
        for the harmful scenario), else 1e-4; another model in paper mode keeps 1e-4, with a note."""
        if self.lrs is not None:
            return
        self.lrs = [1e-4]
        if not self.paper:
            return
        lr = PAPER_LRS.get(self.model)
        if lr is None:
            self.paper_set.append(f"lrs=[0.0001] (no Table 6 rate for {self.model}: the default kept)")
            return
        self.lrs = [lr]
        self.paper_set.append(f"lrs=[{lr}]")
        if "harmful" not in self.lr_overrides:
            self.lr_overrides["harmful"] = [1e-5]
            self.paper_set.append("lr_overrides={harmful: [1e-05]}")

    def _check_training(self) -> None:
        if self.epochs <= 0 or self.batch_size < 1 or self.grad_accum < 1 or self.warmup_steps < 0:
            raise SafetyLayersError("epochs must be > 0, batch_size and grad_accum >= 1, warmup_steps >= 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise SafetyLayersError(f"max_steps must be >= 1, got {self.max_steps}")

    def _section(self, name: str, value):
        """The step config of section ``name`` from a mapping (the experiment's template and paper
        filling what it leaves unset) or from a config object; the model is always the experiment's."""
        cls = _SECTIONS[name]
        fixed = {"model": self.model, "device": self.device, "dtype": self.dtype, "device_map": self.device_map}
        if isinstance(value, cls):
            section = copy.copy(value)
            for key, v in fixed.items():
                setattr(section, key, v)
            return section
        allowed = [k for k in init_fields(cls) if k not in SECTION_FIXED]
        check_section_keys(name, value, allowed)
        flow = {"template": self.template, "paper": self.paper}
        return from_mapping(cls, {**flow, **value}, name, **fixed)

    # ----- what the steps read

    def analysis_config(self) -> AnalyzeConfig:
        """The analysis section, or the defaults (the drift gap curves need one even without it)."""
        return self.analysis if self.analysis is not None else self._section("analysis", {})

    def stage_settings(self) -> dict[str, dict]:
        """The template and paper flag of every stage (analysis, locate, training, evaluation, drift).

        Every section inherits the experiment's ``template`` and ``paper`` unless it sets its
        own (an explicit override); the run records this in experiment.json and results.json
        so a reader sees that every stage rendered its prompts alike, or which did not.
        """
        def of(c) -> dict:
            return {"template": c.template, "paper": c.paper}

        out = {"analysis": of(self.analysis_config())}
        if self.locate is not None:
            out["locate"] = of(self.locate)
        out["training"] = of(self)
        out["evaluation"] = of(self.evaluate)
        out["drift"] = of(self.evaluate)   # drift's refusal counts render with the evaluation's template
        return out

    def finetune_settings(self, shared: Path | None = None) -> dict:
        """The FinetuneConfig fields every cell shares (the cell adds data, method, band and folder);
        NFFT's scores and reverse DPO's pairs are made once in ``shared`` for every cell."""
        stored = {"nfft_scores": "nfft_scores.safetensors", "rdpo_pairs": "rdpo_pairs.jsonl"} if shared else {}
        return {**{k: getattr(self, k) for k in FINETUNE_KEYS}, **{k: str(shared / v) for k, v in stored.items()},
                **self.method_options}

    def lrs_for(self, scenario: str) -> list[float]:
        kind = parse_scenario(scenario)[0]
        return self.lr_overrides.get(scenario) or self.lr_overrides.get(kind) or self.lrs

    def n_for(self, scenario: str) -> int | None:
        if isinstance(self.n, dict):
            return self.n.get(scenario, self.n.get(parse_scenario(scenario)[0]))
        return self.n

    # ----- reading and writing

    def to_dict(self) -> dict:
        """The settings as experiment.json keeps them: every section resolved, without what the
        experiment decides for it (model, output folder, progress)."""
        d = to_jsonable(self)
        for name in _SECTIONS:
            if d[name] is not None:
                d[name] = {k: v for k, v in d[name].items() if k not in SECTION_FIXED + _DERIVED}
        return d

    @classmethod
    def from_dict(cls, data: dict, where: str = "experiment config") -> "ExperimentConfig":
        if not isinstance(data, dict):
            raise SafetyLayersError(f"{where}: expected a mapping of settings, got {type(data).__name__}")
        allowed = init_fields(cls)
        unknown = sorted(set(data) - set(allowed) - set(_DERIVED), key=str)
        if unknown:
            raise SafetyLayersError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; "
                                    f"allowed: {', '.join(allowed)}")
        return from_mapping(cls, data, where)

    @classmethod
    def from_yaml(cls, path: str | Path, name: str | None = None, **overrides) -> "ExperimentConfig":
        """Read a YAML file; a file of several documents (``---``) needs ``name`` to pick one.
        ``overrides`` not None replace the file's settings (the command line's --device, --dtype)."""
        docs = load_yaml(path, documents=True)
        if not docs:
            raise SafetyLayersError(f"{path} is empty: give a mapping of experiment settings")
        if len(docs) > 1 or name is not None:
            names = [d.get("name") for d in docs]
            if name is None:
                raise SafetyLayersError(f"{path} holds {len(docs)} experiments: pick one by name "
                                        f"({', '.join(str(n) for n in names)})")
            if name not in names:
                raise SafetyLayersError(f"{path} has no experiment named {name!r}; names: "
                                        f"{', '.join(str(n) for n in names)}")
            docs = [docs[names.index(name)]]
        return cls.from_dict({**docs[0], **{k: v for k, v in overrides.items() if v is not None}}, where=str(path))


def _lr(x) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise SafetyLayersError(f"learning rate {x!r} is not a number") from None
    if not v > 0:
        raise SafetyLayersError(f"learning rates must be > 0, got {x}")
    return v


def _int(x, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise SafetyLayersError(f"{what} must be a non-negative integer, got {x!r}")
    return x


__all__ = ["DriftConfig", "ExperimentConfig", "FINETUNE_KEYS", "GRID_FIELDS", "check_section_keys"]
