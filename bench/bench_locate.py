"""Localization cost: one candidate our way vs the released code's way, then a whole ``locate``.

(a) One candidate (a band scaled by alpha) on the same over-rejection prompts, counted three ways:

  ours, proxy:       scale the band in place, first-token proxy in batches (one forward per
                     prompt), threshold calibrated as ``locate`` does (not timed: once per run);
  ours, generation:  scale in place, batched greedy generation of 16 tokens, keyword judge;
  released code:     ``copy.deepcopy`` of the model, scale the copy's q,k,v,o,gate,up,down weights,
                     ``model.generate`` one prompt at a time (16 greedy tokens), keyword judge.

It prints each path's time, the speed-up over the released path and whether the refusal counts
agree (the goal is >= 10x at identical generation counts; the proxy's count is an estimate).

(b) A full ``locate`` with default settings (``--limit`` prompts per set), its wall time, the
sweep table and the time split. Completions are never printed.

Usage: python bench/bench_locate.py [--model demo] [--limit 100] [--range auto] [--alpha 1.2]
       [--template chat] [--skip-full]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from safety_layers.core.data import load_prompts  # noqa: E402
from safety_layers.core.errors import SafetyLayersError  # noqa: E402
from safety_layers.engine.generation import GenerationSettings, generate, stop_token_ids  # noqa: E402
from safety_layers.core.layers import LayerRange  # noqa: E402
from safety_layers.locate import LocateConfig, locate, print_summary  # noqa: E402
from safety_layers.core.models import PAPER_COMPONENTS, find_blocks, load_model  # noqa: E402
from safety_layers.core.prompts import render  # noqa: E402
from safety_layers.judges.proxy import FirstTokenProxy  # noqa: E402
from safety_layers.judges import get_judge  # noqa: E402
from safety_layers.core.scaling import scaled_layers  # noqa: E402

TOKENS = 16


def released_path(lm, prompts: list[str], band: LayerRange, alpha: float, template: str, judge) -> int:
    """The released code's candidate: deep copy, scale the copy, generate one prompt at a time, judge."""
    model = copy.deepcopy(lm.model)
    blocks = find_blocks(model)
    with torch.no_grad():
        for i in band.indices:
            for w in blocks.weights(i, PAPER_COMPONENTS).values():
                w.mul_(alpha)
    stop = stop_token_ids(model, lm.tokenizer)
    texts = []
    for p in prompts:
        r = render(lm.tokenizer, p, template)
        ids = lm.tokenizer(r.text, add_special_tokens=r.add_special_tokens, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=TOKENS, do_sample=False,
                                 eos_token_id=stop, pad_token_id=stop[0])
        texts.append(lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    del model
    return sum(v.refused for v in judge.judge(prompts, texts))


def calibrated_proxy(lm, over: list[str], mal: list[str], template: str, judge) -> tuple[FirstTokenProxy, str]:
    """The proxy with ``locate``'s threshold: unscaled model, over-rejection + malicious pooled."""
    proxy = FirstTokenProxy(lm, template=template)
    prompts = over + mal
    comps = generate(lm, prompts, GenerationSettings(max_new_tokens=TOKENS), template=template, cache=False,
                     progress=False)
    refused = [v.refused for v in judge.judge(prompts, [c.text for c in comps])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proxy.calibrate(prompts, refused)
    note = "" if 0 < sum(refused) < len(refused) else (
        f" (the unscaled model refuses {sum(refused)} of {len(refused)} calibration prompts: the threshold is "
        "degenerate and locate would screen by generation instead)")
    return proxy, note


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo", help="model alias, folder or .gguf (default: demo)")
    ap.add_argument("--limit", type=int, default=100, help="prompts per set")
    ap.add_argument("--range", default="auto",
                    help="candidate band for (a), 0-based inclusive (auto: 20%%-40%% of the depth)")
    ap.add_argument("--alpha", type=float, default=1.2, help="candidate alpha for (a)")
    ap.add_argument("--template", default="chat", help="prompt template for every path")
    ap.add_argument("--skip-full", action="store_true", help="only (a)")
    args = ap.parse_args()

    lm = load_model(args.model)
    n_layers = lm.num_layers
    band = (LayerRange(round(0.2 * n_layers), round(0.4 * n_layers)) if args.range == "auto"
            else LayerRange.parse(args.range)).check(n_layers)
    over = load_prompts("over-rejection", args.limit).prompts
    mal = load_prompts("malicious", args.limit).prompts
    judge = get_judge("keyword")
    print(f"model {lm.name} ({n_layers} layers), {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.2f}; {len(over)} over-rejection prompts, template {args.template}, "
          f"{TOKENS} new tokens, keyword judge")

    # ---------------------------------------------------------------- (a) one candidate
    proxy, note = calibrated_proxy(lm, over, mal, args.template, judge)
    print(f"\n(a) candidate {band} x{args.alpha:g}; proxy threshold {proxy.threshold:.4g}{note}")

    t = time.perf_counter()
    with scaled_layers(lm, band, args.alpha):
        proxy_count = sum(proxy.judge(over))
    t_proxy = time.perf_counter() - t

    t = time.perf_counter()
    with scaled_layers(lm, band, args.alpha):
        comps = generate(lm, over, GenerationSettings(max_new_tokens=TOKENS), template=args.template, cache=False,
                         progress=False)
        gen_count = sum(v.refused for v in judge.judge(over, [c.text for c in comps]))
    t_gen = time.perf_counter() - t

    t = time.perf_counter()
    released = released_path(lm, over, band, args.alpha, args.template, judge)
    t_rel = time.perf_counter() - t

    print(f"{'path':52} {'seconds':>8} {'speed-up':>9} {'refusals':>9}")
    for name, sec, count in [("released: deepcopy + generate one at a time + judge", t_rel, released),
                             ("ours: in-place scaling + batched generation + judge", t_gen, gen_count),
                             ("ours: in-place scaling + batched first-token proxy", t_proxy, proxy_count)]:
        print(f"{name:52} {sec:8.2f} {t_rel / sec:8.1f}x {count:9d}")
    print(f"generation counts identical (ours vs released): {'yes' if gen_count == released else 'NO'} "
          f"({gen_count} vs {released}); proxy estimate {proxy_count} "
          f"({'equal' if proxy_count == released else f'off by {proxy_count - released:+d}'})")
    goal = t_rel / t_proxy
    print(f"goal >= 10x per candidate: proxy {goal:.1f}x ({'met' if goal >= 10 else 'NOT met'}), "
          f"generation {t_rel / t_gen:.1f}x")

    # ---------------------------------------------------------------- (b) a full locate
    if args.skip_full:
        return
    with tempfile.TemporaryDirectory() as tmp:
        cfg = LocateConfig(model=args.model, limit=args.limit, template=args.template, cache=False, progress=False)
        print(f"\n(b) full locate: {lm.name}, limit {args.limit}, default settings (generation cache off)")
        t = time.perf_counter()
        try:
            result = locate(cfg, model=lm, run_dir=Path(tmp) / "run")
        except SafetyLayersError as e:
            print(f"locate stopped after {time.perf_counter() - t:.1f} s: {e}")
            return
        wall = time.perf_counter() - t
        print_summary(result)
        print(result.table)
        ev = result.evaluations
        print(f"wall time {wall:.1f} s ({wall / 60:.1f} min); counts taken: {ev['proxy']} by proxy, "
              f"{ev['generation']} by generation; time split (s): "
              + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()))
    print(f"load average at the end {os.getloadavg()[0]:.2f} (other processes skew timings)")


if __name__ == "__main__":
    main()
