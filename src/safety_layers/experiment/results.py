"""Results of an experiment: every metric before and after, the mean over seeds and its interval.

Pure functions of the cells' records; :func:`safety_layers.experiment.runner.write_results`
writes what they return into the run folder.
"""

from __future__ import annotations

import math

METRICS = ("harmful_rate", "over_refusal_rate", "harmful_score", "rouge_l", "win_rate")
METRIC_LABELS = {"harmful_rate": "harmful rate R_h", "over_refusal_rate": "over-refusal rate",
                 "harmful_score": "harmful score S_h", "rouge_l": "Rouge-L",
                 "win_rate": "win rate over the untuned model"}
#: The range each metric lives in; intervals are clipped to it.
METRIC_BOUNDS = {"harmful_rate": (0.0, 1.0), "over_refusal_rate": (0.0, 1.0), "harmful_score": (1.0, 5.0),
                 "rouge_l": (0.0, 1.0), "win_rate": (0.0, 1.0)}
#: Prefix of the lm-eval task columns (``lm_eval:mmlu``): one per task an experiment's evaluate section runs.
LM_EVAL = "lm_eval:"
INTERVAL = "95% Student-t interval of the mean over seeds, clipped to the metric's range (null for one seed)"


def t_interval(values: list[float], level: float = 0.95, bounds: tuple[float, float] | None = None) -> list[float] | None:
    """Student-t interval of the mean (None for fewer than two values), clipped to ``bounds``.

    With the few seeds an experiment affords the interval is wide (t at 1 degree of
    freedom is 12.7); that is the honest width, so it is reported as is.
    """
    n = len(values)
    if n < 2:
        return None
    from scipy.stats import t

    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return [lo, hi]


def _group_keys(cells: list[dict], order) -> list[tuple]:
    """(scenario, method, lr) groups: those of ``order`` (Cells) first, then any other the cells hold."""
    keys: list[tuple] = []
    for c in (order or []):
        k = (c.scenario, c.method, c.lr)
        if k not in keys:
            keys.append(k)
    for c in cells:
        k = (c["scenario"], c["method"], c["lr"])
        if k not in keys:
            keys.append(k)
    return keys


def aggregate(cells: list[dict], before: dict, order: list | None = None) -> dict:
    """Rows of (scenario, method, lr): each metric before, mean after, 95% interval, change.

    ``cells`` are cell.json dicts (only ``done`` ones count); ``before`` maps metric -> the
    untuned model's value; ``order`` (the grid's Cells) fixes the row order. Metrics that no
    cell and no baseline measured are left out.
    """
    done = [c for c in cells if c.get("status") == "done"]
    tasks = sorted({k for c in done for k in (c.get("metrics") or {}) if k.startswith(LM_EVAL)}
                   | {k for k in before if k.startswith(LM_EVAL)})
    metrics = [m for m in METRICS + tuple(tasks) if before.get(m) is not None
               or any((c.get("metrics") or {}).get(m) is not None for c in done)]
    rows = []
    for scen, meth, lr in _group_keys(cells, order):
        group = [c for c in done if (c["scenario"], c["method"], c["lr"]) == (scen, meth, lr)]
        tried = [c for c in cells if (c["scenario"], c["method"], c["lr"]) == (scen, meth, lr)]
        row = {"scenario": scen, "method": meth, "lr": lr, "n_seeds": len(group),
               "seeds": sorted(c["seed"] for c in group),
               "failed": sorted(c["seed"] for c in tried if c.get("status") == "failed"), "metrics": {}}
        for m in metrics:
            vals = [c["metrics"][m] for c in group if (c.get("metrics") or {}).get(m) is not None]
            mean = sum(vals) / len(vals) if vals else None
            b = before.get(m)
            row["metrics"][m] = {"before": b, "after_mean": mean, "after_ci": t_interval(vals, bounds=METRIC_BOUNDS.get(m, (0.0, 1.0))),
                                 "values": vals,
                                 "delta": None if mean is None or b is None else mean - b}
        rows.append(row)
    return {"metrics": metrics, "interval": INTERVAL, "rows": rows}


def fmt_metric(metric: str, x) -> str:
    """A metric's value as the tables print it: rates in percent, scores with three decimals."""
    if x is None:
        return "-"
    if metric.endswith("_rate"):
        return f"{100 * x:.1f}%"
    return f"{x:.3f}"


def _fmt_delta(metric: str, x) -> str:
    if x is None:
        return "-"
    return (f"{100 * x:+.1f} pts" if metric.endswith("_rate") else f"{x:+.3f}")


def results_markdown(results: dict, title: str = "SPPFT experiment") -> str:
    """One table per metric: before, mean after over seeds, its 95% interval, the change."""
    lines = [f"# {title}", "", results.get("interval", ""), ""]
    for m in results["metrics"]:
        lines += [f"## {label(m)}", "",
                  "| scenario | method | lr | seeds | before | after | 95% CI | change |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in results["rows"]:
            v = r["metrics"][m]
            ci = v["after_ci"]
            seeds = str(r["n_seeds"]) + (f" ({len(r['failed'])} failed)" if r["failed"] else "")
            lines.append(f"| {r['scenario']} | {r['method']} | {r['lr']:g} | {seeds} | {fmt_metric(m, v['before'])} | "
                         f"{fmt_metric(m, v['after_mean'])} | "
                         f"{fmt_metric(m, ci[0]) + ' to ' + fmt_metric(m, ci[1]) if ci else '-'} | "
                         f"{_fmt_delta(m, v['delta'])} |")
        lines.append("")
    return "\n".join(lines)


def label(metric: str) -> str:
    if metric.startswith(LM_EVAL):
        return f"lm-eval {metric[len(LM_EVAL):]}"
    return METRIC_LABELS.get(metric, metric)


def lm_eval_metrics(lm_eval: dict | None) -> dict:
    """One score per lm-eval task (``lm_eval:<task>``): its accuracy (``acc``, else ``acc_norm``,
    else the first other number that is not a standard error), as lm-eval reports it."""
    out = {}
    for task, metrics in ((lm_eval or {}).get("results") or {}).items():
        nums = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k}
        pick = next((k for pref in ("acc,", "acc_norm,") for k in nums if k.startswith(pref)), next(iter(nums), None))
        if pick is not None:
            out[f"{LM_EVAL}{task}"] = float(nums[pick])
    return out


def metrics_of(res) -> dict:
    """The headline metrics of an EvaluateResult (None where not measured) and one per lm-eval task."""
    return {"harmful_rate": res.harmful.rate if res.harmful else None,
            "over_refusal_rate": res.over_refusal.rate if res.over_refusal else None,
            "harmful_score": res.harmful.harmful_score if res.harmful else None,
            "rouge_l": res.quality.rouge_l if res.quality else None, **lm_eval_metrics(res.lm_eval)}


def counts_of(res) -> dict:
    """The counts behind the rates of an EvaluateResult (cell.json keeps them beside the metrics)."""
    out = {}
    for key, r in (("harmful", res.harmful), ("over_refusal", res.over_refusal)):
        if r is not None:
            out[key] = {"count": r.count, "decided": r.decided, "n": r.n, "judge": r.judge}
    if res.quality is not None:
        out["quality"] = {"n": res.quality.n}
    return out


def describe_metrics(m: dict) -> str:
    parts = [f"{label(k)} {fmt_metric(k, v)}" for k, v in m.items() if v is not None]
    return ", ".join(parts) or "no metric measured"
