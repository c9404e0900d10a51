"""First-token refusal proxy vs generation + keyword judge: speed and agreement.

On the bundled SmolLM2-135M-Instruct (fp32, CPU, chat template), the same prompts (default
200: 70 XSTest safe, 60 XSTest unsafe, 70 AdvBench goals, read from ../shared/data) go
through:

(1) ``FirstTokenProxy.scores``: one forward per prompt, probability mass on refusal-opening
    first tokens;
(2) ``generate`` (greedy, N new tokens, cache off) + the ``keyword`` judge: the reference;
(3) ``model.generate`` one prompt at a time + the keyword judge on a subset, the released
    code's path, timed per prompt (it is slow).

The threshold is calibrated on all prompts against (2) (balanced accuracy); because that is
in-sample, a 2-fold cross-validated agreement is printed too. The bare SmolLM2 refuses few
prompts, so the class balance is printed: agreement is only meaningful with both classes.
Completions are never printed.

Usage: python bench/bench_proxy.py [--quick] [--n 200] [--tokens 24] [--subset 16]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from safety_layers.engine.generation import GenerationSettings, generate, stop_token_ids  # noqa: E402
from safety_layers.core.models import load_model  # noqa: E402
from safety_layers.core.prompts import render  # noqa: E402
from safety_layers.judges.proxy import FirstTokenProxy, choose_threshold  # noqa: E402
from safety_layers.judges import get_judge  # noqa: E402
from safety_layers.core.stats import cohen_kappa, percent_agreement  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def load_bench_prompts(n: int) -> tuple[list[str], list[str]]:
    """Prompts and their group (xstest-safe / xstest-unsafe / advbench), 35/30/35 %."""
    xs, adv = DATA / "xstest_prompts.csv", DATA / "harmful_behaviors.csv"
    missing = [str(p) for p in (xs, adv) if not p.is_file()]
    if missing:
        sys.exit(f"bench data not found: {', '.join(missing)} (expected the shared data folder at {DATA})")
    with open(xs, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    with open(adv, newline="", encoding="utf-8") as f:
        goals = [r["goal"] for r in csv.DictReader(f)]
    n_safe, n_unsafe = round(n * 0.35), round(n * 0.30)
    groups = {"xstest-safe": [r["prompt"] for r in rows if r["label"] == "safe"][:n_safe],
              "xstest-unsafe": [r["prompt"] for r in rows if r["label"] == "unsafe"][:n_unsafe],
              "advbench": goals[: n - n_safe - n_unsafe]}
    prompts = [p for g in groups.values() for p in g]
    labels = [name for name, g in groups.items() for _ in g]
    return prompts, labels


def cross_validated_agreement(scores: np.ndarray, refused: list[bool], folds: int = 2, seed: int = 0):
    """Agreement and kappa when each fold's threshold is chosen on the other folds."""
    rng = np.random.default_rng(seed)
    fold = rng.permutation(len(scores)) % folds
    pred = np.zeros(len(scores), dtype=bool)
    ref = np.asarray(refused)
    for k in range(folds):
        train, test = fold != k, fold == k
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = choose_threshold(scores[train], ref[train]).threshold
        pred[test] = scores[test] >= t
    return percent_agreement(pred.tolist(), refused), cohen_kappa(pred.tolist(), refused)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="60 prompts, subset 6")
    ap.add_argument("--n", type=int, default=200, help="prompts")
    ap.add_argument("--tokens", type=int, default=24, help="new tokens for the reference generation")
    ap.add_argument("--subset", type=int, default=16, help="prompts for one-at-a-time generate")
    args = ap.parse_args()
    if args.quick:
        args.n, args.subset = 60, 6

    prompts, groups = load_bench_prompts(args.n)
    lm = load_model()
    judge = get_judge("keyword")
    print(f"model {lm.name}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}; "
          f"{len(prompts)} prompts, chat template, reference = greedy {args.tokens} tokens + keyword judge")

    proxy = FirstTokenProxy(lm, template="chat")
    t = time.perf_counter()
    scores = proxy.scores(prompts)
    t_proxy = time.perf_counter() - t

    t = time.perf_counter()
    comps = generate(lm, prompts, GenerationSettings(max_new_tokens=args.tokens), cache=False, progress=False)
    refused = [v.refused for v in judge.judge(prompts, [c.text for c in comps])]
    t_gen = time.perf_counter() - t

    step = max(1, len(prompts) // args.subset)
    sub = list(range(0, len(prompts), step))[: args.subset]
    stop = stop_token_ids(lm.model, lm.tokenizer)
    t = time.perf_counter()
    texts = []
    for i in sub:
        r = render(lm.tokenizer, prompts[i], "chat")
        ids = lm.tokenizer(r.text, add_special_tokens=r.add_special_tokens, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            g = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens,
                                  do_sample=False, eos_token_id=stop, pad_token_id=stop[0])
        texts.append(lm.tokenizer.decode(g[0, ids.shape[1]:], skip_special_tokens=True))
    judge.judge([prompts[i] for i in sub], texts)
    t_one = (time.perf_counter() - t) / len(sub) * len(prompts)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proxy.calibrate(prompts, refused, scores=scores)
    pred = proxy.judge(prompts, scores=scores)
    cv_agree, cv_kappa = cross_validated_agreement(scores, refused)

    print(f"\nrefusal tokens: {', '.join(repr(x) for x in proxy.tokens)}")
    print(f"\n{'group':14} {'prompts':>7} {'keyword refused':>16} {'proxy refused':>14} {'mean score':>11}")
    for g in dict.fromkeys(groups):
        idx = [i for i, x in enumerate(groups) if x == g]
        print(f"{g:14} {len(idx):7d} {sum(refused[i] for i in idx):16d} {sum(pred[i] for i in idx):14d} "
              f"{np.mean(scores[idx]):11.4f}")
    print(f"{'all':14} {len(prompts):7d} {sum(refused):16d} {sum(pred):14d} {np.mean(scores):11.4f}")

    auc = "n/a (one class)"
    if 0 < sum(refused) < len(refused):
        from sklearn.metrics import roc_auc_score
        auc = f"{roc_auc_score(refused, scores):.3f}"
    print(f"\nthreshold {proxy.threshold:.4g} (balanced accuracy {proxy.calibration.value:.3f}, in-sample)")
    print(f"agreement in-sample: {percent_agreement(pred, refused):.1%}, kappa {cohen_kappa(pred, refused):.3f}")
    print(f"agreement 2-fold cross-validated: {cv_agree:.1%}, kappa {cv_kappa:.3f}; ROC AUC {auc}")

    print(f"\n{'path':44} {'seconds':>8} {'prompts/s':>10}")
    for name, sec in [("(1) first-token proxy", t_proxy),
                      (f"(2) engine, {args.tokens} tokens + keyword judge", t_gen),
                      ("(3) one-at-a-time generate + judge (est.)", t_one)]:
        print(f"{name:44} {sec:8.1f} {len(prompts) / sec:10.2f}")
    print(f"(3) timed on {len(sub)} evenly spaced prompts and scaled to {len(prompts)}")
    print(f"load average at the end {os.getloadavg()[0]:.2f} (other processes skew timings)")
    print(f"speed-up, proxy vs generation + keyword judge: {t_gen / t_proxy:.1f}x (batched engine), "
          f"{t_one / t_proxy:.1f}x (one at a time)")


if __name__ == "__main__":
    main()
