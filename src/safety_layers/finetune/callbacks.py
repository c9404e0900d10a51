"""The check that frozen really means frozen: a Trainer callback that fails the run if a frozen
parameter reaches the optimizer or changes while training. It is built on first use, since
importing ``transformers.TrainerCallback`` costs seconds (``--help`` must stay quick)."""

from __future__ import annotations

import functools

import torch


def _fingerprint(p: torch.Tensor) -> tuple[float, torch.Tensor]:
    """A float64 sum and a strided sample of up to 4096 values: cheap, and any update moves them."""
    flat = p.detach().reshape(-1)
    step = max(1, flat.numel() // 4096)
    return float(flat.sum(dtype=torch.float64)), flat[::step].clone()


def _same(a: tuple[float, torch.Tensor], b: tuple[float, torch.Tensor]) -> bool:
    return a[0] == b[0] and torch.equal(a[1], b[1])


@functools.lru_cache(maxsize=1)
def freeze_check_class():
    """Built on first use: importing ``transformers.TrainerCallback`` costs seconds."""
    from transformers import TrainerCallback

    class FreezeCheckCallback(TrainerCallback):
        """Fails the run if a frozen parameter reaches the optimizer or changes during training.

        Also prints how many tensors and parameters each optimizer group holds (on the main
        process). Under FSDP and DeepSpeed ZeRO-3 the values are gathered from the shards through
        :func:`~safety_layers.engine.distributed.full_parameters` on every process.
        """

        def __init__(self, frozen: dict[str, torch.nn.Parameter], verbose: bool = True):
            self.frozen = frozen
            self.verbose = verbose
            from ..engine.distributed import full_parameters

            with full_parameters(frozen) as full:       # ZeRO-3 partitions weights as they load: gathered
                self.before = {n: _fingerprint(v) for n, v in full.items()}
            self.groups: list[dict] = []
            self.result = "not run"

        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            if optimizer is None:
                return
            ids = {id(p) for p in self.frozen.values()}
            # by identity, and by requires_grad for the new (sharded) tensors FSDP and ZeRO-3 hand the optimizer
            leaked = sum(id(p) in ids or not p.requires_grad for g in optimizer.param_groups for p in g["params"])
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
            changed = self.changed(kwargs.get("model"), sharded=bool(getattr(args, "fsdp", None)
                                                                   or getattr(args, "deepspeed", None)))
            if changed:
                raise RuntimeError(f"{len(changed)} frozen parameters changed during training, e.g. {changed[0]}")
            self.result = "passed"

        def changed(self, model=None, sharded: bool = False) -> list[str]:
            """Names of frozen parameters whose values moved; under FSDP or ZeRO-3 the full values
            are gathered from the shards through the engine (every process must call this)."""
            from ..engine.distributed import full_parameters, plain_name

            if sharded and model is not None:
                names = {plain_name(n): n for n in self.before}
                with full_parameters(model, names) as full:
                    missing = [n for n in names if n not in full]
                    if missing:
                        raise RuntimeError(f"{len(missing)} frozen parameters not found in the trained model, "
                                           f"e.g. {missing[0]}")
                    return [names[k] for k, v in full.items() if not _same(_fingerprint(v), self.before[names[k]])]
            return [n for n, before in self.before.items() if not _same(_fingerprint(self.frozen[n]), before)]

    return FreezeCheckCallback


def __getattr__(name):          # ``from .callbacks import FreezeCheckCallback`` stays lazy
    if name == "FreezeCheckCallback":
        return freeze_check_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
