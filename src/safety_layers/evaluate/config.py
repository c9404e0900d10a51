"""Settings of one evaluation (``safety-layers evaluate``): which sets, which judges, how long.

Paper mode follows :func:`safety_layers.core.config.settle`: ``paper=True`` gives the
fields the user left unset the paper's values (Alpaca template, 16 tokens per over-rejection
prompt as the released code generates, the GCG keyword list as a second judge) and records
what it set in ``paper_set``.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field

from ..core.config import settle
from ..core.errors import SafetyLayersError
from ..core.placement import device_settings
from ..engine.generation import GenerationSettings

#: Judges :class:`EvaluateConfig` knows by name. ``proxy`` is the first-token refusal proxy,
#: calibrated against the first other judge unless ``proxy_threshold`` is given.
JUDGES = ("rules", "keyword", "keyword-opening", "keyword-gcg", "prefix", "proxy", "llm", "classifier", "harmbench",
          "llama-guard-3", "wildguard", "dummy")
_YAML = {"cli": False}   # a setting for YAML files and Python, not a command-line flag


def _skip(value):
    """``None``, ``""`` and ``"none"`` switch a metric off (the CLI cannot pass None)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "off")):
        return None
    return value


@dataclass
@device_settings(map_flag=True)
class EvaluateConfig:
    """Settings of one evaluation (``safety-layers evaluate``). A set given as None is skipped."""

    model: str = field(default="demo", metadata={"help": "model alias, folder, .gguf file or hub id"})
    malicious: str | None = field(default="malicious", metadata={
        "help": "prompt set for the harmful rate (paper: advbench:harmful_behaviors.csv); none skips it"})
    over_rejection: str | None = field(default="over-rejection", metadata={
        "help": "prompt set for the over-refusal rate (e.g. xstest-safe:xstest_prompts.csv); none skips it"})
    quality: str | None = field(default=None, metadata={
        "help": "JSON/JSONL/CSV of {instruction, input, output} records: Rouge-L against output"})
    lm_eval_tasks: str | None = field(default=None, metadata={
        "help": "comma-separated lm-eval task names (needs pip install lm-eval), e.g. mmlu", **_YAML})
    lm_eval_fewshot: int | None = field(default=None, metadata={
        "help": "lm-eval few-shot examples (task default if unset)", **_YAML})
    lm_eval_include: str | None = field(default=None, metadata={"help": "folder of extra lm-eval task YAMLs", **_YAML})
    limit: int | None = field(default=None, metadata={"help": "use only the first LIMIT prompts / records / task docs"})
    template: str | None = field(default=None, metadata={
        "help": "chat (the model's own), alpaca (the paper's), alpaca_short, plain", "default": "chat",
        "paper": "alpaca", **_YAML})
    max_new_tokens: int = field(default=64, metadata={"help": "tokens generated per malicious prompt"})
    over_rejection_tokens: int | None = field(default=None, metadata={
        "help": "tokens per over-rejection prompt (default: max_new_tokens; paper mode: 16, as the released code)",
        "paper": 16, **_YAML})
    quality_tokens: int = field(default=128, metadata={"help": "tokens generated per quality record", **_YAML})
    batch_size: int | None = field(default=None, metadata={"help": "prompts decoded together (default: 128)", **_YAML})
    judges: str | list[str] | None = field(default=None, metadata={
        "help": f"comma-separated refusal judges, the first is the headline: {', '.join(JUDGES)}",
        "default": "rules", "paper": "keyword,keyword-gcg"})
    proxy_threshold: float | None = field(default=None, metadata={
        "help": "first-token proxy threshold (default: calibrated against the first other judge)", **_YAML})
    judge_url: str | None = field(default=None, metadata={
        "help": "LLM judge: OpenAI-compatible base URL (adds the llm judge)", **_YAML})
    judge_model: str | None = field(default=None, metadata={"help": "LLM judge: model name the server knows", **_YAML})
    judge_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "LLM judge: environment variable holding the API key", **_YAML})
    judge_options: dict | str | None = field(default=None, metadata={
        "help": "more LLM-judge options as JSON, e.g. '{\"max_retries\": 2, \"max_workers\": 8}'", **_YAML})
    classifier_model: str | None = field(default=None, metadata={
        "help": "classifier judge: model folder or hub id", **_YAML})
    classifier_kind: str = field(default="sequence", metadata={
        "help": "classifier judge: sequence or causal-guard", **_YAML})
    dummy_marker: str = field(default="REFUSE", metadata={
        "help": "dummy judge (tests): refused iff a reply starts with this", **_YAML})
    paper: bool = field(default=False, metadata={
        "help": "paper mode: Alpaca template, 16 tokens for over-rejection, keyword-gcg as a second judge "
                "(for settings left unset)"})
    backend: str = field(default="hf", metadata={"help": "generation backend: hf or vllm", **_YAML})
    cache: bool = field(default=True, metadata={"help": "reuse and store completions in the generation cache", **_YAML})
    out: str | None = field(default=None, metadata={"help": "run folder (default runs/evaluate-<model>-<time>)"})
    overwrite: bool = field(default=False, metadata={"help": "reuse an existing, non-empty run folder"})
    progress: bool = field(default=True, metadata={"help": "show progress bars", **_YAML})
    paper_set: list = field(init=False, default_factory=list, metadata={
        "help": "what paper mode set (filled in, not a setting)", **_YAML})

    def __post_init__(self):
        self.paper_set = settle(self)
        self.malicious, self.over_rejection = _skip(self.malicious), _skip(self.over_rejection)
        self.quality, self.lm_eval_tasks = _skip(self.quality), _skip(self.lm_eval_tasks)
        for name in ("max_new_tokens", "quality_tokens", "over_rejection_tokens", "limit", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SafetyLayersError(f"{name} must be >= 1, got {value}")
        if not (self.malicious or self.over_rejection or self.quality or self.lm_eval_tasks):
            raise SafetyLayersError("nothing to evaluate: give --malicious, --over-rejection, --quality or --lm-eval-tasks")
        self.judges = self._judge_names()
        self.judge_options = self._parsed_judge_options()
        self._check_judges()

    def _judge_names(self) -> list[str]:
        raw = self.judges.split(",") if isinstance(self.judges, str) else list(self.judges)
        names = [str(n).strip().lower() for n in raw if str(n).strip()]
        if self.judge_model and "llm" not in names:
            names.append("llm")
        names = list(dict.fromkeys(names))
        if not names:
            raise SafetyLayersError(f"no judge given: pass --judges with one or more of {', '.join(JUDGES)}")
        for n in names:
            if n not in JUDGES:
                close = difflib.get_close_matches(n, JUDGES, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise SafetyLayersError(f"unknown judge '{n}'; {hint}valid judges: {', '.join(JUDGES)}")
        return names

    def _parsed_judge_options(self) -> dict | None:
        options = self.judge_options
        if isinstance(options, str):
            try:
                options = json.loads(options)
            except json.JSONDecodeError as e:
                raise SafetyLayersError(f"judge_options is not valid JSON ({e.msg}): pass e.g. '{{\"max_retries\": 2}}'") from None
        if options is not None and not isinstance(options, dict):
            raise SafetyLayersError("judge_options must be a JSON object of LLM-judge options, e.g. {\"max_retries\": 2}")
        return options

    def _check_judges(self) -> None:
        if self.judge_url and not self.judge_model:
            raise SafetyLayersError("--judge-url is set but --judge-model is not: name the model the judge server serves")
        if "llm" in self.judges and not self.judge_model:
            raise SafetyLayersError("the llm judge needs --judge-model (and --judge-url unless it is http://127.0.0.1:8000/v1)")
        if "classifier" in self.judges and not self.classifier_model:
            raise SafetyLayersError("the classifier judge needs --classifier-model (a model folder or hub id)")
        if self.judges == ["proxy"] and self.proxy_threshold is None:
            raise SafetyLayersError("the proxy judge alone has nothing to calibrate against: add a judge "
                                    "(e.g. --judges keyword,proxy) or give --proxy-threshold")
        if self.proxy_threshold is not None and not 0.0 <= self.proxy_threshold <= 1.0:
            raise SafetyLayersError(f"proxy_threshold is a probability in [0, 1], got {self.proxy_threshold}")

    def judge_settings(self, name: str) -> dict:
        """The options of judge ``name`` (one of :data:`JUDGES` but ``proxy``) that this config sets."""
        if name == "dummy":
            return {"marker": self.dummy_marker}
        if name == "classifier":
            return {"model": self.classifier_model, "kind": self.classifier_kind, "device": self.device,
                    "dtype": self.dtype}
        if name == "llm":
            opts = {"model": self.judge_model, "api_key_env": self.judge_key_env, **(self.judge_options or {})}
            if self.judge_url:
                opts["base_url"] = self.judge_url
            return opts
        return {}

    def settings(self, tokens: int) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=tokens, batch_size=self.batch_size)
