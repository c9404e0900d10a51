"""The memory plan's training estimate against the measured peak of real steps, on the CPU.

For each method (full fine-tuning and SPPFT) a subprocess loads the model in fp32, runs
``finetune``'s own preparation (which makes the plan, ``safety-layers plan``) and trains a few
AdamW steps on rows long enough that every batch is ``--batch`` x ``--max-length`` tokens,
as the plan assumes. The measured figure is the peak RSS while training above the RSS before
the model loaded (as bench_finetune.py and bench_memory.py measure it): weights, gradients,
optimizer states, activations and whatever the Trainer adds. The goal is the plan within 15 %.

Usage: python bench/bench_plan.py [--model smollm2-135m-instruct] [--steps 3] [--batch 4]
       [--max-length 256] [--band 6-12] [--methods full,sppft] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_finetune import RssSampler, _rss_bytes, child_result  # noqa: E402


def long_rows(n: int) -> list[dict]:
    """Synthetic rows whose answers alone exceed any max length used here (truncated to it)."""
    return [{"instruction": f"Count upwards from {i}.", "input": "",
             "output": " ".join(str(i + k) for k in range(400))} for i in range(n)]


def child(a) -> dict:
    import torch

    from safety_layers.core.models import load_model
    from safety_layers.finetune import FinetuneConfig, default_training_args, prepare

    if a.threads:
        torch.set_num_threads(a.threads)
    before_load = _rss_bytes()
    lm = load_model(a.model, device="cpu", dtype="float32")
    cfg = FinetuneConfig(model=a.model, data=a.data, method=a.child, layers=a.band, max_length=a.max_length,
                         out=str(Path(a.workdir) / f"final-{a.child}"), check_disk=False, device="cpu")
    args = default_training_args(Path(a.workdir) / f"run-{a.child}", max_steps=a.steps, use_cpu=True,
                                 per_device_train_batch_size=a.batch, save_strategy="no", logging_strategy="no",
                                 disable_tqdm=True, dataloader_pin_memory=False, seed=0, learning_rate=1e-5,
                                 optim="adamw_torch")
    from safety_layers.finetune.devices import check_memory

    plan = check_memory(cfg, args, cfg.placement())          # what finetune checks before it loads
    prep = prepare(cfg, args, model=lm)
    with RssSampler() as rss:
        prep.trainer.train()
    t = plan.training
    return {"method": a.child, "parameters": plan.parameters, "trainable": plan.trainable,
            "plan": {k: t[k] for k in ("weights", "gradients", "optimizer", "activations", "total")},
            "measured": rss.peak - before_load, "rss_before_load": before_load, "rss_peak": rss.peak,
            "threads": torch.get_num_threads()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--band", default="6-12")
    ap.add_argument("--methods", default="full,sppft")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a)))
        return 0
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in long_rows(4 * a.batch * a.steps)), encoding="utf-8")
        for m in a.methods.split(","):
            t = time.time()
            res[m] = child_result([__file__, "--child", m, "--data", str(data), "--workdir", tmp, "--model", a.model,
                                   "--steps", str(a.steps), "--batch", str(a.batch), "--max-length", str(a.max_length),
                                   "--band", a.band, "--threads", str(a.threads)])
            if res[m] is None:
                return 1
            print(f"{m}: done in {time.time() - t:.0f} s")
    mb = 1 / 2**20
    print(f"\n{a.model} fp32 on the CPU, batch {a.batch} x {a.max_length} tokens, {a.steps} AdamW steps, "
          f"band {a.band}\n")
    print(f"{'method':<8}{'weights':>9}{'grads':>8}{'AdamW':>8}{'acts':>8}{'plan MB':>9}{'measured MB':>13}{'ratio':>7}")
    ok = True
    for m, r in res.items():
        p = r["plan"]
        ratio = r["measured"] / p["total"]
        ok &= abs(ratio - 1) <= 0.15
        print(f"{m:<8}{p['weights'] * mb:>9.0f}{p['gradients'] * mb:>8.0f}{p['optimizer'] * mb:>8.0f}"
              f"{p['activations'] * mb:>8.0f}{p['total'] * mb:>9.0f}{r['measured'] * mb:>13.0f}{ratio:>7.3f}")
    print(f"\nmeasured = peak RSS while training - RSS before the model loaded; goal: within 15 % "
          f"-> {'OK' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
