"""Helpers for the fine-tuning tests, and the worker that the 2-process torchrun test launches.

As a script (``python -m torch.distributed.run --nproc_per_node 2 tests/helpers_finetune.py OUT
CASE...``) every rank trains each case (``arch:method:band``) for a few steps on CPU with
gloo, checks the freezing invariants on its own copy of the model and writes
``OUT/<case>-rank<r>.json``; the test reads those files. The case ``align`` runs align's SFT
Trainer instead and writes ``OUT/align-rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import tiny_model  # noqa: E402


def benign_rows(n: int = 16) -> list[dict]:
    """Short synthetic instruction rows (no third-party data)."""
    return [{"instruction": f"Name the number after {i}.", "input": "" if i % 3 else f"context {i}",
             "output": f"The number after {i} is {i + 1}."} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_args(output_dir, **overrides):
    """TrainingArguments for a few fast CPU steps: large LR so every trainable tensor moves."""
    from safety_layers.finetune import default_training_args

    base = dict(max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, save_strategy="no",
                logging_strategy="no", disable_tqdm=True, use_cpu=True, optim="adamw_torch",
                dataloader_pin_memory=False, seed=0)
    base.update(overrides)
    return default_training_args(output_dir, **base)


@contextmanager
def one_thread():
    """Tiny matmuls on a shared, loaded 2-core machine run 20x faster on one thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def base_name(name: str) -> str:
    """A PeftModel's name of a base weight -> the name in the bare model."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def invariants(prep, before: dict[str, torch.Tensor]) -> dict:
    """What the tests assert after training, computed on this process's model and optimizer."""
    model, opt = prep.model, prep.trainer.optimizer
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    params = dict(model.named_parameters())
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    with_state = {id(p) for p in opt.state}
    lora = [n for n in params if "lora_" in n]
    out = {"frozen_unchanged": [], "frozen_changed": [], "trainable_changed": [], "trainable_unchanged": [],
           "frozen_in_optimizer": [], "frozen_with_state": [], "trainable_missing_from_optimizer": [],
           "lora_names": lora, "checksum": 0.0}
    for n, p in params.items():
        if "lora_" in n:
            start = None
        else:
            start = before[base_name(n)]
        if n in frozen:
            out["frozen_unchanged" if torch.equal(p.detach(), start) else "frozen_changed"].append(n)
            if id(p) in in_opt:
                out["frozen_in_optimizer"].append(n)
            if id(p) in with_state:
                out["frozen_with_state"].append(n)
        else:
            moved = True if start is None else not torch.equal(p.detach(), start)
            out["trainable_changed" if moved else "trainable_unchanged"].append(n)
            if id(p) not in in_opt:
                out["trainable_missing_from_optimizer"].append(n)
            out["checksum"] += float(p.detach().double().sum())
    if lora:   # LoRA B starts at zero and A at random: both must have moved
        out["lora_zero"] = [n for n in lora if "lora_B" in n and not params[n].detach().abs().sum()]
    return out


def run_case(arch: str, method: str, band: str, workdir: Path, cfg_overrides: dict | None = None,
             **arg_overrides):
    """Train one tiny case; return (Prepared, FinetuneResult, invariants)."""
    from safety_layers.finetune import FinetuneConfig, prepare, train_and_save

    cfg_overrides = cfg_overrides or {}
    lm = tiny_model(arch, layers=4, seed=0)
    before = snapshot(lm.model)
    data = write_jsonl(workdir / f"data-{os.environ.get('RANK', '0')}.jsonl", benign_rows())
    cfg = FinetuneConfig(data=str(data), method=method, layers=band, max_length=64, overwrite=True,
                         out=str(workdir / f"out-{arch}-{method}"), **cfg_overrides)
    args = tiny_args(str(workdir / f"run-{arch}-{method}"), **arg_overrides)
    prep = prepare(cfg, args, model=lm)
    result = train_and_save(prep)
    return prep, result, invariants(prep, before)


def align_case() -> dict:
    """align's SFT (every loss term, the cached prefix) on a tiny llama, as each process sees it."""
    from safety_layers.align import Example, SFTSettings, train_sft

    lm = tiny_model("llama", layers=2, seed=11)
    examples = [Example(f"Question number {i}: what now?", "Sorry, I can't." if i % 3 == 0 else f"Answer {i} is fine.",
                        "refusal" if i % 3 == 0 else "benign", avoid="Sure," if i % 3 == 0 else "Sorry,")
                for i in range(16)]
    s = SFTSettings(lr=3e-3, epochs=1.0, batch_size=4, opening_weight=4.0, unlikelihood_weight=0.5,
                    kind_weights={"benign": 0.6}, training_args={"ddp_backend": "gloo", "use_cpu": True})
    stats = train_sft(lm, examples, s, progress=False)
    return {"steps": stats.steps, "losses": stats.losses,
            "checksum": sum(float(p.detach().double().sum()) for p in lm.model.parameters())}


def _worker(out_dir: str, cases: list[str]) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    out = Path(out_dir)
    for case in cases:
        if case == "align":
            (out / f"align-rank{rank}.json").write_text(json.dumps(align_case()))
            continue
        arch, method, band = case.split(":")
        work = out / f"work-{arch}-{method}"
        work.mkdir(parents=True, exist_ok=True)
        prep, result, inv = run_case(arch, method, band, work, ddp_backend="gloo")
        inv.update(world_size=prep.args.world_size, rank=rank, global_step=result.global_step,
                   frozen_check=result.frozen_check, final_exists=Path(result.out).is_dir())
        (out / f"{arch}-{method}-rank{rank}.json").write_text(json.dumps(inv))


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2:])
