"""Where a fine-tuning runs, and whether it fits there: the device policy meets the Trainer.

The model loads on the CPU in the dtype the policy resolved (:mod:`safety_layers.core.placement`)
and the Trainer places it: one GPU per process under a launcher, or sharded by FSDP / DeepSpeed
ZeRO-3 (``examples/accelerate-fsdp.yaml``, ``examples/accelerate-deepspeed.yaml``). Before it
loads, the memory plan (:mod:`.plan`) is checked against the device; an out-of-memory error
during training is explained with the plan's numbers.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..core.errors import SafetyLayersError


def cpu_args(place) -> dict:
    """TrainingArguments that keep the Trainer on the CPU when ``--device cpu`` is asked on a GPU machine."""
    import torch

    return {"use_cpu": True} if place.device == "cpu" and torch.cuda.is_available() else {}


def check_device(place, args) -> None:
    """``--device`` and the Trainer's own device must agree (the Trainer decides where it trains)."""
    import torch

    if place.device == "cpu" and torch.cuda.is_available() and not getattr(args, "use_cpu", False):
        raise SafetyLayersError("--device cpu, but the Trainer would train on the GPU: pass --use-cpu too")
    if place.on_gpu and getattr(args, "use_cpu", False):
        raise SafetyLayersError(f"--device {place.device} with --use-cpu: drop one of them")


def checkpointing(args) -> bool:
    """Whether the Trainer checkpoints activations; it then runs non-reentrant checkpoints unless the
    user chose, which pass gradients through a frozen band and need no input that requires grad."""
    for name in ("gradient_checkpointing", "activation_checkpointing"):
        if getattr(args, name, False):
            kwargs = f"{name}_kwargs"
            if getattr(args, kwargs, None) is None:
                setattr(args, kwargs, {"use_reentrant": False})
            return True
    return False


def shards(args) -> int:
    """Processes that share the weights, gradients and optimizer states (FSDP, DeepSpeed ZeRO-3),
    whether set in TrainingArguments or by ``accelerate launch --config_file`` (its environment), else 1."""
    import os

    ds = getattr(args, "hf_deepspeed_config", None)
    stage3 = (ds is not None and getattr(ds, "is_zero3", lambda: False)()) or (
        os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
        and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3")
    fsdp = bool(getattr(args, "fsdp", None)) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    return max(getattr(args, "world_size", 1), 1) if stage3 or fsdp else 1


def check_memory(cfg, args, place):
    """The memory plan of this run, or one line naming what does not fit and the ways out."""
    from .methods import resolve_band
    from .plan import PlanConfig, check_training_fits

    band = resolve_band(cfg)
    plan_cfg = PlanConfig(model=cfg.model, method=cfg.method, band=str(band) if band is not None else None,
                          dtype=place.dtype_name, batch_size=args.per_device_train_batch_size,
                          max_length=cfg.max_length, freeze_norms=cfg.freeze_norms, lora_r=cfg.lora_r)
    return check_training_fits(plan_cfg, place.device, checkpointing=checkpointing(args),
                               optimizer_8bit="8bit" in str(getattr(args, "optim", "")), shards=shards(args))


def check_grid_memory(cfg):
    """An experiment's check before it loads: its most demanding method (full fine-tuning unless every
    method is LoRA) trained beside the untuned model it keeps, in its dtype, on its device."""
    from .config import LORA_METHODS
    from .plan import PlanConfig, check_training_fits

    place = cfg.placement()
    worst = "lora" if all(m in LORA_METHODS for m in cfg.methods) else "full"
    targs = cfg.training_args or {}
    plan_cfg = PlanConfig(model=cfg.model, method=worst, dtype=place.dtype_name, batch_size=cfg.batch_size,
                          max_length=cfg.max_length, lora_r=cfg.lora_r)
    return check_training_fits(plan_cfg, place.device, checkpointing=bool(targs.get("gradient_checkpointing")),
                               optimizer_8bit="8bit" in str(targs.get("optim", "")), keep_untuned=True)


@contextlib.contextmanager
def explain_oom(prep):
    """An out-of-memory error while training becomes one line with the plan's numbers; the
    checkpoints written so far stay in the run folder."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError:
        from .plan import memory_story, ways_out

        step = prep.trainer.state.global_step
        kept = [p.name for p in sorted(Path(prep.args.output_dir).glob("checkpoint-*"))]
        what = (f"the plan estimated {memory_story(prep.memory, checkpointing(prep.args))}. {ways_out(prep.memory)}"
                if prep.memory is not None else "run `safety-layers plan` for the memory it needs and the ways out")
        raise SafetyLayersError(f"out of memory at step {step} of {prep.cfg.method} fine-tuning of {prep.lm.name}: "
                                f"{what}; kept in {prep.args.output_dir}: {', '.join(kept) or 'no checkpoint yet'}"
                                ) from None
