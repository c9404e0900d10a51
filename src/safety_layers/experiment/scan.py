"""Band-protection scan: which band, if any, keeps the model safe when it is frozen during an attack?

The paper tests "freezing the located band keeps safety" against two other bands (Tab.8).
The scan tests it against every band of the same width: an experiment method family that
expands, once the model's layer count is known, into one ``freeze-A-B`` method per window
and into seeded random non-contiguous layer sets of the same size (the control that a band's
position, not only how many layers it freezes, matters). Full fine-tuning is the ordinary
``full`` method. Every window is one experiment cell, so a scan resumes like any experiment,
and everything that does not depend on the window is shared by the cells: the scenario's
training file, the untuned model, its (pre-attack) evaluation and the band/analyze runs.

Method specs (``methods:`` of an experiment):

- ``scan:W`` or ``scan:W/S``: every window of width ``W`` at stride ``S`` (default 1), i.e.
  ``freeze-0-(W-1)``, ``freeze-S-(S+W-1)``, ...;
- ``random:W`` or ``random:WxK`` or ``random:WxK@SEED``: ``K`` (default 3) random sets of
  ``W`` layers that are not contiguous, drawn with ``SEED`` (default 0); each becomes a
  method ``freeze-set-a.b.c...``.

:func:`write_scan` turns the finished cells into ``scan/scan.json``, ``scan/scan.md`` and one
plot per scenario and learning rate: the harmful rate after the attack against the window's
position, the located band and the analyze range marked, full fine-tuning and the random sets
as reference lines.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from ..core.errors import SafetyLayersError
from ..core.layers import LayerRange

_SCAN = re.compile(r"scan[:-](\d+)(?:/(\d+))?")
_RANDOM = re.compile(r"random[:-](\d+)(?:x(\d+))?(?:@(\d+))?")
_SET = re.compile(r"freeze-set-(\d+(?:\.\d+)+)")
#: Random sets drawn per ``random:W`` spec when it names no count.
DEFAULT_RANDOM = 3


# --------------------------------------------------------------------------- method specs

def _scan_parts(spec: str) -> tuple[int, int] | None:
    m = _SCAN.fullmatch(spec)
    if not m:
        return None
    width, stride = int(m.group(1)), int(m.group(2) or 1)
    if width < 1:
        raise SafetyLayersError(f"{spec}: the window width must be at least 1 layer, e.g. scan:5")
    if stride < 1:
        raise SafetyLayersError(f"{spec}: the stride must be at least 1 layer (scan:W/S, e.g. scan:5/1)")
    return width, stride


def _random_parts(spec: str) -> tuple[int, int, int] | None:
    m = _RANDOM.fullmatch(spec)
    if not m:
        return None
    width, count, seed = int(m.group(1)), int(m.group(2) or DEFAULT_RANDOM), int(m.group(3) or 0)
    if width < 2:
        raise SafetyLayersError(f"{spec}: a random non-contiguous set needs at least 2 layers, e.g. random:5x3")
    if count < 1:
        raise SafetyLayersError(f"{spec}: draw at least one set (random:WxK with K >= 1)")
    return width, count, seed


def family_label(spec: str) -> str | None:
    """The canonical label of a scan or random-set spec (``scan:5/1``, ``random:5x3@0``), else None.

    A label of one expanded random set (``freeze-set-1.4.9``) is returned as it is."""
    s = str(spec).strip()
    if (p := _scan_parts(s)) is not None:
        return f"scan:{p[0]}/{p[1]}"
    if (r := _random_parts(s)) is not None:
        return f"random:{r[0]}x{r[1]}@{r[2]}"
    if (layers := set_layers(s)) is not None:
        return set_label(layers)
    return None


def set_label(layers) -> str:
    return "freeze-set-" + ".".join(str(i) for i in sorted(layers))


def set_layers(method: str) -> list[int] | None:
    """The layers of a ``freeze-set-a.b.c`` method, else None."""
    m = _SET.fullmatch(method)
    if not m:
        return None
    layers = sorted({int(x) for x in m.group(1).split(".")})
    if len(layers) < 2:
        raise SafetyLayersError(f"{method}: a layer set needs at least 2 distinct layers")
    return layers


def windows(width: int, stride: int, num_layers: int) -> list[LayerRange]:
    """Every window of ``width`` layers at ``stride``, from layer 0 while it fits the model."""
    if stride < 1:
        raise SafetyLayersError(f"the scan's stride is {stride}: it must be at least 1 layer (e.g. scan:5/1)")
    if width < 1:
        raise SafetyLayersError(f"the scan's window width is {width}: it must be at least 1 layer")
    if width > num_layers:
        raise SafetyLayersError(f"the scan's window ({width} layers) is wider than the model ({num_layers} decoder "
                                f"layers): choose a width of at most {num_layers}")
    return [LayerRange(s, s + width - 1) for s in range(0, num_layers - width + 1, stride)]


def random_sets(width: int, count: int, seed: int, num_layers: int) -> list[list[int]]:
    """``count`` distinct sets of ``width`` layers, none of them contiguous, drawn with ``seed``."""
    if width >= num_layers:
        raise SafetyLayersError(f"a random set of {width} layers cannot be non-contiguous in a model of {num_layers} "
                                f"decoder layers: choose a width of at most {num_layers - 1}")
    rng = random.Random(seed)
    out: list[list[int]] = []
    for _ in range(1000 * count):
        s = sorted(rng.sample(range(num_layers), width))
        if s[-1] - s[0] + 1 != width and s not in out:
            out.append(s)
            if len(out) == count:
                return out
    raise SafetyLayersError(f"could not draw {count} distinct non-contiguous sets of {width} of {num_layers} "
                            "layers: draw fewer sets")


def expand(methods: list[str], num_layers: int) -> list[str]:
    """The experiment's methods with every scan and random spec replaced by its cells' methods,
    in order and without repeats; a window too wide for the model is an error here, before any
    training."""
    out: list[str] = []
    for m in methods:
        if (p := _scan_parts(m)) is not None:
            new = [f"freeze-{w.start}-{w.end}" for w in windows(p[0], p[1], num_layers)]
        elif (r := _random_parts(m)) is not None:
            new = [set_label(s) for s in random_sets(r[0], r[1], r[2], num_layers)]
        else:
            if (layers := set_layers(m)) is not None and layers[-1] >= num_layers:
                raise SafetyLayersError(f"{m}: layer {layers[-1]} is outside the model ({num_layers} decoder layers)")
            new = [m]
        out += [x for x in new if x not in out]
    return out


def is_family(method: str) -> bool:
    return _scan_parts(method) is not None or _random_parts(method) is not None


# --------------------------------------------------------------------------- one cell

def freeze_set(prep, layers: list[int]) -> None:
    """Freeze a non-contiguous layer set in a prepared full fine-tuning run (before it trains).

    The Trainer builds its optimizer from the parameters that require gradients when training
    starts, so the set stays out of it; the freeze check is swapped for one that watches the set.
    """
    from ..finetune.callbacks import freeze_check_class
    from ..finetune.methods import FreezePlan, freeze

    frozen = freeze(prep.lm.blocks, layers, norms=prep.cfg.freeze_norms)
    check = freeze_check_class()(frozen)
    prep.trainer.remove_callback(prep.check)
    prep.trainer.add_callback(check)
    prep.check = check
    params = list(prep.model.parameters())
    fr = [p for p in params if not p.requires_grad]
    tr = [p for p in params if p.requires_grad]
    prep.plan = FreezePlan("freeze-set", None, sorted(frozen), len(fr), sum(p.numel() for p in fr), len(tr),
                           sum(p.numel() for p in tr), sum(p.numel() for p in params))


# --------------------------------------------------------------------------- the table and the plot

def _window_of(method: str) -> LayerRange | None:
    m = re.fullmatch(r"freeze-(\d+)-(\d+)", method)
    return LayerRange(int(m.group(1)), int(m.group(2))) if m else None


def _point(row: dict, metric: str) -> dict:
    v = (row.get("metrics") or {}).get(metric) or {}
    return {"mean": v.get("after_mean"), "ci": v.get("after_ci"), "values": v.get("values") or [],
            "before": v.get("before")}


def scan_rows(results: dict) -> list[dict]:
    """One row per (scenario, lr, method) of a scan: the kind (window, random, full, other), the
    layers frozen, and the harmful rate and Rouge-L after the attack (mean, interval, per seed)."""
    out = []
    for r in results.get("rows") or []:
        method, win, layers = r["method"], _window_of(r["method"]), set_layers(r["method"])
        kind = "window" if win else "random" if layers else "full" if method == "full" else "other"
        out.append({"scenario": r["scenario"], "lr": r["lr"], "method": method, "kind": kind,
                    "layers": win.indices if win else layers, "n_seeds": r.get("n_seeds", 0),
                    "harmful_rate": _point(r, "harmful_rate"), "rouge_l": _point(r, "rouge_l")})
    return out


def is_scan(results: dict) -> bool:
    """Whether an experiment's results hold a scan: random sets, or three windows or more of one width."""
    rows = scan_rows(results)
    widths = [len(r["layers"]) for r in rows if r["kind"] == "window"]
    return any(r["kind"] == "random" for r in rows) or any(widths.count(w) >= 3 for w in set(widths))


def _fmt(p: dict) -> str:
    if p["mean"] is None:
        return "-"
    ci = f" [{100 * p['ci'][0]:.1f}, {100 * p['ci'][1]:.1f}]" if p["ci"] else ""
    return f"{100 * p['mean']:.1f}%{ci}"


def scan_markdown(scan: dict) -> str:
    """The scan table: per scenario and lr, each window, the random sets and full fine-tuning."""
    band, rng = scan.get("band"), scan.get("analyze_range")
    lines = ["# Band-protection scan", "",
             f"located band: {band[0]}-{band[1]}" if band else "located band: -",
             f"analyze range: {rng[0]}-{rng[1]}" if rng else "analyze range: -",
             f"harmful rate before the attack: {_pct(scan.get('before'))}",
             "", "interval: 95% Student-t over seeds (none for one seed)", ""]
    for (scen, lr), rows in _groups(scan["rows"]).items():
        lines += [f"## {scen}, lr {lr:g}", "", "| method | layers | seeds | harmful rate after | Rouge-L after | mark |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            mark = "located band" if band and r["layers"] == list(range(band[0], band[1] + 1)) else ""
            rl = r["rouge_l"]["mean"]
            lines.append(f"| {r['method']} | {_layers(r['layers'])} | {r['n_seeds']} | {_fmt(r['harmful_rate'])} | "
                         f"{'-' if rl is None else f'{rl:.3f}'} | {mark} |")
        lines.append("")
    return "\n".join(lines)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _layers(layers) -> str:
    if not layers:
        return "-"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def _groups(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault((r["scenario"], r["lr"]), []).append(r)
    return out


def plot_scan(path: Path, scan: dict, scenario: str, lr: float) -> None:
    """Harmful rate after the attack against the window's centre layer (error bars: interval, dots:
    seeds), with full fine-tuning, the random sets and the pre-attack rate as lines, the located
    band and the analyze range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in scan["rows"] if (r["scenario"], r["lr"]) == (scenario, lr)]
    fig, ax = plt.subplots(figsize=(8, 4))
    _shade(ax, scan)
    wins = sorted((r for r in rows if r["kind"] == "window" and r["harmful_rate"]["mean"] is not None),
                  key=lambda r: r["layers"][0])
    if wins:
        x = [(r["layers"][0] + r["layers"][-1]) / 2 for r in wins]
        y = [100 * r["harmful_rate"]["mean"] for r in wins]
        err = [[100 * (r["harmful_rate"]["mean"] - r["harmful_rate"]["ci"][0]) if r["harmful_rate"]["ci"] else 0
                for r in wins],
               [100 * (r["harmful_rate"]["ci"][1] - r["harmful_rate"]["mean"]) if r["harmful_rate"]["ci"] else 0
                for r in wins]]
        ax.errorbar(x, y, yerr=err, fmt="o-", color="black", capsize=3, label=f"window of {len(wins[0]['layers'])} frozen")
        for xi, r in zip(x, wins):
            ax.scatter([xi] * len(r["harmful_rate"]["values"]), [100 * v for v in r["harmful_rate"]["values"]],
                       s=8, color="grey", zorder=3)
    _reference_lines(ax, rows, scan.get("before"))
    ax.set_xlabel("window centre (layer, 0-based)")
    ax.set_ylabel("harmful rate after the attack (%)")
    ax.set_title(f"band-protection scan: {scenario}, lr {lr:g}")
    ax.set_ylim(-2, 102)              # the whole 0-100 % scale, so scans compare by eye and all-zero rows read as 0
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _shade(ax, scan: dict) -> None:
    band, rng = scan.get("band"), scan.get("analyze_range")
    if rng:
        ax.axvspan(rng[0] - 0.5, rng[1] + 0.5, color="tab:blue", alpha=0.10, label=f"analyze range {rng[0]}-{rng[1]}")
    if band:
        ax.axvspan(band[0] - 0.5, band[1] + 0.5, color="tab:red", alpha=0.18, label=f"located band {band[0]}-{band[1]}")


def _reference_lines(ax, rows: list[dict], before) -> None:
    full = [r for r in rows if r["kind"] == "full" and r["harmful_rate"]["mean"] is not None]
    rand = [v for r in rows if r["kind"] == "random" for v in r["harmful_rate"]["values"]]
    if full:
        ax.axhline(100 * full[0]["harmful_rate"]["mean"], color="tab:orange", ls="--", label="full fine-tuning")
    if rand:
        mean = 100 * sum(rand) / len(rand)
        ax.axhline(mean, color="tab:green", ls="-.", label=f"random sets (mean of {len(rand)})")
        ax.axhspan(100 * min(rand), 100 * max(rand), color="tab:green", alpha=0.08)
    if before is not None:
        ax.axhline(100 * before, color="grey", ls=":", label="before the attack")


def _asked_for_scan(run: Path) -> bool:
    """Whether the run's config named a scan or random family (``scan:15/15`` on 30 layers is two
    windows, which :func:`is_scan` alone would not recognise in the expanded methods)."""
    from ..core.runs import read_json

    exp = run / "experiment.json"
    methods = (read_json(exp, "experiment record").get("config") or {}).get("methods") if exp.is_file() else None
    return any(_SCAN.fullmatch(str(m)) or _RANDOM.fullmatch(str(m)) for m in methods or [])


def write_scan(run_dir: str | Path) -> dict | None:
    """``scan/scan.json``, ``scan/scan.md`` and ``scan/<scenario>-lr<lr>.png`` from an experiment's
    results.json, when its config named a scan or its methods hold one; returns the scan record
    (None when there is none)."""
    from ..core.runs import atomic_write, read_json, write_json

    run = Path(run_dir)
    res_path = run / "results.json"
    if not res_path.is_file():
        return None
    results = read_json(res_path, "experiment results")
    if not (_asked_for_scan(run) or is_scan(results)):
        return None
    ana = run / "analysis" / "result.json"
    rng = read_json(ana, "analyze result").get("initial_range") if ana.is_file() else None
    before = next((r["metrics"]["harmful_rate"]["before"] for r in results.get("rows") or []
                   if "harmful_rate" in (r.get("metrics") or {})), None)
    cells = [read_json(p, "cell record") for p in sorted((run / "cells").glob("*/cell.json"))]
    secs = [c["seconds"]["total"] for c in cells if c.get("status") == "done" and (c.get("seconds") or {}).get("total")]
    scan = {"band": results.get("band"), "analyze_range": rng, "before": before, "rows": scan_rows(results),
            "seconds_per_cell": round(sum(secs) / len(secs), 1) if secs else None, "figures": []}
    out = run / "scan"
    out.mkdir(parents=True, exist_ok=True)
    for scen, lr in _groups(scan["rows"]):
        name = f"{scen}-lr{lr:g}.png"
        plot_scan(out / name, scan, scen, lr)
        scan["figures"].append(name)
    write_json(out / "scan.json", scan)
    atomic_write(out / "scan.md", scan_markdown(scan) + "\n")
    return scan
