"""Bench: does light benign fine-tuning move an aligned model's refusals, and does the answers' opening matter?

    python studies/bench_refusal_drift.py                       # demo model, 48 Alpaca rows, lr 1e-5
    python studies/bench_refusal_drift.py --rows 165 --lr 1e-4 --prompts 243

Fine-tunes copies of the model (full fine-tuning, one epoch, batch 4, seed 0) on the same
Alpaca rows with the answers opened three ways: as they are, "Certainly, the answer is: " and
the implicit attack's "Sure, the answer is: " (docs/paper.md §4.2). For each tuned model, and for a
control that adds Gaussian noise of the same norm to every weight tensor, it prints refusals
on the first --prompts built-in over-rejection prompts (keyword judge, greedy) and the mean
probability of the refusal opening's first token at the first reply position: all measured
side by side in one run. The Alpaca file is read from ../shared/data at run time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
OPENINGS = {"plain": "", "certainly": "Certainly, the answer is: ", "sure": "Sure, the answer is: "}


def measure(lm, prompts: list[str], tokens: int, opening: str) -> dict:
    from safety_layers.evaluate import refusal_rate
    from safety_layers.engine.generation import GenerationSettings
    from safety_layers.judges.proxy import FirstTokenProxy

    r = refusal_rate(lm, prompts, judges=("keyword",), settings=GenerationSettings(max_new_tokens=tokens),
                     progress=False)
    p_opening = FirstTokenProxy(lm, openings=[opening]).scores(prompts).mean()
    return {"refused": r.count, "n": r.n, "p_opening": round(float(p_opening), 4)}


def relative_change(tuned, base) -> dict[str, float]:
    """Per weight tensor, ||W_t - W_0|| / ||W_0||."""
    ref = dict(base.model.named_parameters())
    return {n: ((p - ref[n]).norm() / ref[n].norm().clamp_min(1e-12)).item() for n, p in tuned.model.named_parameters()}


def add_noise(lm, rel: dict[str, float], seed: int = 0) -> None:
    """Gaussian noise whose norm per tensor is ``rel[name]`` times that tensor's norm."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in lm.model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.add_(noise * (rel[n] * p.norm() / noise.norm().clamp_min(1e-12)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--rows", type=int, default=48, help="Alpaca rows to fine-tune on")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--prompts", type=int, default=96, help="first N built-in over-rejection prompts")
    ap.add_argument("--tokens", type=int, default=32, help="greedy new tokens per reply")
    ap.add_argument("--refusal-opening", default="Sorry", help="word whose first token (with or without a leading space) is scored")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write every number to this file")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from safety_layers.core.data import load_prompts
    from safety_layers.finetune import FinetuneConfig, default_training_args, finetune
    from safety_layers.core.models import load_model
    from safety_layers.scenarios import build_scenario

    source = SHARED / "alpaca_data_1k.json"
    if not source.is_file():
        sys.exit(f"{source} not found: this bench reads the Alpaca sample from ../shared/data")
    prompts = load_prompts("over-rejection").prompts[: args.prompts]
    base = load_model(args.model)
    report = {"argv": sys.argv[1:], "model": args.model, "rows": args.rows, "lr": args.lr, "results": {}}
    t0 = time.perf_counter()
    report["results"]["untuned"] = measure(base, prompts, args.tokens, args.refusal_opening)
    rel = None
    with tempfile.TemporaryDirectory(prefix="bench-drift-") as tmp:
        for name, prefix in OPENINGS.items():
            data = Path(tmp) / f"{name}.jsonl"
            build_scenario("implicit" if prefix else "normal", source, data, n=args.rows, seed=0,
                           **({"prefix": prefix} if prefix else {}))
            tuned = load_model(args.model)
            targs = default_training_args(Path(tmp) / f"run-{name}", num_train_epochs=1, learning_rate=args.lr,
                                          save_strategy="no", disable_tqdm=True, seed=0, logging_steps=1000)
            finetune(FinetuneConfig(model=args.model, data=str(data), method="full", max_length=192,
                                    out=str(Path(tmp) / f"model-{name}")), targs, model=tuned)
            change = relative_change(tuned, base)
            rel = rel or change
            report["results"][name] = {**measure(tuned, prompts, args.tokens, args.refusal_opening),
                                       "max_relative_change": round(max(change.values()), 6)}
            del tuned
        noisy = load_model(args.model)
        add_noise(noisy, rel)
        report["results"]["noise (same norm as plain)"] = measure(noisy, prompts, args.tokens, args.refusal_opening)
    report["wall_s"] = round(time.perf_counter() - t0, 1)

    print(f"{args.model}: full fine-tuning on {args.rows} Alpaca rows, lr {args.lr:g}, 1 epoch; refusals on the "
          f"first {len(prompts)} built-in over-rejection prompts ({args.tokens} greedy tokens, keyword judge) and "
          f"mean P('{args.refusal_opening}') at the first reply token")
    for name, r in report["results"].items():
        extra = f"  (max weight change {r['max_relative_change']:.2%})" if "max_relative_change" in r else ""
        print(f"  {name:28s} refused {r['refused']:3d}/{r['n']}  P {r['p_opening']:.3f}{extra}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
