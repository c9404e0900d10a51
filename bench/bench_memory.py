"""Peak memory of hidden-state extraction vs the forward pass itself, by prompt length.

For each prompt length L, three ways to get the last-token state of every block, each in a
fresh subprocess so the peak is its own (CPU: peak RSS above the RSS after loading the model
and one warm-up forward; CUDA: ``max_memory_allocated`` above the weights):

1. ``forward``: the bare decoder stack on the batch, nothing kept (the floor: what any
   extraction must pay);
2. ``ours``: ``last_token_states`` (hooks keep one position per block, run cut short);
3. ``hidden_states``: the released code's way, ``output_hidden_states=True``, which holds
   every block's whole sequence before the last position is taken.

On CPU the children run with glibc's mmap threshold at 64 KiB, so a freed tensor leaves the
RSS and the peak counts only what is live at once. Printed per L: the three peaks in MiB and
the ratios ours/forward and hidden_states/forward. The goal is that ours/forward stays near 1 as L grows (what extraction adds does not grow
with length), while hidden_states/forward grows with L.

Usage: python bench/bench_memory.py [--lengths 128 512 2048] [--batch 4] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MODES = ("forward", "ours", "hidden_states")


def _status_mib(key: str) -> float:
    """A /proc/self/status memory line (VmRSS: now, VmHWM: peak) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        sys.exit(f"cannot reset the peak RSS ({e}): this bench needs Linux's /proc/self/clear_refs")


def child(mode: str, length: int, batch: int, device: str, model: str) -> dict:
    import torch

    from safety_layers.engine.activations import last_token_states
    from safety_layers.core.models import load_model

    lm = load_model(model, device=None if device == "cpu" else device)
    tok = lm.tokenizer
    # A prompt of `length` tokens (" the" is one token; plain template: no chat scaffolding).
    ids = tok(" the" * length, add_special_tokens=False)["input_ids"][:length]
    text = tok.decode(ids)
    prompts = [text] * batch
    dev = next(lm.model.parameters()).device
    x = torch.tensor([ids] * batch, device=dev)
    with torch.inference_mode():
        lm.model.model(input_ids=x[:, :8], use_cache=False)           # warm-up
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak()
        base = _status_mib("VmRSS")
    with torch.inference_mode():
        if mode == "forward":
            lm.model.model(input_ids=x, use_cache=False)
        elif mode == "ours":
            last_token_states(lm, prompts, "plain", cache=False, progress=False,
                              max_batch_tokens=batch * (length + 64), max_batch_size=batch)
        else:
            out = lm.model(input_ids=x, use_cache=False, output_hidden_states=True)
            torch.stack([h[:, -1] for h in out.hidden_states[1:]], dim=1)
    if cuda:
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = _status_mib("VmHWM") - base
    return {"mode": mode, "length": len(ids), "batch": batch, "peak_mib": round(peak, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "LENGTH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.batch, args.device, args.model)))
        return

    # glibc serves large blocks from mmap and unmaps them on free, so RSS follows the live
    # tensors instead of reusing pages freed while the model was loaded.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    rows = {}
    for length in args.lengths:
        for mode in MODES:
            cmd = [sys.executable, __file__, "--child", mode, str(length), "--batch", str(args.batch),
                   "--device", args.device, "--model", args.model]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode != 0:
                sys.exit(f"{mode} at length {length} failed:\n{res.stderr[-2000:]}")
            rows[(mode, length)] = json.loads(res.stdout.strip().splitlines()[-1])["peak_mib"]
    unit = "CUDA allocated" if args.device != "cpu" else "RSS"
    print(f"peak {unit} above the loaded model, MiB (batch {args.batch}, {args.model}, {args.device})")
    print(f"{'length':>7} {'forward':>9} {'ours':>9} {'hidden_states':>14} {'ours/fwd':>9} {'hs/fwd':>8}")
    for length in args.lengths:
        f, o, h = (rows[(m, length)] for m in MODES)
        print(f"{length:>7} {f:>9.1f} {o:>9.1f} {h:>14.1f} {o / max(f, 1e-9):>9.2f} {h / max(f, 1e-9):>8.2f}")


if __name__ == "__main__":
    main()
