"""SPPFT vs full fine-tuning: peak memory, optimizer state and step time, measured in one run.

Each method trains the bundled SmolLM2-135M-Instruct (fp32) for a few steps on the same
Alpaca rows, in its own subprocess so that peak memory is its own: RSS on CPU (the
process lifetime peak, and the peak while training above the RSS just before it), CUDA
peak allocation on a GPU. Optimizer state is the sum of the optimizer's state tensors.
The paper claims savings but never measures them (docs/paper.md §4.11); what to expect:
optimizer state and gradients shrink by the frozen fraction, step time only a little,
because backward still flows through the frozen band to the layers below it.

On a shared, loaded CPU pass ``--threads 1``: two threads contending with other jobs
ran about 5x slower per step here.

Usage: python bench/bench_finetune.py [--samples 200] [--steps 6] [--band 6-12] [--methods full,sppft] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
ALPACA = ROOT.parent / "shared" / "data" / "alpaca_data_1k.json"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Peak RSS while a block runs, sampled every 20 ms."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()

    def __enter__(self):
        self.start = _rss_bytes()
        self.peak = self.start
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_bytes())


def child(a) -> dict:
    import torch
    from transformers import TrainerCallback

    from safety_layers.finetune import FinetuneConfig, default_training_args, optimizer_state_bytes, prepare
    from safety_layers.core.models import load_model

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t)

    if a.threads:
        torch.set_num_threads(a.threads)
    device = "cuda" if torch.cuda.is_available() else None
    lm = load_model("smollm2-135m-instruct", device=device)
    cfg = FinetuneConfig(model="smollm2-135m-instruct", data=a.data, method=a.child, layers=a.band,
                         max_length=a.max_length, out=str(Path(a.workdir) / f"final-{a.child}"), check_disk=False)
    args = default_training_args(Path(a.workdir) / f"run-{a.child}", max_steps=a.steps,
                                 per_device_train_batch_size=a.batch, save_strategy="no", logging_strategy="no",
                                 disable_tqdm=True, dataloader_pin_memory=False, seed=0, learning_rate=1e-5)
    timer = StepTimer()
    prep = prepare(cfg, args, model=lm, callbacks=[timer])
    if device:
        torch.cuda.reset_peak_memory_stats()
    with RssSampler() as rss:
        prep.trainer.train()
    steady = timer.times[1:] or timer.times           # the first step pays for allocation and warm-up
    return {"method": a.child, "trainable": prep.plan.trainable_params, "total": prep.plan.total_params,
            "frozen_fraction": prep.plan.frozen_fraction,
            "opt_state_bytes": optimizer_state_bytes(prep.trainer.optimizer),
            "rss_peak_lifetime": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_before_train": rss.start, "rss_peak_train": rss.peak,
            "cuda_peak": torch.cuda.max_memory_allocated() if device else None,
            "step_s_median": statistics.median(steady), "step_times": timer.times,
            "threads": torch.get_num_threads(), "device": device or "cpu"}


def child_result(argv: list[str]) -> dict | None:
    """Run ``python ARGV`` (a bench in --child mode) and return the JSON of its ``RESULT`` line;
    None, with its stderr printed, when it failed."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        print(proc.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(line[-1][7:])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--band", default="6-12")
    ap.add_argument("--methods", default="full,sppft")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a)))
        return 0

    rows = json.loads(ALPACA.read_text(encoding="utf-8"))[: a.samples]
    res = {}
    with tempfile.TemporaryDirectory() as tmp:       # the Alpaca rows are CC BY-NC: never kept in the repo
        data = Path(tmp) / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        for m in a.methods.split(","):
            t = time.time()
            res[m] = child_result([__file__, "--child", m, "--data", str(data), "--workdir", tmp,
                                   "--steps", str(a.steps), "--batch", str(a.batch), "--max-length", str(a.max_length),
                                   "--band", a.band, "--threads", str(a.threads)])
            if res[m] is None:
                return 1
            print(f"{m}: done in {time.time() - t:.0f} s")

    mb = 1 / 2**20
    print(f"\nSmolLM2-135M-Instruct fp32, {len(rows)} Alpaca rows, max length {a.max_length}, batch {a.batch}, "
          f"{a.steps} steps, band {a.band}, device {res[next(iter(res))]['device']}, "
          f"{res[next(iter(res))]['threads']} threads\n")
    print(f"{'method':<11}{'trainable':>13}{'frozen%':>9}{'opt state MB':>14}{'RSS peak MB':>13}"
          f"{'train +RSS MB':>15}{'CUDA peak MB':>14}{'step s (med)':>14}")
    for m, r in res.items():
        cuda = f"{r['cuda_peak'] * mb:.0f}" if r["cuda_peak"] else "-"
        print(f"{m:<11}{r['trainable']:>13,}{100 * r['frozen_fraction']:>8.1f}%{r['opt_state_bytes'] * mb:>14.1f}"
              f"{r['rss_peak_lifetime'] * mb:>13.0f}{(r['rss_peak_train'] - r['rss_before_train']) * mb:>15.0f}"
              f"{cuda:>14}{r['step_s_median']:>14.3f}")
    ok = True
    if "full" in res:
        full = res["full"]
        for m, r in res.items():
            if m == "full":
                continue
            measured = r["opt_state_bytes"] / full["opt_state_bytes"]
            expected = r["trainable"] / full["trainable"]
            within = abs(measured - expected) <= 0.05 * expected
            ok &= within
            print(f"\n{m} / full:")
            print(f"  optimizer state: measured {measured:.4f}, expected {expected:.4f} "
                  f"(1 - frozen fraction {r['frozen_fraction']:.4f}) -> "
                  f"{'OK' if within else 'MISMATCH'} (5% tolerance)")
            added = (r["rss_peak_train"] - r["rss_before_train"]) / max(
                1, full["rss_peak_train"] - full["rss_before_train"])
            print(f"  RSS peak (lifetime): {r['rss_peak_lifetime'] / full['rss_peak_lifetime']:.3f}; "
                  f"RSS added by training: {added:.3f}")
            if r["cuda_peak"]:
                print(f"  CUDA peak: {r['cuda_peak'] / full['cuda_peak']:.3f}")
            print(f"  step time (median of steps 2..{a.steps}): {r['step_s_median'] / full['step_s_median']:.3f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
