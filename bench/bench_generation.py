"""Generation speed: our batched engine vs one-prompt-at-a-time ``model.generate``.

Measured side by side in one run on the bundled SmolLM2-135M-Instruct (fp32, CPU), chat
template, greedy, N new tokens (default 128 prompts x 32 tokens; half XSTest, half Alpaca
instructions, read from ../shared/data):

(a) ``model.generate`` one prompt at a time, as the released code does. It is slow, so it
    runs on an evenly spaced subset (default 32 prompts) and its throughput is per token of
    that subset;
(b) ``safety_layers.engine.generation.generate`` on all prompts (cache off);
(c) ``model.generate`` on the same length-sorted, left-padded batches as (b), to show what
    the engine's own decode loop adds (shared-prefix prefill, finished rows dropped).

Identical = the fraction of subset prompts whose greedy token ids from (b) equal (a)'s.
Completions are never printed. The machine may be shared: the load average is printed.

Usage: python bench/bench_generation.py [--quick] [--n 128] [--tokens 32] [--subset 32]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from safety_layers.engine.generation import GenerationSettings, default_batch_size, generate, stop_token_ids  # noqa: E402
from safety_layers.core.models import load_model  # noqa: E402
from safety_layers.core.prompts import render  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def load_bench_prompts(n: int) -> list[str]:
    """n/2 XSTest prompts (safe and unsafe, interleaved) and n/2 Alpaca instructions."""
    xs, al = DATA / "xstest_prompts.csv", DATA / "alpaca_data_1k.json"
    missing = [str(p) for p in (xs, al) if not p.is_file()]
    if missing:
        sys.exit(f"bench data not found: {', '.join(missing)} (expected the shared data folder at {DATA})")
    with open(xs, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    safe = [r["prompt"] for r in rows if r["label"] == "safe"]
    unsafe = [r["prompt"] for r in rows if r["label"] == "unsafe"]
    xstest = [p for pair in zip(safe, unsafe) for p in pair]
    alpaca = [r["instruction"] for r in json.loads(al.read_text(encoding="utf-8")) if not r.get("input")]
    return xstest[: n - n // 2] + alpaca[: n // 2]


def cut_at_stop(ids: list[int], stop: list[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in stop:
            return ids[: i + 1]
    return ids


def one_at_a_time(lm, prompts, max_new, stop):
    out = []
    for p in prompts:
        r = render(lm.tokenizer, p, "chat")
        ids = lm.tokenizer(r.text, add_special_tokens=r.add_special_tokens, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            g = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                  do_sample=False, eos_token_id=stop, pad_token_id=stop[0])
        out.append(cut_at_stop(g[0, ids.shape[1]:].tolist(), stop))
    return out


def hf_batched(lm, prompts, max_new, stop, batch_size):
    tok = lm.tokenizer
    texts = [render(tok, p, "chat").text for p in prompts]
    lens = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lens[i])
    side, tok.padding_side = tok.padding_side, "left"
    out = {}
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                g = lm.model.generate(**enc, max_new_tokens=max_new, do_sample=False, eos_token_id=stop,
                                      pad_token_id=tok.pad_token_id)
            for j, i in enumerate(idx):
                out[i] = cut_at_stop(g[j, enc["input_ids"].shape[1]:].tolist(), stop)
    finally:
        tok.padding_side = side
    return [out[i] for i in range(len(prompts))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="32 prompts x 16 tokens, subset 8")
    ap.add_argument("--n", type=int, default=128, help="prompts for the engine")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per prompt")
    ap.add_argument("--subset", type=int, default=32, help="prompts for one-at-a-time generate")
    ap.add_argument("--batch-size", type=int, default=None, help="engine batch size (default: auto)")
    ap.add_argument("--hf-batch-size", type=int, default=32, help="batch size of (c)")
    ap.add_argument("--skip-hf-batched", action="store_true", help="skip (c)")
    args = ap.parse_args()
    if args.quick:
        args.n, args.tokens, args.subset = 32, 16, 8

    prompts = load_bench_prompts(args.n)
    step = max(1, len(prompts) // args.subset)
    subset_idx = list(range(0, len(prompts), step))[: args.subset]
    lm = load_model()
    stop = stop_token_ids(lm.model, lm.tokenizer)
    settings = GenerationSettings(max_new_tokens=args.tokens, batch_size=args.batch_size)
    bs = settings.batch_size or default_batch_size(lm.model)
    print(f"model {lm.name}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}; "
          f"{len(prompts)} prompts x {args.tokens} new tokens, chat template, greedy, engine batch {bs}")

    t = time.perf_counter()
    ref = one_at_a_time(lm, [prompts[i] for i in subset_idx], args.tokens, stop)
    t_a = time.perf_counter() - t
    n_a = sum(map(len, ref))

    t = time.perf_counter()
    ours = generate(lm, prompts, settings, template="chat", cache=False, progress=False)
    t_b = time.perf_counter() - t
    n_b = sum(c.num_tokens for c in ours)

    rows = [("(a) generate, one at a time", len(subset_idx), n_a, t_a),
            ("(b) safety_layers engine", len(prompts), n_b, t_b)]
    hf = None
    if not args.skip_hf_batched:
        t = time.perf_counter()
        hf = hf_batched(lm, prompts, args.tokens, stop, args.hf_batch_size)
        t_c = time.perf_counter() - t
        rows.append((f"(c) generate, batches of {args.hf_batch_size}", len(prompts), sum(map(len, hf)), t_c))

    same = sum(ours[i].token_ids == r for i, r in zip(subset_idx, ref))
    agree_tok = sum(sum(a == b for a, b in zip(ours[i].token_ids, r)) for i, r in zip(subset_idx, ref))
    print(f"\n{'path':32} {'prompts':>7} {'tokens':>7} {'seconds':>8} {'tok/s':>7}")
    for name, n, ntok, sec in rows:
        print(f"{name:32} {n:7d} {ntok:7d} {sec:8.1f} {ntok / sec:7.1f}")
    print(f"\nidentical greedy outputs (b) vs (a): {same}/{len(subset_idx)} prompts; "
          f"matching tokens {agree_tok}/{n_a}")
    if hf is not None:
        print(f"identical greedy outputs (b) vs (c): {sum(c.token_ids == h for c, h in zip(ours, hf))}/{len(prompts)}")
        print(f"engine vs batched generate: {(n_b / t_b) / (rows[2][2] / rows[2][3]):.2f}x")
    print(f"(a) is timed on {len(subset_idx)} evenly spaced prompts; ratios compare tokens/s")
    print(f"load average at the end {os.getloadavg()[0]:.2f} (other processes skew timings)")
    print(f"speed-up, engine vs one-at-a-time generate: {(n_b / t_b) / (n_a / t_a):.1f}x")


if __name__ == "__main__":
    main()
