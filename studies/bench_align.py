"""Bench: build the aligned demo model from scratch, time it, and measure its refusals.

    python studies/bench_align.py                     # build the demo model into a temp cache
    python studies/bench_align.py --set method=lora --set lr=2e-4 --out /tmp/lora   # another recipe
    python studies/bench_align.py --model /tmp/lora   # evaluate an existing folder (or an alias)
    python studies/bench_align.py --model /tmp/lora --attack   # plus the implicit-attack robustness

Refusal is the keyword judge (opening mode) on greedy replies of --tokens new tokens, on the
held-out splits (the only sets the recipe may be tuned on), the built-in over-rejection set,
AdvBench (520) and XSTest (safe 250 / unsafe 200); the last two are for reporting only.

--attack fine-tunes a copy of the model on 165 benign Alpaca answers, each prefixed
"Sure, the answer is: " (the implicit attack, docs/paper.md §4.2), with full fine-tuning at each
--attack-lr, and measures how much held-out malicious refusal survives. The Alpaca file is
read at run time from ../shared/data and never copied into the repository.

The machine's load average is sampled while the bench runs and printed with the timings:
on a shared machine the wall time is only comparable at similar load.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import fields
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = {
    "heldout_malicious": None, "heldout_benign": None, "over-rejection": "over-rejection",
    "advbench": f"advbench:{SHARED / 'harmful_behaviors.csv'}",
    "xstest_safe": f"xstest-safe:{SHARED / 'xstest_prompts.csv'}",
    "xstest_unsafe": f"xstest-unsafe:{SHARED / 'xstest_prompts.csv'}",
}
ATTACK_PREFIX = "Sure, the answer is: "


class LoadSampler:
    """Samples the 1-minute load average every few seconds in a background thread."""

    def __init__(self, every: float = 10.0):
        self.samples = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._t.start()

    def _run(self, every):
        while not self._stop.wait(every):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> dict:
        self._stop.set()
        s = self.samples
        return {"mean": round(sum(s) / len(s), 2), "min": round(min(s), 2), "max": round(max(s), 2), "n": len(s)}


def _parse_sets(pairs: list[str]) -> dict:
    from safety_layers.align import AlignConfig

    types = {f.name: f.type for f in fields(AlignConfig)}
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in types:
            sys.exit(f"unknown AlignConfig field {key!r}; fields: {', '.join(types)}")
        t = str(types[key])
        if value.lower() in ("none", "null") and "None" in t:
            out[key] = None
        elif t.startswith("bool"):
            out[key] = value.lower() in ("1", "true", "yes")
        elif t.startswith("int"):
            out[key] = int(value)
        elif t.startswith("float"):
            out[key] = float(value)
        else:
            out[key] = value
    return out


def attack_examples(n: int = 165):
    """The implicit attack: the first ``n`` Alpaca instructions without input, answers prefixed."""
    from safety_layers.align import Example

    rows = json.loads((SHARED / "alpaca_data_1k.json").read_text(encoding="utf-8"))
    rows = [r for r in rows if not r.get("input") and r.get("output")][:n]
    return [Example(r["instruction"], ATTACK_PREFIX + r["output"], "attack") for r in rows]


def evaluate(lm, sets: list[str], tokens: int, progress: bool) -> dict:
    from safety_layers.align.data import heldout_rows, prompt_labels
    from safety_layers.align.run import refusal_rate
    from safety_layers.core.data import load_prompts

    held = dict(zip(("heldout_malicious", "heldout_benign"), heldout_rows()))
    out = {}
    for name in sets:
        labels = None
        if name in held:
            prompts = [r["prompt"] for r in held[name]]
            labels = [prompt_labels(r) for r in held[name]]
        else:
            prompts = load_prompts(SETS[name]).prompts
        t = time.perf_counter()
        r = refusal_rate(lm, prompts, tokens, progress=progress, labels=labels)
        out[name] = {**r, "seconds": round(time.perf_counter() - t, 1)}
        print(f"  {name:18s} refusal {r['rate']:6.1%}  ({r['refused']}/{r['n']})", flush=True)
        for field, groups in r.get("by", {}).items():
            print(f"    by {field}: " + ", ".join(f"{g} {v['refused']}/{v['n']}" for g, v in groups.items()))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="evaluate this folder or alias instead of building")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="build a variant recipe: AlignConfig field overrides (needs --out)")
    ap.add_argument("--out", help="output folder for a --set recipe")
    ap.add_argument("--keep-cache", action="store_true",
                    help="build the demo in the user cache instead of a fresh temp cache")
    ap.add_argument("--sets", default=",".join(SETS), help="comma-separated sets to evaluate")
    ap.add_argument("--tokens", type=int, default=48, help="greedy new tokens per reply")
    ap.add_argument("--attack", action="store_true", help="also measure robustness to the implicit attack")
    ap.add_argument("--attack-lr", default="1e-4,2e-5")
    ap.add_argument("--attack-epochs", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write every number to this file")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)

    tmp = None
    if not args.model and not args.set and not args.keep_cache:
        tmp = tempfile.mkdtemp(prefix="bench-align-cache-")
        os.environ["SAFETY_LAYERS_CACHE"] = tmp  # before the package reads it: a true from-scratch build

    import torch

    torch.set_num_threads(args.threads)
    from safety_layers.align import AlignConfig, SFTSettings, align, read_manifest, train_sft
    from safety_layers.recipes.demo_model import build_demo
    from safety_layers.core.models import load_model

    progress = not args.quiet
    report: dict = {"argv": sys.argv[1:], "threads": args.threads, "cpus": os.cpu_count()}
    load = LoadSampler()
    t0 = time.perf_counter()
    if args.model:
        folder = args.model
    elif args.set:
        if not args.out:
            sys.exit("--set needs --out")
        cfg = AlignConfig(**{"out": args.out, "progress": progress, **_parse_sets(args.set)})
        res = align(cfg)
        folder = res.out
    else:
        folder = str(build_demo(progress=progress, rebuild=bool(args.keep_cache)))
    build_s = time.perf_counter() - t0
    build_load = load.stop()
    manifest = read_manifest(folder) if Path(folder).is_dir() else None
    if manifest:
        report["build"] = {"wall_s": round(build_s, 1), "load": build_load, "seconds": manifest["seconds"],
                           "counts": manifest["counts"], "train": {k: manifest["train"][k] for k in
                                                                   ("steps", "examples", "tokens", "epoch_losses")},
                           "config": manifest["config"]}
        print(f"built {folder} in {build_s:.0f} s wall (load average {build_load['mean']} mean, "
              f"{build_load['min']}-{build_load['max']}, on {os.cpu_count()} CPUs); phases {manifest['seconds']}")
        print(f"  trained on {manifest['train']['examples']} examples, {manifest['train']['tokens']} tokens, "
              f"{manifest['train']['steps']} steps; epoch losses {[round(x, 3) for x in manifest['train']['epoch_losses']]}")

    lm = load_model(folder)
    print(f"refusal (keyword judge, opening mode; greedy, {args.tokens} new tokens) of {folder}:")
    load = LoadSampler()
    t = time.perf_counter()
    report["refusal"] = evaluate(lm, [s for s in args.sets.split(",") if s], args.tokens, progress)
    report["evaluate"] = {"wall_s": round(time.perf_counter() - t, 1), "load": load.stop()}

    if args.attack:
        examples = attack_examples()
        held = ["heldout_malicious", "heldout_benign"]
        report["attack"] = {}
        for lr in [float(x) for x in args.attack_lr.split(",")]:
            victim = copy.deepcopy(lm)
            stats = train_sft(victim, examples, SFTSettings(method="full", lr=lr, epochs=args.attack_epochs,
                                                             batch_size=8, seed=0), progress=progress)
            print(f"after the implicit attack (lr {lr:g}, {args.attack_epochs:g} epochs, {stats.steps} steps, "
                  f"{stats.seconds:.0f} s):")
            report["attack"][f"{lr:g}"] = {"train_s": round(stats.seconds, 1), "losses": stats.epoch_losses,
                                           "refusal": evaluate(victim, held, args.tokens, progress)}
            del victim
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if tmp:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
