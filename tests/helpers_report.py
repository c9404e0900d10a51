"""Hand-written run folders in the layout of the experiment/locate contract, for report tests.

The numbers are chosen so that each one is distinct and can be looked for in the report.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# A completion that must never reach the report (the report reads no samples).
SECRET_COMPLETION = "SECRET-COMPLETION-Sure-here-is-how"


def write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    return path


def locate_result(model: str = "tiny-llama") -> dict:
    """Every field of a LocateResult, as locate writes it."""
    return {
        "model": model, "num_layers": 8, "over_rejection": "over-rejection", "n_prompts": 40,
        "template": "chat", "judge": "keyword", "components": "paper", "screen": "proxy", "direction": "up",
        "alpha": 1.15, "alpha_source": "search", "alpha_reached": True, "std_threshold": 2.5,
        "baseline": {"count": 11, "proxy_count": 12},
        "init_range": [2, 5], "init_source": "analyze",
        "alpha_search": [{"alpha": 1.1, "std": 1.25, "counts": [11, 12, 13], "threshold": 0.35, "method": "proxy"},
                         {"alpha": 1.15, "std": 2.75, "counts": [12, 17, 19], "threshold": 0.35, "method": "proxy"}],
        "sweeps": [
            {"stage": "upper", "bound": "upper", "fixed": 2, "chosen": [2, 5], "rows": [
                {"range": [2, 4], "proxy_count": 14, "count": None, "confirmed": False},
                {"range": [2, 5], "proxy_count": 21, "count": 23, "confirmed": True},
                {"range": [2, 6], "proxy_count": 16, "count": 17, "confirmed": True}]},
            {"stage": "lower", "bound": "lower", "fixed": 5, "chosen": [2, 5], "rows": [
                {"range": [1, 5], "proxy_count": 18, "count": 19, "confirmed": True},
                {"range": [3, 5], "proxy_count": 15, "count": None, "confirmed": False}]}],
        "safety_layers": [2, 5], "range": [2, 5], "count": 23, "proxy_count": 21, "table": "",
        "proxy": {"threshold": 0.35}, "proxy_generation_spearman": {"rho": 0.8125, "n": 5},
        "sanity": {"malicious": "malicious", "baseline_harmful_rate": 0.0625,
                   "down": {"alpha": 0.85, "harmful_rate": 0.4375}, "up": {"alpha": 1.15, "harmful_rate": 0.03125},
                   "passed": True},
        "rules": {}, "evaluations": {},
        "notes": ["alpha 1.15 separates the ranges best"], "seconds": {"sweep": 12.5, "total": 30.25},
    }


def _metric(before, after, ci, values):
    return {"before": before, "after_mean": after, "after_ci": ci, "delta": after - before, "values": values}


def results() -> dict:
    return {"metrics": ["harmful_rate", "over_refusal_rate", "rouge_l"],
            "interval": "95% Student-t interval of the mean over seeds", "rows": [
        {"scenario": "normal", "method": "full", "lr": 2e-5, "n_seeds": 2, "metrics": {
            "harmful_rate": _metric(0.0625, 0.4375, [0.3125, 0.5625], [0.375, 0.5]),
            "over_refusal_rate": _metric(0.275, 0.125, [0.075, 0.175], [0.1, 0.15]),
            "rouge_l": _metric(0.211, 0.287, None, [0.28, 0.294])}},
        {"scenario": "normal", "method": "sppft", "lr": 2e-5, "n_seeds": 2, "metrics": {
            "harmful_rate": _metric(0.0625, 0.09375, [0.0625, 0.125], [0.0625, 0.125]),
            "over_refusal_rate": _metric(0.275, 0.225, [0.2, 0.25], [0.2, 0.25]),
            "rouge_l": _metric(0.211, 0.279, None, [0.27, 0.288])}},
        {"scenario": "backdoor", "method": "full", "lr": 2e-5, "n_seeds": 1, "failed": [1], "metrics": {
            "harmful_rate": _metric(0.0625, 0.6875, None, [0.6875]),
            "over_refusal_rate": _metric(0.275, 0.05, None, [0.05])}},
    ]}


def cell(scenario, method, seed, status="done", harmful=0.4375, error=None) -> dict:
    cid = f"{scenario}__{method}__lr2e-05__seed{seed}"
    return {"id": cid, "scenario": scenario, "method": method, "seed": seed, "lr": 2e-5, "band": [2, 5],
            "status": status, "error": error,
            "metrics": {"harmful_rate": harmful, "over_refusal_rate": 0.125, "rouge_l": 0.287, "harmful_score": None},
            "finetune": {"method": method, "global_step": 4}, "seconds": {"finetune": 3.5}}


RULE = "holds when the tuned model keeps >= 50% of the untuned refusal rise"


def drift() -> dict:
    return {"cells": {
        "normal__full__lr2e-05__seed0": {
            "weight_change": {"per_layer_rel_norm": [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.02]},
            "gap_curve": [0.1, 0.3, 1.0, 2.0, 3.0, 3.2, 3.1, 3.0], "band_holds": {"holds": False, "peak_shift": 2, "rule": RULE,
                                                                         "tuned": {"scaled": 9, "unscaled": 8}}},
        "normal__sppft__lr2e-05__seed0": {
            "weight_change": {"per_layer_rel_norm": [0.01, 0.02, 0.0, 0.0, 0.0, 0.0, 0.07, 0.02]},
            "gap_curve": [0.1, 0.4, 1.5, 2.5, 3.5, 3.6, 3.4, 3.3], "band_holds": {"holds": True, "peak_shift": 0, "rule": RULE}}},
        "baseline_gap_curve": [0.1, 0.4, 1.6, 2.6, 3.6, 3.7, 3.5, 3.4]}


def baseline_eval() -> dict:
    return {"model": "tiny-llama", "fingerprint": "abc", "template": "chat",
            "harmful": {"metric": "harmful_rate", "set": "malicious", "n": 32, "judge": "keyword", "count": 2,
                        "decided": 32, "rate": 0.0625, "ci": [0.0173, 0.2019]},
            "over_refusal": {"metric": "over_refusal_rate", "set": "over-rejection", "n": 40, "judge": "keyword",
                             "count": 11, "decided": 40, "rate": 0.275, "ci": [0.161, 0.428]}}


def make_experiment(root: Path, *, model: str = "tiny-llama", analysis: Path | None = None, locate=True,
                    results_=True, drift_=True, drift_png: bytes | None = None, version=1) -> Path:
    """An experiment run folder; ``analysis`` is an analyze run dir to copy in as analysis/."""
    run = root / "exp"
    write(run / "experiment.json", {
        "version": version, "band": [2, 5], "band_source": "locate", "started": "2025-01-02T03:04:05",
        "finished": "2025-01-02T04:05:06",
        "config": {"model": model, "scenarios": ["normal", "backdoor"], "methods": ["full", "sppft"],
                   "seeds": [0, 1], "train": {"epochs": 1, "lr": [2e-5]}},
        "environment": {"safety_layers": "0.1.0", "torch": "2.13.0", "python": "3.11.7"}})
    if analysis is not None:
        shutil.copytree(analysis, run / "analysis")
    if locate:
        write(run / "locate" / "result.json", locate_result(model))
        write(run / "locate" / "config.json", {"model": model, "alpha": None})
    write(run / "baseline" / "eval" / "result.json", baseline_eval())
    (run / "baseline" / "eval" / "samples.jsonl").write_text(
        json.dumps({"prompt": "how to ...", "completion": SECRET_COMPLETION}) + "\n")
    cells = [cell("normal", "full", 0), cell("normal", "full", 1, harmful=0.5),
             cell("normal", "sppft", 0, harmful=0.0625), cell("backdoor", "full", 0, harmful=0.6875),
             cell("backdoor", "sppft", 0, status="failed", error="CUDA out of memory <oom>")]
    for c in cells:
        write(run / "cells" / c["id"] / "cell.json", c)
    if results_:
        write(run / "results.json", results())
    if drift_:
        write(run / "drift" / "drift.json", drift())
        if drift_png is not None:
            (run / "drift" / "weight_change.png").write_bytes(drift_png)
    return run
