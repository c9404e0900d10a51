"""Hidden-state extraction speed: ours vs the matmul ceiling vs the released code's path.

Measured side by side in one run on the bundled SmolLM2-135M-Instruct (fp32, CPU):

1. the ceiling: fp32 matmul GFLOP/s of this machine on prefill-shaped products, turned into
   tokens/s as GFLOP/s / (2 x non-embedding parameters);
2. ours: ``last_token_states`` on the 450 XSTest prompts (cache off), as shipped (the shared
   chat-template prefix computed once) and with ``share_prefix=False`` (every token computed,
   so its tokens/s is comparable with the ceiling);
3. the released code's path: one prompt at a time through
   ``generate(max_new_tokens=1, output_hidden_states=True)``, timed on a subset (it is slow);
   its vectors, those of a plain one-prompt forward on every prompt, are compared with ours
   (max abs difference, and how many prompts match bitwise).

The ceiling bounds tokens computed per second. With the prefix shared, fewer tokens are
computed than the prompts hold, so tokens of the prompts per second can exceed it; the
bench prints both.

Sharing the prefix changes the last bits: the prefix's keys and values come from a forward of
the prefix alone, and the fused SDPA attention kernel blocks queries and keys by length, so
they differ from those inside a whole-prompt forward by fp32 rounding. The bench reruns both
paths under eager attention (no blocking) to show that this is the only source, and prints
how far the one-prompt forward itself moves between the two attention kernels.

Usage: python bench/bench_activations.py [--subset 60] [--template chat]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from safety_layers.engine.activations import common_prefix, last_token_states  # noqa: E402
from safety_layers.core.data import load_prompts  # noqa: E402
from safety_layers.core.models import load_model  # noqa: E402
from safety_layers.core.prompts import render  # noqa: E402

XSTEST = ROOT.parent / "shared" / "data" / "xstest_prompts.csv"


def matmul_gflops(hidden: int, inter: int, tokens: int = 2048, seconds: float = 3.0) -> float:
    """Best-of fp32 GFLOP/s on the two MLP-shaped products of a prefill batch."""
    a = torch.randn(tokens, hidden)
    w1, w2 = torch.randn(hidden, inter), torch.randn(inter, hidden)
    h = a @ w1
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ w1
        h @ w2
        dt = time.perf_counter() - t
        best = max(best, 2 * 2 * tokens * hidden * inter / dt / 1e9)
    return best


def released_path(lm, prompts, template):
    out, ntok = [], 0
    for p in prompts:
        r = render(lm.tokenizer, p, template)
        ids = lm.tokenizer(r.text, return_tensors="pt", add_special_tokens=r.add_special_tokens)
        ntok += ids["input_ids"].shape[1]
        with torch.no_grad():
            g = lm.model.generate(**ids, max_new_tokens=1, output_hidden_states=True,
                                  return_dict_in_generate=True, do_sample=False)
        hs = g.hidden_states[0]
        out.append(torch.stack([h[0, -1] for h in hs[1:]]).float())
    return torch.stack(out), ntok


def one_prompt_states(lm, ids):
    """The released code's vectors without generate's overhead: one prompt per forward."""
    out = []
    with torch.no_grad():
        for x in ids:
            hs = lm.model(input_ids=torch.tensor([x]), output_hidden_states=True).hidden_states
            out.append(torch.stack([h[0, -1] for h in hs[1:]]).float())
    return torch.stack(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--subset", type=int, default=60, help="prompts timed on the released path")
    ap.add_argument("--template", default="chat")
    ap.add_argument("--limit", type=int, default=None, help="prompts for our path (default: all 450)")
    ap.add_argument("--no-eager-check", action="store_true",
                    help="skip rerunning both paths under eager attention (the kernel check)")
    args = ap.parse_args()
    if not XSTEST.is_file():
        sys.exit(f"missing {XSTEST}: the bench reads XSTest from ../shared/data beside the repository")
    prompts = load_prompts(f"xstest:{XSTEST}", args.limit).prompts
    lm = load_model()
    cfg = lm.model.config
    non_emb = sum(p.numel() for p in lm.blocks.layers.parameters())
    rendered = [render(lm.tokenizer, p, args.template) for p in prompts]
    ids = [lm.tokenizer(r.text, add_special_tokens=r.add_special_tokens)["input_ids"] for r in rendered]
    ntok = sum(len(x) for x in ids)
    n_prefix = common_prefix(ids)
    computed = ntok - (len(ids) - 1) * n_prefix

    last_token_states(lm, prompts[:8], args.template, cache=False, progress=False)      # warm-up
    gflops = matmul_gflops(cfg.hidden_size, cfg.intermediate_size)
    ceiling = gflops * 1e9 / (2 * non_emb)
    t = time.perf_counter()
    ours = last_token_states(lm, prompts, args.template, cache=False, progress=False)
    t_ours = time.perf_counter() - t
    ours_tps = ntok / t_ours
    t = time.perf_counter()
    plain = last_token_states(lm, prompts, args.template, cache=False, progress=False, share_prefix=False)
    t_plain = time.perf_counter() - t
    plain_tps = ntok / t_plain
    gflops2 = matmul_gflops(cfg.hidden_size, cfg.intermediate_size)   # ceiling measured again after
    ceiling = max(ceiling, gflops2 * 1e9 / (2 * non_emb))

    sub = prompts[: args.subset]
    t = time.perf_counter()
    ref, ntok_ref = released_path(lm, sub, args.template)
    t_ref = time.perf_counter() - t
    ref_tps = ntok_ref / t_ref
    single = one_prompt_states(lm, ids)
    assert torch.equal(single[: len(sub)], ref), "generate's prefill and a plain forward should agree"
    diffs = {name: (single - v).abs().amax((1, 2)) for name, v in (("ours", ours), ("every token computed", plain))}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kernel_spread = eager_diff = None
    if hasattr(lm.model, "set_attn_implementation") and not args.no_eager_check:
        # Where the shared-prefix path differs, is it the attention kernel? Under eager attention
        # (no query/key blocking) ours and the one-prompt forward are compared again.
        default = lm.model.config._attn_implementation
        lm.model.set_attn_implementation("eager")
        single_eager = one_prompt_states(lm, ids)
        ours_eager = last_token_states(lm, prompts, args.template, cache=False, progress=False)
        lm.model.set_attn_implementation(default)
        kernel_spread = (single - single_eager).abs().max().item()
        eager_diff = (single_eager - ours_eager).abs().amax((1, 2))

    print(f"model: SmolLM2-135M-Instruct, {non_emb / 1e6:.1f}M non-embedding parameters, fp32, "
          f"{torch.get_num_threads()} threads, template {args.template}")
    print(f"prompts: {len(prompts)} XSTest ({ntok} tokens, {ntok / len(prompts):.1f} per prompt; "
          f"all share a {n_prefix}-token prefix, so {computed} tokens are computed with it shared)")
    w = 40
    print(f"{'matmul ceiling':<{w}}{max(gflops, gflops2):8.1f} GFLOP/s -> {ceiling:6.0f} tokens/s")
    print(f"{'ours (prefix once, equal-length batches)':<{w}}{t_ours:8.2f} s       -> {ours_tps:6.0f} tokens/s "
          f"({computed / t_ours:.0f} computed tokens/s)")
    print(f"{'ours, every token computed':<{w}}{t_plain:8.2f} s       -> {plain_tps:6.0f} tokens/s")
    print(f"{'released path (1 prompt, generate)':<{w}}{t_ref:8.2f} s       -> {ref_tps:6.0f} tokens/s "
          f"(on {len(sub)} prompts)")
    for name, d in diffs.items():
        print(f"{name}: max abs difference from one prompt at a time {d.max().item():.2e} "
              f"(bitwise equal on {int((d == 0).sum())} of {len(d)} prompts; largest |value| {single.abs().max():.0f})")
    if eager_diff is not None:
        print(f"the one-prompt forward itself moves by {kernel_spread:.2e} between {default} and eager attention; "
              f"under eager on both sides ours differs by {eager_diff.max().item():.2e} (bitwise equal on "
              f"{int((eager_diff == 0).sum())} of {len(eager_diff)} prompts)")
    print(f"peak RSS: {rss:.0f} MiB")
    print(f"fraction of ceiling: {ours_tps / ceiling:.2f} in prompt tokens/s, {computed / t_ours / ceiling:.2f} in "
          f"computed tokens/s ({plain_tps / ceiling:.2f} with every token computed)")
    print(f"speed-up over released path: {ours_tps / ref_tps:.2f}x ({plain_tps / ref_tps:.2f}x with every token computed)")


if __name__ == "__main__":
    main()
