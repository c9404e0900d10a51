"""A memory plan before anything loads: parameters, frozen fraction and bytes per stage.

:func:`plan_memory` builds the model from its config alone on the ``meta`` device (no weight
is read, so a folder holding only ``config.json`` is enough, and an 8B model costs a few
seconds), applies the method's freezing or LoRA exactly as :func:`~.methods.apply_method`
does, and counts:

- parameters: total, trainable, frozen and the frozen fraction (unique tensors, so tied
  embeddings count once);
- inference: the weights, and the KV cache of a batch of ``max_length``-token prompts;
- training, per process without sharding: weights, gradients (trainable parameters only),
  AdamW's two moments (in the weights' dtype, as ``torch.optim.AdamW`` keeps them), and the
  activations autograd saves for one batch, with and without gradient checkpointing.

The activations are not a formula: the model's forward runs on meta tensors under
``torch.autograd.graph.saved_tensors_hooks`` and every tensor autograd saves is counted once
(weights excluded), so the figure follows each architecture, the attention kernel, the loss's
fp32 logits and what freezing spares. With gradient checkpointing the saves are what the
checkpoints keep plus one block recomputed during backward. ``bench/bench_plan.py`` compares
the estimate with the measured peak of real steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from ..core.config import settle
from ..core.errors import SafetyLayersError
from ..core.layers import LayerRange
from .config import BAND_METHODS, LORA_METHODS, METHODS

GB = 1e9


@dataclass
class PlanConfig:
    """Settings of ``safety-layers plan``: what to train, how, and in which dtype."""

    model: str = field(default="demo", metadata={
        "help": "model: alias, folder (a config.json alone is enough), .gguf file or Hugging Face id"})
    method: Literal["sppft", "full", "freeze", "lora", "sppft-lora"] = field(default="sppft", metadata={
        "help": "sppft, full, freeze, lora or sppft-lora (as finetune --method)"})
    band: str | None = field(default=None, metadata={
        "help": "band to freeze / skip, 0-based inclusive, e.g. 6-12 (needed by sppft, freeze, sppft-lora)"})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={
        "help": "weights dtype to plan for: auto (bfloat16 where a GPU is found, float32 on a CPU)"})
    batch_size: int = field(default=4, metadata={"help": "examples per device and step (finetune's default: 4)"})
    max_length: int = field(default=256, metadata={"help": "tokens per example (finetune's default: 256)"})
    json: bool = field(default=False, metadata={"help": "print the plan as one JSON object"})
    freeze_norms: bool = field(default=False, metadata={"help": "also freeze the band's norms", "cli": False})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (lora, sppft-lora)", "cli": False})

    def __post_init__(self):
        settle(self)                      # the fields' types, checked from their annotations
        if self.method not in METHODS:
            raise SafetyLayersError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.batch_size < 1 or self.max_length < 1:
            raise SafetyLayersError("--batch-size and --max-length must be at least 1")


@dataclass
class MemoryPlan:
    """What :func:`plan_memory` found; byte figures are per process, before any sharding."""

    model: str
    model_type: str
    num_layers: int
    method: str
    band: list[int] | None
    dtype: str
    batch_size: int
    max_length: int
    parameters: int
    trainable: int
    frozen: int
    frozen_fraction: float
    inference: dict
    training: dict
    devices: list[dict] = field(default_factory=list)

    def training_bytes(self, checkpointing: bool = False, optimizer_8bit: bool = False, shards: int = 1) -> int:
        """Peak estimate of one training process: weights, gradients and optimizer states divided
        over ``shards`` (ZeRO-3 / FSDP), plus this process's activations."""
        t = self.training
        states = t["weights"] + t["gradients"] + (t["optimizer_8bit"] if optimizer_8bit else t["optimizer"])
        acts = t["activations_checkpointed"] if checkpointing else t["activations"]
        return int(states / max(shards, 1) + acts)

    def to_dict(self) -> dict:
        return asdict(self)


def bytes_per_element(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def planned_dtype(dtype: str | None) -> str:
    """``auto`` -> what the loader would pick on this machine; other names checked, not refused
    (a plan for a GPU's float16 may be made on a CPU)."""
    from ..core.placement import dtype_name

    name = dtype_name(dtype or "auto")
    if name != "auto":
        return name
    if not torch.cuda.is_available():
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def meta_model(name: str, dtype: str = "float32"):
    """The model of ``name`` built from its config on the meta device (no weight read)."""
    from .export import skeleton

    from ..core.models import _quiet_transformers

    _quiet_transformers()
    model = skeleton(name, dtype=getattr(torch, dtype))
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    return model


def _counts(model) -> tuple[int, int]:
    params = list(model.parameters())          # unique: a tied embedding counts once
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def apply_to_meta(model, method: str, band: LayerRange | None, freeze_norms: bool = False, lora_r: int = 16):
    """Freeze or wrap ``model`` (on meta) with finetune's own :func:`~.methods.apply_method`, so the
    plan counts exactly what a run trains; LoRA adapters are created on meta too."""
    from ..core.models import LoadedModel, find_blocks
    from .config import FinetuneConfig
    from .methods import apply_method

    blocks = find_blocks(model)
    if band is not None:
        band.check(len(blocks))
    cfg = FinetuneConfig(model="plan", method=method, freeze_norms=freeze_norms, lora_r=lora_r, lora_alpha=2 * lora_r)
    with torch.device("meta"):
        train_model, _, _ = apply_method(LoadedModel(model, None, "plan", "meta", blocks), cfg, band)
    return train_model


def saved_activation_bytes(model, batch: int, length: int, checkpointing: bool = False) -> tuple[int, int]:
    """(bytes autograd saves for one training forward of ``batch`` x ``length`` tokens, the
    largest share of one decoder block), counted on meta tensors; weights are not counted."""
    from ..core.models import find_blocks

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks = find_blocks(inner)
    params = {id(p) for p in model.parameters()}
    seen: dict[int, tuple[torch.Tensor, int]] = {}
    per_block: dict[int, int] = {}
    current = [-1]

    def pack(t):
        base = t._base if t._base is not None else t
        if id(t) not in params and id(base) not in params and id(t) not in seen:
            seen[id(t)] = (t, t.numel() * t.element_size())
            per_block[current[0]] = per_block.get(current[0], 0) + seen[id(t)][1]
        return t

    hooks = []
    for i, block in enumerate(blocks.layers):
        hooks.append(block.register_forward_pre_hook(lambda *_, i=i: current.__setitem__(0, i)))
        hooks.append(block.register_forward_hook(lambda *_: current.__setitem__(0, -1)))
    if checkpointing:
        _checkpointing(inner, True)
        if hasattr(model, "get_base_model"):
            inner.enable_input_require_grads()
    ids = torch.zeros((batch, length), dtype=torch.long, device="meta")
    # a 4-D mask skips transformers' mask preparation, which reads values meta tensors do not have
    mask = torch.ones((batch, 1, length, length), dtype=torch.bool, device="meta")
    was_training = model.training
    model.train()
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, attention_mask=mask, labels=ids)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
        if checkpointing:
            _checkpointing(inner, False)
    layer_max = max((v for k, v in per_block.items() if k >= 0), default=0)
    return sum(b for _, b in seen.values()), layer_max


def _checkpointing(model, on: bool) -> None:
    """Gradient checkpointing on or off (non-reentrant, as finetune runs it), under either transformers name."""
    if on and hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def _kv_cache_bytes(config, batch: int, length: int, size: int) -> int:
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    kv = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return 2 * layers * batch * length * kv * head_dim * size


def devices_found() -> list[dict]:
    """Each visible GPU (name, total and free bytes), else this machine's RAM."""
    import os

    if torch.cuda.is_available():
        out = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            out.append({"device": f"cuda:{i}", "name": torch.cuda.get_device_name(i), "total": total, "free": free})
        return out
    page = os.sysconf("SC_PAGE_SIZE")
    return [{"device": "cpu", "name": "RAM", "total": page * os.sysconf("SC_PHYS_PAGES"),
             "free": page * os.sysconf("SC_AVPHYS_PAGES")}]


def plan_memory(cfg: PlanConfig | None = None, **overrides) -> MemoryPlan:
    """The memory plan of ``cfg`` (or of ``PlanConfig(**overrides)``); reads no weights."""
    from ..core.models import find_blocks

    cfg = cfg or PlanConfig(**overrides)
    if cfg.method in BAND_METHODS and not cfg.band:
        raise SafetyLayersError(f"method {cfg.method} needs a band: pass --band START-END (e.g. 6-12)")
    band = LayerRange.parse(cfg.band) if cfg.band else None
    dtype = planned_dtype(cfg.dtype)
    size = bytes_per_element(dtype)
    model = meta_model(cfg.model, dtype)
    n_layers = len(find_blocks(model))
    if band is not None:
        band.check(n_layers)
        if cfg.method in BAND_METHODS and len(band) == n_layers:
            raise SafetyLayersError(f"the band {band} covers all {n_layers} layers: nothing is left to train")
    model = apply_to_meta(model, cfg.method, band if cfg.method in BAND_METHODS else None, cfg.freeze_norms,
                          cfg.lora_r)
    total, trainable = _counts(model)
    acts, layer_max = saved_activation_bytes(model, cfg.batch_size, cfg.max_length)
    ckpt, _ = saved_activation_bytes(model, cfg.batch_size, cfg.max_length, checkpointing=True)
    base_total = total - (trainable if cfg.method in LORA_METHODS else 0)
    weights = total * size
    training = {"weights": weights, "gradients": trainable * size, "optimizer": 2 * trainable * size,
                "optimizer_8bit": 2 * trainable, "activations": acts, "activations_checkpointed": ckpt + layer_max}
    training["total"] = weights + 3 * trainable * size + acts
    training["total_checkpointed"] = weights + 3 * trainable * size + training["activations_checkpointed"]
    kv = _kv_cache_bytes(model.config, cfg.batch_size, cfg.max_length, size)
    return MemoryPlan(
        model=cfg.model, model_type=getattr(model.config, "model_type", "?"), num_layers=n_layers,
        method=cfg.method, band=[band.start, band.end] if band is not None else None, dtype=dtype,
        batch_size=cfg.batch_size, max_length=cfg.max_length, parameters=total, trainable=trainable,
        frozen=total - trainable, frozen_fraction=(total - trainable) / max(total, 1),
        inference={"weights": base_total * size, "kv_cache": kv, "total": base_total * size + kv},
        training=training, devices=devices_found())


def plan_text(p: MemoryPlan) -> str:
    """The plan as a few aligned lines for the console."""
    g = lambda b: f"{b / GB:8.2f} GB"  # noqa: E731
    t = p.training
    band = f", band {p.band[0]}-{p.band[1]}" if p.band else ""
    lines = [
        f"{p.model} ({p.model_type}, {p.num_layers} layers), method {p.method}{band}, {p.dtype}, "
        f"batch {p.batch_size} x {p.max_length} tokens",
        f"parameters {p.parameters:,}: trainable {p.trainable:,}, frozen {p.frozen:,} "
        f"({100 * p.frozen_fraction:.1f}% frozen)",
        "inference:",
        f"  weights              {g(p.inference['weights'])}",
        f"  KV cache (batch)     {g(p.inference['kv_cache'])}",
        "training (one process, no sharding):",
        f"  weights              {g(t['weights'])}",
        f"  gradients            {g(t['gradients'])}",
        f"  AdamW states         {g(t['optimizer'])}   (8-bit optimizer: {t['optimizer_8bit'] / GB:.2f} GB)",
        f"  activations          {g(t['activations'])}   (gradient checkpointing: "
        f"{t['activations_checkpointed'] / GB:.2f} GB)",
        f"  total                {g(t['total'])}   (gradient checkpointing: {t['total_checkpointed'] / GB:.2f} GB)",
        "devices:",
    ]
    for d in p.devices:
        verdict = ("fits" if t["total"] <= d["free"] else "fits with gradient checkpointing"
                   if t["total_checkpointed"] <= d["free"] else "does NOT fit (see finetune's ways out)")
        lines.append(f"  {d['device']:<8} {d['name']}: {d['total'] / GB:.1f} GB, {d['free'] / GB:.1f} GB free; "
                     f"one training process {verdict}")
    return "\n".join(lines)


def _cpu_available() -> int:
    """MemAvailable (what can be used without swapping), or free pages where /proc is missing."""
    import os

    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def capacity(device: str) -> tuple[str, int]:
    """(name, bytes this process can use) of ``cpu`` or ``cuda:N``."""
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        free, _ = torch.cuda.mem_get_info(index)
        return f"{device} ({torch.cuda.get_device_name(index)})", free
    return "the CPU's RAM", _cpu_available()


def check_training_fits(cfg: PlanConfig, device: str, *, checkpointing: bool = False, optimizer_8bit: bool = False,
                        shards: int = 1, keep_untuned: bool = False) -> MemoryPlan:
    """The plan of ``cfg``; one line naming what does not fit on ``device`` and the ways out when
    one training process would need more than the device has free. ``keep_untuned``: an untuned
    copy of the weights stays beside the trained one (an experiment's base model)."""
    p = plan_memory(cfg)
    resident = p.inference["weights"] if keep_untuned else 0
    need = p.training_bytes(checkpointing, optimizer_8bit, shards) + resident
    where, room = capacity(device)
    if need <= room:
        return p
    kept = f", plus {resident / GB:.1f} GB for the untuned model kept beside it" if resident else ""
    raise SafetyLayersError(f"{p.method} fine-tuning of {p.model} does not fit: " + memory_story(
        p, checkpointing, optimizer_8bit, shards) + f"{kept}, and {where} has {room / GB:.1f} GB free. " + ways_out(p))


def memory_story(p: MemoryPlan, checkpointing: bool = False, optimizer_8bit: bool = False, shards: int = 1) -> str:
    """``~130.1 GB per process (weights 32.1, gradients 32.1, AdamW 64.2, activations 1.7 GB; float32, ...)``."""
    t = p.training
    opt = t["optimizer_8bit"] if optimizer_8bit else t["optimizer"]
    acts = t["activations_checkpointed"] if checkpointing else t["activations"]
    split = f" over {shards} shards" if shards > 1 else ""
    return (f"~{p.training_bytes(checkpointing, optimizer_8bit, shards) / GB:.1f} GB per process (weights "
            f"{t['weights'] / GB:.1f}, gradients {t['gradients'] / GB:.1f}, {'8-bit ' if optimizer_8bit else ''}AdamW "
            f"{opt / GB:.1f}{split}, activations {acts / GB:.1f} GB; {p.dtype}, batch {p.batch_size} x "
            f"{p.max_length} tokens)")


def ways_out(p: MemoryPlan) -> str:
    """The ways to make training fit, each with what it saves according to the plan."""
    t = p.training
    states = t["weights"] + t["gradients"] + t["optimizer"]
    ways = []
    if p.dtype == "float32":
        ways.append(f"--dtype bfloat16 (weights, gradients and AdamW states halve: ~{(states / 2 + t['activations']) / GB:.1f} GB)")
    ways += [f"--gradient-checkpointing (activations {t['activations_checkpointed'] / GB:.1f} GB)",
             f"an 8-bit optimizer, --optim adamw_bnb_8bit (AdamW {t['optimizer_8bit'] / GB:.1f} GB)",
             "DeepSpeed ZeRO-3 or FSDP over several GPUs (accelerate launch --config_file examples/accelerate-fsdp.yaml "
             "or examples/accelerate-deepspeed.yaml: states split over the GPUs)"]
    if p.method not in LORA_METHODS:
        ways.append("--method sppft-lora or lora (only adapters train)")
    return "Ways out: " + "; ".join(ways)
