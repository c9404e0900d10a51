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


@functools.lru_cache(maxsize=1)
def freeze_check_class():
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


def __getattr__(name):          # ``from .callbacks import FreezeCheckCallback`` stays lazy
    if name == "FreezeCheckCallback":
        return freeze_check_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
