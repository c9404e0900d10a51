"""Fine-tune with the safety layers frozen (SPPFT) or with the usual baselines.

Methods (``FinetuneConfig.method``):

``full``
    every parameter trains (the paper's FullFT baseline).
``sppft``
    the band's attention and MLP parameters are frozen, everything else trains
    (paper.md §4.1; the released code also leaves the band's norms trainable, see
    ``freeze_norms``).
``freeze``
    the same mechanics for any other band, for the ablation of paper.md §5 (Tab.8).
``lora``
    PEFT LoRA on every decoder layer (a baseline the paper does not run).
``sppft-lora``
    LoRA on every layer except the band: the band gets no adapter at all.

Training runs on the stock Hugging Face ``Trainer``, so ``TrainingArguments`` pass
through and accelerate, torchrun, DeepSpeed and FSDP launch it as usual. Frozen
parameters get ``requires_grad=False`` before the Trainer exists, which keeps them out of
the optimizer entirely; :class:`FreezeCheckCallback` verifies that at the start of
training and that their values are unchanged at the end.

Layout: ``TrainingArguments.output_dir`` is the run folder (``checkpoint-N/``,
``config.json``, ``result.json``); the final model (or adapter) goes to ``out``
(default ``<output_dir>/model`` or ``<output_dir>/adapter``) with a ``manifest.json``,
written under a temporary name and renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ..core.errors import SafetyLayersError
from ..core.layers import LayerRange
from ..core.models import PAPER_COMPONENTS, Blocks

METHODS = ("sppft", "full", "freeze", "lora", "sppft-lora")
BAND_METHODS = ("sppft", "freeze", "sppft-lora")
LORA_METHODS = ("lora", "sppft-lora")
IGNORE_INDEX = -100   # label value the loss skips


# --------------------------------------------------------------------------- configuration

@dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run (``safety-layers finetune``); Trainer flags pass through separately."""

    model: str = field(default="smollm2-135m-instruct",
                       metadata={"help": "model: alias, local folder, .gguf file or Hugging Face id"})
    data: str | None = field(default=None, metadata={
        "help": "training data: JSON list or JSONL of {instruction, input, output} (see `safety-layers scenario`)"})
    method: Literal["sppft", "full", "freeze", "lora", "sppft-lora"] = field(default="sppft", metadata={
        "help": "sppft: freeze the band's attention+MLP; full: train all; freeze: sppft mechanics on another band "
                "(ablation); lora: LoRA on all layers; sppft-lora: LoRA on every layer except the band"})
    layers: str | None = field(default=None, metadata={
        "help": "band to freeze / skip, 0-based inclusive, e.g. 6-12"})
    locate: str | None = field(default=None, metadata={
        "help": "read the band from a locate result (JSON with safety_layers or range, or its run folder)"})
    freeze_norms: bool = field(default=False, metadata={
        "help": "also freeze the band's layer norms (the paper's code leaves them trainable)"})
    template: str = field(default="chat", metadata={
        "help": "prompt template: chat (the model's own), alpaca (the paper's), alpaca_short, plain"})
    train_on_inputs: bool = field(default=False, metadata={
        "help": "compute the loss on prompt tokens too (the paper's code does); default: response only"})
    paper: bool = field(default=False, metadata={
        "help": "paper mode: Alpaca template and loss on prompt + response"})
    max_length: int = field(default=256, metadata={"help": "truncate each example to this many tokens (paper: 256)"})
    limit: int | None = field(default=None, metadata={"help": "use only the first LIMIT rows of the data"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    merge_lora: bool = field(default=False, metadata={
        "help": "merge the LoRA weights and save a full model instead of an adapter"})
    out: str | None = field(default=None, metadata={
        "help": "final model/adapter folder (default: <output_dir>/model or <output_dir>/adapter)"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace an existing final folder and delete earlier checkpoints in output_dir"})
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint in output_dir"})
    dtype: str = field(default="float32", metadata={"help": "weights dtype: float32 (paper), bfloat16, float16"})
    check_disk: bool = field(default=True, metadata={
        "help": "refuse to start when the disk cannot hold a checkpoint and the final model"})

    def __post_init__(self):
        if self.method not in METHODS:
            raise SafetyLayersError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.paper:
            self.template, self.train_on_inputs = "alpaca", True
        if self.max_length < 8:
            raise SafetyLayersError(f"--max_length must be at least 8 tokens, got {self.max_length}")
        if self.limit is not None and self.limit < 1:
            raise SafetyLayersError(f"--limit must be at least 1, got {self.limit}")
        if self.lora_r < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise SafetyLayersError("LoRA needs --lora_r >= 1, --lora_alpha > 0 and 0 <= --lora_dropout < 1")


def default_training_args(output_dir: str | Path, **overrides):
    """TrainingArguments with this package's defaults (batch 4, 3 epochs, lr 1e-4, one checkpoint per epoch).

    The paper's per-model learning rates are in paper.md §4.3 (Table 6); pass them explicitly.
    """
    from transformers import TrainingArguments

    base = dict(output_dir=str(output_dir), per_device_train_batch_size=4, num_train_epochs=3,
                learning_rate=1e-4, logging_steps=10, save_strategy="epoch", save_total_limit=1,
                report_to="none", seed=42)
    base.update(overrides)
    return TrainingArguments(**base)


def parse_finetune_args(argv: list[str] | None = None):
    """``(FinetuneConfig, TrainingArguments)`` from flags, after an optional ``--config run.yaml``.

    The YAML holds any fields of either dataclass (flat); flags given on the command line
    override it. Unknown YAML keys fail with the closest valid name. Without an
    ``output_dir`` the run folder is ``runs/finetune-<model>-<method>-<time>``.
    """
    import difflib

    import yaml
    from transformers import HfArgumentParser, TrainingArguments

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser((FinetuneConfig, TrainingArguments))
    if known.config:
        path = Path(known.config)
        if not path.is_file():
            raise SafetyLayersError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise SafetyLayersError(f"{path} must hold a mapping of option: value")
        dests = {a.dest for a in parser._actions}
        for key in data:
            if key not in dests:
                close = difflib.get_close_matches(str(key), dests, n=1)
                raise SafetyLayersError(f"unknown option {key!r} in {path}" +
                                        (f": did you mean {close[0]!r}?" if close else ""))
        parser.set_defaults(**data)
    cfg, targs = parser.parse_args_into_dataclasses(rest, look_for_args_file=False)
    given = any(a.split("=")[0] in ("--output_dir", "--output-dir") for a in rest)
    if not given and not (known.config and "output_dir" in data):
        targs.output_dir = str(_default_run_dir(cfg))
    return cfg, targs


def _default_run_dir(cfg: FinetuneConfig) -> Path:
    from ..core.runs import slug

    return Path("runs") / f"finetune-{slug(cfg.model)}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"


# --------------------------------------------------------------------------- the band

def read_band(path: str | Path) -> LayerRange:
    """The band of a locate result: a JSON file (or run folder holding result.json) with
    ``"safety_layers": [start, end]`` or ``"range": [start, end]``."""
    p = Path(path)
    if p.is_dir():
        p = p / "result.json"
    if not p.is_file():
        raise SafetyLayersError(f"locate result not found: {p}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SafetyLayersError(f"{p} is not valid JSON ({e.msg}): pass a locate result.json") from None
    for key in ("safety_layers", "range"):
        if isinstance(data, dict) and data.get(key) is not None:
            return LayerRange.parse(data[key])
    keys = ", ".join(data) if isinstance(data, dict) else type(data).__name__
    raise SafetyLayersError(f"{p} has no 'safety_layers' or 'range' entry (found: {keys}): "
                            "pass --layers START-END instead")


def resolve_band(cfg: FinetuneConfig, num_layers: int | None = None) -> LayerRange | None:
    """The band from ``layers`` or ``locate`` (they must agree), checked against the model."""
    band = LayerRange.parse(cfg.layers) if cfg.layers else None
    if cfg.locate:
        located = read_band(cfg.locate)
        if band is not None and band != located:
            raise SafetyLayersError(f"--layers {band} disagrees with {cfg.locate} ({located}): pass only one")
        band = located
    if band is None and cfg.method in BAND_METHODS:
        raise SafetyLayersError(f"method {cfg.method} needs a band: pass --layers START-END (e.g. 6-12) "
                                "or --locate runs/locate-.../result.json")
    if band is not None and num_layers is not None:
        band.check(num_layers)
        if cfg.method in BAND_METHODS and len(band) == num_layers:
            raise SafetyLayersError(f"the band {band} covers all {num_layers} layers: nothing is left to train "
                                    "in the decoder; use --method full or a narrower band")
    return band


def _modules_of(spec_components: dict[str, str], names=PAPER_COMPONENTS) -> list[str]:
    """Sub-module paths of a block holding the given components: ``self_attn``, ``mlp``..."""
    return list(dict.fromkeys(path.split(".")[0] for n, path in spec_components.items() if n in names))


def band_parameters(model: torch.nn.Module, blocks: Blocks, band: LayerRange,
                    norms: bool = False) -> dict[str, torch.nn.Parameter]:
    """Every parameter SPPFT freezes in the band, by its name in ``model``.

    As the released code does, whole attention and MLP sub-modules are frozen (weights,
    biases, and q/k norms where an architecture has them); the block's own norms only
    with ``norms``.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for layer in band.indices:
        block = blocks.layers[layer]
        subs = _modules_of(blocks.spec.components)
        if norms:
            subs += [n for n in blocks.spec.norms if hasattr(block, n)]
        for sub in subs:
            for p in block.get_submodule(sub).parameters():
                if id(p) in names:
                    out[names[id(p)]] = p
    return out


def lora_target_modules(blocks: Blocks, components=PAPER_COMPONENTS) -> list[str]:
    """LoRA target names from the ArchSpec (``q_proj``..., ``qkv_proj`` on phi3, ``c_attn`` on gpt2)."""
    return sorted({path.rsplit(".", 1)[-1] for n, path in blocks.spec.components.items() if n in components})


# --------------------------------------------------------------------------- exports

def skeleton(name: str) -> torch.nn.Module:
    """The model's structure without its weights (meta tensors), built from its config: exports
    need parameter names and layer counts only, so an 8B model costs nothing to describe."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..core.models import load_model, model_location

    kind, loc = model_location(name)
    if kind == "gguf":
        return load_model(name).model
    try:
        config = AutoConfig.from_pretrained(loc)
    except (OSError, ValueError) as e:
        raise SafetyLayersError(f"cannot read the config of {name!r}: {str(e).splitlines()[0][:200]}") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _blocks_of(model) -> tuple[torch.nn.Module, Blocks]:
    from ..core.models import LoadedModel, find_blocks

    if isinstance(model, str):
        model = skeleton(model)
    if isinstance(model, LoadedModel):
        return model.model, model.blocks
    return model, find_blocks(model)


def export_peft_config(band: LayerRange | str | None, model, *, r: int = 16, alpha: int = 32,
                       dropout: float = 0.05, components=PAPER_COMPONENTS):
    """A PEFT ``LoraConfig`` that puts adapters on every layer except ``band`` (all layers if None).

    ``model``: a LoadedModel, a module, or a model name/folder (read as a weightless skeleton).

    ``layers_to_transform`` is the explicit list of the other layers and ``layers_pattern``
    names the block list, so the band gets no LoRA weights at all.
    """
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    module, blocks = _blocks_of(model)
    n = len(blocks)
    keep = None
    if band is not None:
        band = LayerRange.parse(band).check(n)
        keep = [i for i in range(n) if i not in band]
        if not keep:
            raise SafetyLayersError(f"the band {band} covers all {n} layers: no layer is left for LoRA; "
                                    "use --method lora or a narrower band")
    first = blocks.component(0, next(c for c in components if c in blocks.spec.components))
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
                      target_modules=lora_target_modules(blocks, components), layers_to_transform=keep,
                      layers_pattern=blocks.layers_path.rsplit(".", 1)[-1] if keep is not None else None,
                      fan_in_fan_out=isinstance(first, Conv1D))


def _name_pattern(names: list[str]) -> str:
    return names[0] if len(names) == 1 else "(" + "|".join(names) + ")"


def unfrozen_patterns(band: LayerRange | str, model, freeze_norms: bool = False) -> list[str]:
    """Regexes matching every parameter SPPFT trains (Axolotl's ``unfrozen_parameters`` dialect:
    matched with ``re.match``, a ``.`` is a literal dot, ``.+`` a wildcard)."""
    module, blocks = _blocks_of(model)
    band = LayerRange.parse(band).check(len(blocks))
    frozen = set(band_parameters(module, blocks, band, norms=freeze_norms))
    prefix = blocks.layers_path + "."
    outside, band_kept = [], {}
    for name, _ in module.named_parameters():
        if not name.startswith(prefix):
            outside.append(f"^{name}$")
            continue
        layer, rest = name[len(prefix):].split(".", 1)
        if int(layer) in band and name not in frozen:
            band_kept.setdefault(rest, []).append(layer)
    others = [str(i) for i in range(len(blocks)) if i not in band]
    pats = outside
    if others:
        pats.append(f"^{blocks.layers_path}.{_name_pattern(others)}.")
    by_layers: dict[tuple, list[str]] = {}
    for rest, layers in band_kept.items():
        by_layers.setdefault(tuple(layers), []).append(rest)
    for layers, rests in by_layers.items():
        pats.append(f"^{blocks.layers_path}.{_name_pattern(list(layers))}.{_name_pattern(sorted(rests))}$")
    return pats


def export_axolotl(band: LayerRange | str, model, freeze_norms: bool = False) -> str:
    """A YAML block of Axolotl ``unfrozen_parameters`` reproducing SPPFT on ``band``.

    ``model``: a LoadedModel, a module, or a model name/folder (read as a weightless skeleton).
    """
    import yaml

    from .. import __version__

    module, blocks = _blocks_of(model)
    band = LayerRange.parse(band).check(len(blocks))
    what = "attention, MLP and norms" if freeze_norms else "attention and MLP"
    head = (f"# SPPFT: layers {band} (0-based, inclusive) have their {what} frozen; every other parameter "
            f"trains.\n# {type(module).__name__}, {len(blocks)} layers; written by safety-layers {__version__}.\n"
            "# Axolotl freezes every parameter that no pattern matches (re.match, '.' is a literal dot).\n")
    return head + yaml.safe_dump({"unfrozen_parameters": unfrozen_patterns(band, module, freeze_norms)},
                                 sort_keys=False, width=1000)


# --------------------------------------------------------------------------- data

@dataclass
class TokenizedData:
    examples: list[dict]
    rows: int
    dropped_too_long: int          # prompt alone fills max_length: no response token left to learn
    truncated: int
    tokens: int
    template: str


def tokenize_rows(rows: list[dict], tokenizer, template: str = "chat", max_length: int = 256,
                  train_on_inputs: bool = False) -> TokenizedData:
    """Token ids and labels of each row; the prompt's labels are -100 unless ``train_on_inputs``.

    Prompt and response are tokenized apart and joined, so the mask boundary is exact,
    and every example ends with the tokenizer's own EOS id.
    """
    from ..core.prompts import render, resolve_template

    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise SafetyLayersError("the tokenizer has no EOS token: set tokenizer.eos_token before fine-tuning")
    eos = tokenizer.eos_token or ""
    template = resolve_template(tokenizer, template)
    out, too_long, truncated, tokens = [], 0, 0, 0
    for r in rows:
        prompt = render(tokenizer, r["instruction"], template, input=r.get("input") or None)
        full = render(tokenizer, r["instruction"], template, input=r.get("input") or None, response=r["output"])
        response = full.text[len(prompt.text):] if full.text.startswith(prompt.text) else r["output"] + eos
        if eos and response.endswith(eos):
            response = response[:-len(eos)]
        p_ids = tokenizer(prompt.text, add_special_tokens=prompt.add_special_tokens)["input_ids"]
        if prompt.add_special_tokens and p_ids and p_ids[-1] == eos_id:
            p_ids = p_ids[:-1]        # a tokenizer configured to append EOS must not end the prompt with it
        r_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos_id]
        ids = p_ids + r_ids
        labels = list(ids) if train_on_inputs else [IGNORE_INDEX] * len(p_ids) + r_ids
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if len(p_ids) >= max_length:
            too_long += 1
            continue
        tokens += len(ids)
        out.append({"input_ids": ids, "labels": labels})
    return TokenizedData(out, len(rows), too_long, truncated, tokens, template)


class PadCollator:
    """Right-pads a batch to a multiple of 8 (as the paper's DataCollatorForSeq2Seq); labels with -100."""

    def __init__(self, pad_id: int, multiple: int = 8):
        self.pad_id, self.multiple = pad_id, multiple

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(b["input_ids"]) for b in batch)
        n = -(-n // self.multiple) * self.multiple
        ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# --------------------------------------------------------------------------- freezing and its check

@dataclass
class FreezePlan:
    """What trains and what does not, counted over unique parameters."""

    method: str
    band: list[int] | None
    frozen_names: list[str]
    frozen_tensors: int
    frozen_params: int
    trainable_tensors: int
    trainable_params: int
    total_params: int

    @property
    def frozen_fraction(self) -> float:
        return self.frozen_params / max(self.total_params, 1)

    def summary(self) -> str:
        t = self.trainable_params
        lines = [f"trainable params: {t:,} || all params: {self.total_params:,} || "
                 f"trainable%: {100 * t / max(self.total_params, 1):.4f}",
                 f"trainable: {self.trainable_tensors} tensors, {t:,} params; frozen: {self.frozen_tensors} tensors, "
                 f"{self.frozen_params:,} params ({100 * self.frozen_fraction:.2f}% of all)"]
        return "\n".join(lines)


def _plan(model: torch.nn.Module, method: str, band: LayerRange | None, frozen_names: list[str]) -> FreezePlan:
    tr = [p for p in model.parameters() if p.requires_grad]
    fr = [p for p in model.parameters() if not p.requires_grad]
    return FreezePlan(method, [band.start, band.end] if band is not None else None, frozen_names,
                      len(fr), sum(p.numel() for p in fr), len(tr), sum(p.numel() for p in tr),
                      sum(p.numel() for p in model.parameters()))


def apply_method(lm, cfg: FinetuneConfig, band: LayerRange | None, seed: int = 0):
    """Freeze (or wrap with LoRA) in place; return ``(model to train, FreezePlan, frozen params)``.

    For the LoRA methods every base weight is frozen and the returned model is a PeftModel.
    """
    model = lm.model
    for p in model.parameters():
        p.requires_grad_(True)
    if cfg.method in ("sppft", "freeze"):
        frozen = band_parameters(model, lm.blocks, band, norms=cfg.freeze_norms)
        for p in frozen.values():
            p.requires_grad_(False)
        return model, _plan(model, cfg.method, band, sorted(frozen)), frozen
    if cfg.method == "full":
        return model, _plan(model, cfg.method, None, []), {}
    from peft import get_peft_model
    from transformers import set_seed

    peft_cfg = export_peft_config(band if cfg.method == "sppft-lora" else None, lm, r=cfg.lora_r,
                                  alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    set_seed(seed)                                       # LoRA A matrices are drawn at random
    pm = get_peft_model(model, peft_cfg)
    if band is not None and cfg.method == "sppft-lora":
        stray = [n for n, _ in pm.named_parameters() if "lora_" in n and _layer_of(n, lm.blocks) in band]
        if stray:
            raise RuntimeError(f"LoRA weights were created on band layers: {stray[:3]}")
    frozen = {n: p for n, p in pm.named_parameters() if not p.requires_grad}
    return pm, _plan(pm, cfg.method, band if cfg.method == "sppft-lora" else None, sorted(frozen)), frozen


def _layer_of(name: str, blocks: Blocks) -> int:
    m = re.search(rf"(?:^|\.){re.escape(blocks.layers_path)}\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def _fingerprint(p: torch.Tensor) -> tuple[float, torch.Tensor]:
    """A float64 sum and a strided sample of up to 4096 values: cheap, and any update moves them."""
    flat = p.detach().reshape(-1)
    step = max(1, flat.numel() // 4096)
    return float(flat.sum(dtype=torch.float64)), flat[::step].clone()


@functools.lru_cache(maxsize=1)
def _freeze_check_class():
    """Built on first use: importing ``transformers.TrainerCallback`` costs seconds."""
    from transformers import TrainerCallback

    class FreezeCheckCallback(TrainerCallback):
        """Fails the run if a frozen parameter reaches the optimizer or changes during training.

        Also prints how many tensors and parameters each optimizer group holds (on the main
        process). Parameters sharded away from this process (ZeRO-3, FSDP) are skipped and the
        check reports it.
        """

        def __init__(self, frozen: dict[str, torch.nn.Parameter], verbose: bool = True):
            self.frozen = frozen
            self.verbose = verbose
            self.before = {n: _fingerprint(p) for n, p in frozen.items() if p.numel()}
            self.groups: list[dict] = []
            self.result = "not run"

        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            if optimizer is None:
                return
            ids = {id(p) for p in self.frozen.values()}
            leaked = sum(id(p) in ids for g in optimizer.param_groups for p in g["params"])
            if leaked:
                raise RuntimeError(f"{leaked} frozen parameters are in the optimizer")
            self.groups = [{"tensors": len(g["params"]), "params": sum(p.numel() for p in g["params"]),
                            "weight_decay": g.get("weight_decay"), "lr": g.get("lr")} for g in optimizer.param_groups]
            if self.verbose and state.is_world_process_zero:
                for i, g in enumerate(self.groups):
                    print(f"optimizer group {i}: {g['tensors']} tensors, {g['params']:,} params "
                          f"(weight_decay {g['weight_decay']})")

        def on_train_end(self, args, state, control, optimizer=None, **kwargs):
            if optimizer is not None:
                held = {id(p) for p in optimizer.state}
                if any(id(p) in held for p in self.frozen.values()):
                    raise RuntimeError("the optimizer holds state for frozen parameters")
            if getattr(args, "fsdp", None) or getattr(args, "deepspeed", None):
                # both re-home parameters into flat shards; the original tensors no longer hold the values
                self.result = "optimizer checked; values not checked under FSDP/DeepSpeed"
                return
            changed = []
            for n, (total, sample) in self.before.items():
                p = self.frozen[n]
                if p.numel():
                    now_total, now_sample = _fingerprint(p)
                    if now_total != total or not torch.equal(now_sample, sample):
                        changed.append(n)
            if changed:
                raise RuntimeError(f"{len(changed)} frozen parameters changed during training, e.g. {changed[0]}")
            skipped = len(self.frozen) - len(self.before) + sum(not self.frozen[n].numel() for n in self.before)
            self.result = "passed" if not skipped else f"passed ({skipped} sharded tensors not checked)"

    return FreezeCheckCallback


def __getattr__(name):          # ``from safety_layers.finetune import FreezeCheckCallback`` stays lazy
    if name == "FreezeCheckCallback":
        return _freeze_check_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- the run

@dataclass
class FinetuneResult:
    method: str
    model: str
    out: str
    output_dir: str
    band: list[int] | None
    band_used: bool
    trainable_params: int
    total_params: int
    frozen_params: int
    frozen_tensors: int
    frozen_fraction: float
    samples: int
    global_step: int
    train_loss: float | None
    optimizer_state_bytes: int
    frozen_check: str
    resumed_from: str | None
    manifest: str
    seconds: float = 0.0


@dataclass
class Prepared:
    """Everything :func:`finetune` builds before it trains (tests and notebooks inspect it)."""

    cfg: FinetuneConfig
    args: object                     # TrainingArguments
    lm: object                       # LoadedModel
    model: torch.nn.Module           # what trains (a PeftModel for the LoRA methods)
    band: LayerRange | None
    plan: FreezePlan
    data: TokenizedData
    data_info: dict
    trainer: object
    check: object                    # FreezeCheckCallback
    out: Path
    resume_from: str | None


def _existing_ancestor(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def estimate_bytes(model: torch.nn.Module, lora: bool) -> dict[str, int]:
    """Disk needed by one checkpoint (weights + AdamW's two moments) and by the final folder."""
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    saved = trainable if lora else weights
    return {"checkpoint": saved + 2 * trainable, "final": saved, "weights": weights}


def check_disk(args, out: Path, sizes: dict[str, int], margin: float = 1.1) -> None:
    """Raise before training when the disk cannot hold a checkpoint plus the final model."""
    strategy = getattr(args, "save_strategy", "no")
    need_ckpt = 0 if str(getattr(strategy, "value", strategy)) == "no" else sizes["checkpoint"]
    where = {}
    for path, need in ((Path(args.output_dir), need_ckpt), (out.parent, sizes["final"])):
        anc = _existing_ancestor(path)
        dev = anc.stat().st_dev
        where.setdefault(dev, [anc, 0])[1] += need
    for anc, need in where.values():
        free = shutil.disk_usage(anc).free
        if need * margin > free:
            raise SafetyLayersError(
                f"not enough disk space in {anc}: a checkpoint (weights + optimizer, "
                f"~{sizes['checkpoint'] / 1e9:.2f} GB) and the final model (~{sizes['final'] / 1e9:.2f} GB) "
                f"need ~{need * margin / 1e9:.2f} GB, "
                f"{free / 1e9:.2f} GB free: free space, pick another --output_dir/--out, or pass --save_strategy no")


def _checkpoints(output_dir: Path) -> list[Path]:
    if not output_dir.is_dir():
        return []
    return sorted((p for p in output_dir.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)),
                  key=lambda p: int(p.name.split("-")[1]))


def _resume_point(cfg: FinetuneConfig, args) -> str | None:
    output_dir = Path(args.output_dir)
    ckpts = _checkpoints(output_dir)
    asked = getattr(args, "resume_from_checkpoint", None)
    if asked and str(asked).lower() not in ("true", "last"):
        if not Path(asked).is_dir():
            raise SafetyLayersError(f"checkpoint not found: {asked}")
        return str(asked)
    if cfg.resume or (asked and str(asked).lower() in ("true", "last")):
        if not ckpts:
            raise SafetyLayersError(f"no checkpoint in {output_dir} to resume from: run without --resume")
        return str(ckpts[-1])
    if ckpts and not cfg.overwrite:
        raise SafetyLayersError(f"{output_dir} holds checkpoints of an earlier run (last: {ckpts[-1].name}): "
                                "pass --resume to continue it or --overwrite to start over")
    return None


def _is_main(args) -> bool:
    return getattr(args, "process_index", 0) == 0


def prepare(cfg: FinetuneConfig, training_args=None, *, model=None, callbacks=None) -> Prepared:
    """Check inputs, load, freeze, tokenize and build the Trainer (nothing is trained yet).

    ``model`` may be a loaded model (it is changed in place); otherwise ``cfg.model`` is
    loaded. Every check that can fail runs before the model loads where possible.
    """
    from transformers import Trainer

    from ..core.models import load_model, load_or_use
    from ..scenarios import read_records, sha256_file

    if training_args is None:
        training_args = default_training_args(_default_run_dir(cfg))
    if not cfg.data:
        raise SafetyLayersError("no training data: pass --data FILE.jsonl (build one with `safety-layers scenario`)")
    band = resolve_band(cfg)
    output_dir = Path(training_args.output_dir)
    lora_out = cfg.method in LORA_METHODS and not cfg.merge_lora
    out = Path(cfg.out) if cfg.out else output_dir / ("adapter" if lora_out else "model")
    if out.resolve() == output_dir.resolve() or out.resolve() in output_dir.resolve().parents:
        raise SafetyLayersError(f"--out {out} would hold the checkpoints of --output_dir {output_dir}: "
                                "give the final model its own folder (default: <output_dir>/model)")
    if out.exists() and not cfg.overwrite:
        raise SafetyLayersError(f"{out} exists: pass --overwrite to replace it or choose another --out")
    resume_from = _resume_point(cfg, training_args)
    recs = read_records(cfg.data)
    rows = recs.rows[: cfg.limit] if cfg.limit else recs.rows
    if not rows:
        raise SafetyLayersError(f"{cfg.data} has no usable rows ({recs.dropped_empty} blank ones dropped)")

    if model is not None:
        lm = load_or_use(model)
    else:
        lm = load_model(cfg.model, dtype=cfg.dtype)
    band = resolve_band(cfg, lm.num_layers)
    if band is not None and cfg.method not in BAND_METHODS and _is_main(training_args):
        print(f"note: method {cfg.method} trains every layer; the band {band} is recorded but not used")

    data = tokenize_rows(rows, lm.tokenizer, cfg.template, cfg.max_length, cfg.train_on_inputs)
    if not data.examples:
        raise SafetyLayersError(f"no example of {cfg.data} fits in --max_length {cfg.max_length}: every prompt "
                                "fills it; raise --max_length")
    if data.dropped_too_long and _is_main(training_args):
        warnings.warn(f"{data.dropped_too_long} rows dropped: their prompt alone fills --max_length {cfg.max_length}",
                      UserWarning, stacklevel=2)

    if getattr(lm.model.config, "use_cache", None):
        lm.model.config.use_cache = False               # the KV cache is useless in training and costs memory
    if cfg.method in LORA_METHODS and training_args.gradient_checkpointing:
        lm.model.enable_input_require_grads()           # checkpointed LoRA needs grads flowing from the embeddings
    train_model, plan, frozen = apply_method(lm, cfg, band if cfg.method in BAND_METHODS else None,
                                             seed=training_args.seed)
    if cfg.check_disk:
        check_disk(training_args, out, estimate_bytes(train_model, lora_out))

    if cfg.overwrite and resume_from is None:
        with training_args.main_process_first(desc="remove earlier checkpoints"):
            for ck in _checkpoints(output_dir):
                shutil.rmtree(ck, ignore_errors=True)

    if _is_main(training_args):
        what = (f", band {band} ({'attention + MLP + norms' if cfg.freeze_norms else 'attention + MLP'} frozen)"
                if cfg.method in ("sppft", "freeze") else f", no LoRA on band {band}" if cfg.method == "sppft-lora"
                else "")
        print(f"method {cfg.method}{what}; {len(data.examples)} examples, template {data.template}")
        print(plan.summary())
    check = _freeze_check_class()(frozen)
    trainer = Trainer(model=train_model, args=training_args, train_dataset=data.examples,
                      data_collator=PadCollator(lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None
                                                else lm.tokenizer.eos_token_id),
                      processing_class=lm.tokenizer, callbacks=[check] + list(callbacks or []))
    data_info = {"path": str(cfg.data), "sha256": sha256_file(cfg.data), "layout": recs.layout, "rows": len(rows),
                 "examples": len(data.examples), "dropped_blank": recs.dropped_empty,
                 "dropped_too_long": data.dropped_too_long, "truncated": data.truncated, "tokens": data.tokens,
                 "template": data.template, "train_on_inputs": cfg.train_on_inputs, "max_length": cfg.max_length}
    return Prepared(cfg, training_args, lm, train_model, band, plan, data, data_info, trainer, check, out, resume_from)


def optimizer_state_bytes(optimizer) -> int:
    """Bytes held by the optimizer's state tensors (AdamW: two moments per trainable parameter)."""
    if optimizer is None:
        return 0
    total = 0
    for st in optimizer.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


def _save_final(prep: Prepared, manifest: dict) -> None:
    """Write the final folder under a temporary name on every process, rename it on the main one."""
    from ..core.runs import write_json

    trainer, out = prep.trainer, prep.out
    partial = out.with_name(f".{out.name}.partial")
    main = trainer.is_world_process_zero()
    if main:
        shutil.rmtree(partial, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
    trainer.accelerator.wait_for_everyone()
    if prep.cfg.method in LORA_METHODS and prep.cfg.merge_lora:
        if main:
            merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
            merged.save_pretrained(partial, safe_serialization=True)
    else:
        trainer.save_model(str(partial))               # gathers sharded weights under FSDP / DeepSpeed
    if main:
        prep.lm.tokenizer.save_pretrained(partial)
        stale = partial / "training_args.bin"           # a pickle; the manifest records the arguments as JSON
        if stale.exists():
            stale.unlink()
        write_json(partial / "manifest.json", manifest)
        if out.exists():
            shutil.rmtree(out)
        os.replace(partial, out)
    trainer.accelerator.wait_for_everyone()


def train_and_save(prep: Prepared) -> FinetuneResult:
    """Train the prepared run (resuming if asked) and write the final folder and run files."""
    from ..core.runs import environment, to_jsonable, write_json

    t0 = time.time()
    fingerprint_before = prep.lm.fingerprint() if prep.cfg.method not in LORA_METHODS else None
    out = prep.trainer.train(resume_from_checkpoint=prep.resume_from)
    state = prep.trainer.state
    opt_bytes = optimizer_state_bytes(prep.trainer.optimizer)
    band_used = prep.band is not None and prep.cfg.method in BAND_METHODS
    result = FinetuneResult(
        method=prep.cfg.method, model=prep.lm.name, out=str(prep.out), output_dir=str(prep.args.output_dir),
        band=[prep.band.start, prep.band.end] if prep.band is not None else None, band_used=band_used,
        trainable_params=prep.plan.trainable_params, total_params=prep.plan.total_params,
        frozen_params=prep.plan.frozen_params, frozen_tensors=prep.plan.frozen_tensors,
        frozen_fraction=prep.plan.frozen_fraction, samples=len(prep.data.examples), global_step=state.global_step,
        train_loss=getattr(out, "training_loss", None), optimizer_state_bytes=opt_bytes,
        frozen_check=prep.check.result, resumed_from=prep.resume_from, manifest=str(prep.out / "manifest.json"),
        seconds=round(time.time() - t0, 3))
    lora = None
    if prep.cfg.method in LORA_METHODS:
        pc = prep.model.peft_config["default"]
        lora = {"r": pc.r, "alpha": pc.lora_alpha, "dropout": pc.lora_dropout,
                "target_modules": sorted(pc.target_modules), "layers_to_transform": pc.layers_to_transform,
                "merged": prep.cfg.merge_lora}
    manifest = {
        "format": "peft-adapter" if prep.cfg.method in LORA_METHODS and not prep.cfg.merge_lora else "hf-model",
        "method": prep.cfg.method, "band": result.band, "band_used": band_used,
        "frozen_parts": ("attention+mlp+norms" if prep.cfg.freeze_norms else "attention+mlp")
        if prep.cfg.method in ("sppft", "freeze") else "all base weights" if lora else "none",
        "model": prep.lm.name, "model_source": prep.lm.source, "model_fingerprint_before": fingerprint_before,
        "num_layers": prep.lm.num_layers,
        "frozen": {"tensors": prep.plan.frozen_tensors, "params": prep.plan.frozen_params,
                   "fraction": prep.plan.frozen_fraction, "names_count": len(prep.plan.frozen_names),
                   "names": prep.plan.frozen_names if lora is None else None},
        "trainable": {"tensors": prep.plan.trainable_tensors, "params": prep.plan.trainable_params},
        "total_params": prep.plan.total_params, "optimizer_groups": prep.check.groups,
        "optimizer_state_bytes": opt_bytes, "frozen_check": prep.check.result, "lora": lora,
        "data": prep.data_info, "seed": prep.args.seed, "global_step": state.global_step,
        "train_loss": result.train_loss, "resumed_from": prep.resume_from,
        "config": asdict(prep.cfg), "training_args": to_jsonable(prep.args.to_dict()), "env": environment(),
    }
    _save_final(prep, manifest)
    if prep.trainer.is_world_process_zero():
        run = Path(prep.args.output_dir)
        write_json(run / "config.json", {"finetune": asdict(prep.cfg), "training_args": prep.args.to_dict()})
        write_json(run / "result.json", result)
    return result


def finetune(cfg: FinetuneConfig | None = None, training_args=None, *, model=None, callbacks=None) -> FinetuneResult:
    """Fine-tune ``cfg.model`` on ``cfg.data`` with ``cfg.method`` and save the result.

    ``training_args`` is a ``transformers.TrainingArguments`` (default:
    :func:`default_training_args` in ``runs/finetune-<model>-<method>-<time>``). ``model``
    may be a loaded model, which is changed in place.
    """
    cfg = cfg or FinetuneConfig()
    return train_and_save(prepare(cfg, training_args, model=model, callbacks=callbacks))


__all__ = ["FinetuneConfig", "FinetuneResult", "FreezePlan", "METHODS", "Prepared",
           "apply_method", "band_parameters", "default_training_args", "estimate_bytes", "export_axolotl",
           "export_peft_config", "finetune", "lora_target_modules", "optimizer_state_bytes", "parse_finetune_args",
           "prepare", "read_band", "resolve_band", "skeleton", "tokenize_rows", "train_and_save", "unfrozen_patterns"]
