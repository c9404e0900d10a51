"""Several processes, one result: shard prompts, generate each shard, gather in input order.

Under ``torchrun`` or ``accelerate launch`` the launcher sets ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``. Each process then generates a strided shard of the prompts (prompt ``i`` goes to
rank ``i % world``, so every rank gets a similar mix of lengths) and the shards are gathered
back into input order with ``all_gather_object``. The main process (rank 0) judges and writes
files; the others write nothing. Objects travel over a CPU ``gloo`` group, created beside the
launcher's group when that one uses another backend (NCCL cannot carry Python objects
without a GPU tensor round-trip).

Without those variables everything here is a no-op and one process does all the work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from contextlib import contextmanager
from typing import Any, Callable, Sequence, TypeVar

from ..core.errors import SafetyLayersError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the launched processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise SafetyLayersError(f"environment variable {name}={value!r} is not an integer; unset it or "
                                "launch with torchrun / accelerate launch") from None


def world() -> World:
    """Rank, world size and local rank from the launcher's environment (1 process if unset)."""
    size = _int_env("WORLD_SIZE", 1)
    rank = _int_env("RANK", 0)
    if size < 1 or not 0 <= rank < size:
        raise SafetyLayersError(f"RANK={rank} does not fit WORLD_SIZE={size}; launch with torchrun / accelerate launch")
    return World(rank=rank, size=size, local_rank=_int_env("LOCAL_RANK", rank))


_GROUP = None
_CREATED = False  # whether this module initialised the default group (and so may destroy it)


def object_group():
    """A gloo process group for Python objects, initialising the default group if needed.

    torchrun sets ``MASTER_ADDR``/``MASTER_PORT``, so ``init_process_group`` reads everything
    from the environment. Returns None when running as a single process.
    """
    global _GROUP, _CREATED
    w = world()
    if not w.distributed:
        return None
    import torch.distributed as dist

    if not dist.is_available():
        raise SafetyLayersError("this torch build has no torch.distributed: run one process, or install a torch with it")
    if not dist.is_initialized():
        if not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
            raise SafetyLayersError("WORLD_SIZE is set but MASTER_ADDR/MASTER_PORT are not: launch with torchrun "
                                    "or accelerate launch, or unset WORLD_SIZE")
        dist.init_process_group(backend="gloo", rank=w.rank, world_size=w.size)
        _CREATED = True
    if _GROUP is None:
        _GROUP = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _GROUP


def shard_indices(n: int, w: World | None = None) -> list[int]:
    """Indices of the items this rank handles: ``rank, rank + size, ...`` (strided)."""
    w = w or world()
    return list(range(w.rank, n, w.size))


def gather_sharded(local: Sequence[T], n: int, w: World | None = None) -> list[T]:
    """Every rank's shard results (from :func:`shard_indices`) back in input order, on all ranks."""
    w = w or world()
    if not w.distributed:
        if len(local) != n:
            raise RuntimeError(f"single process holds {len(local)} of {n} results")
        return list(local)
    import torch.distributed as dist

    group = object_group()
    parts: list[Any] = [None] * w.size
    dist.all_gather_object(parts, list(local), group=group)
    out: list[Any] = [None] * n
    for rank, part in enumerate(parts):
        idx = shard_indices(n, World(rank, w.size))
        if len(idx) != len(part):
            raise RuntimeError(f"rank {rank} returned {len(part)} results for {len(idx)} prompts")
        for i, item in zip(idx, part):
            out[i] = item
    return out


def map_sharded(fn: Callable[[list[T]], list[Any]], items: Sequence[T], w: World | None = None) -> list[Any]:
    """``fn`` on this rank's shard of ``items``, gathered into one list in input order on every rank.

    ``fn`` takes a list and returns one result per element (e.g. ``generate``). With one
    process it is simply ``fn(items)``.
    """
    w = w or world()
    if not w.distributed:
        return fn(list(items))
    mine = [items[i] for i in shard_indices(len(items), w)]
    results = fn(mine) if mine else []
    return gather_sharded(results, len(items), w)


def broadcast_from_main(obj: Any = None, w: World | None = None) -> Any:
    """Rank 0's ``obj`` on every rank (returned unchanged with one process)."""
    w = w or world()
    if not w.distributed:
        return obj
    import torch.distributed as dist

    box = [obj if w.is_main else None]
    dist.broadcast_object_list(box, src=0, group=object_group())
    return box[0]


def run_on_main(fn: Callable[[], T], w: World | None = None) -> T:
    """Run ``fn`` on rank 0 only and hand its return value to every rank.

    A :class:`SafetyLayersError` raised on rank 0 is raised on every rank with the same
    message, so no process waits forever for a result that will not come.
    """
    w = w or world()
    if not w.distributed:
        return fn()
    box: tuple[str, Any] = ("ok", None)
    if w.is_main:
        try:
            box = ("ok", fn())
        except SafetyLayersError as err:
            broadcast_from_main(("error", str(err)), w)
            raise
        except BaseException as err:
            first = str(err).splitlines()[0] if str(err) else ""
            broadcast_from_main(("bug", f"rank 0 failed: {type(err).__name__}: {first}"), w)
            raise
    box = broadcast_from_main(box, w)
    if box[0] == "error":
        raise SafetyLayersError(box[1])
    if box[0] == "bug":
        raise RuntimeError(box[1])
    return box[1]


def shutdown() -> None:
    """Destroy the process group if this module created it (a launcher's group is left alone)."""
    global _GROUP, _CREATED
    if _CREATED:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _GROUP, _CREATED = None, False


# --------------------------------------------------------------------------- sharded training

#: wrapper names that FSDP (v1), activation checkpointing and DDP put into parameter names
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def plain_name(name: str) -> str:
    """A parameter's name as the unwrapped model has it (DDP's ``module.``, FSDP's wrappers dropped)."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name.removeprefix("module.")


def _fsdp1_root(model):
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:      # a torch without distributed support
        return None
    return next((m for m in model.modules() if isinstance(m, FSDP)), None)


@contextmanager
def full_parameters(model, names=None):
    """``{name: full tensor}`` of ``model``'s parameters (a module, or a mapping name -> parameter;
    ``names``: a subset, by plain name),
    whatever holds the model: one process, DDP, FSDP2 (each DTensor gathered with
    ``full_tensor``), FSDP1 (``summon_full_params``) or DeepSpeed ZeRO-3 (``GatheredParameters``).
    Every process of the group must enter it together; the values are read-only copies or views.
    """
    wanted = set(names) if names is not None else None

    def pick():
        items = model.items() if isinstance(model, dict) else model.named_parameters()
        return {plain_name(n): p for n, p in items if wanted is None or plain_name(n) in wanted}

    chosen = pick()
    if any(hasattr(p, "ds_id") for p in chosen.values()):          # DeepSpeed ZeRO-3
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(chosen.values()), modifier_rank=None):
            yield {n: p.detach() for n, p in chosen.items()}
        return
    root = None if isinstance(model, dict) else _fsdp1_root(model)
    if root is not None:                                            # FSDP1 (use_orig_params=True)
        with type(root).summon_full_params(model, writeback=False, with_grads=False):
            yield {n: p.detach() for n, p in pick().items()}
        return
    yield {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for n, p in chosen.items()}
