"""The sections of a report, built from a run's JSON files: counts, rates, settings, never completions."""

from __future__ import annotations

import json
from pathlib import Path

from .figures import Figures, draw_analysis, draw_drift, draw_probe, draw_results, draw_sweeps
from .render import Bullets, Details, Para, Section, Table, fmt, fmt_band, fmt_ci, fmt_lr


def kv(items, caption: str = "") -> Table:
    """A two-column table of (item, value) pairs."""
    return Table(["item", "value"], [[str(k), str(v)] for k, v in items], caption)


def _short(value, limit: int = 240) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _flatten(d, prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out += _flatten(v, key + ".")
        else:
            out.append((key, fmt(v) if isinstance(v, (int, float, bool)) or v is None else _short(v)))
    return out


def _rate(r: dict | None) -> str:
    """``rate [ci] (count/n, judge)`` of an evaluate RateResult dict."""
    if not r or r.get("rate") is None:
        return "–"
    extra = f"{r.get('count')}/{r.get('decided', r.get('n'))}" if r.get("count") is not None else ""
    if r.get("judge"):
        extra += f", {r['judge']}" if extra else r["judge"]
    return f"{fmt(r['rate'])} {fmt_ci(r.get('ci'))}" + (f" ({extra})" if extra else "")


def analysis_section(d: dict, run: Path, figs: Figures) -> Section:
    sec = Section("analysis", "Existence analysis")
    sec.blocks.append(Para(
        f"Last-token cosine similarity of {d.get('n_normal')} normal (N) and {d.get('n_malicious')} malicious (M) "
        f"prompts per layer, {d.get('pairs')} sampled pairs per type, template {d.get('template')}. The angle gap "
        "is angle(N-M) − angle(N-N) in degrees; the initial range is where it rises."))
    boot = d.get("bootstrap") or {}
    items = [("model", d.get("model")), ("layers", d.get("num_layers")),
             ("prompt sets", f"{d.get('normal')} (N={d.get('n_normal')}) vs {d.get('malicious')} "
                             f"(M={d.get('n_malicious')})"),
             ("initial range", fmt_band(d.get("initial_range")) + f" (from the {d.get('range_curve')} gap)")]
    if boot.get("samples"):
        items.append(("bootstrap", f"start {fmt_ci(boot.get('start_ci'))}, end {fmt_ci(boot.get('end_ci'))}, "
                                   f"mode {fmt_band(boot.get('mode'))} in {fmt(boot.get('mode_share'))} of "
                                   f"{boot.get('samples')} resamples, no range in {boot.get('no_range', 0)}"))
    if d.get("reference"):
        ref = d["reference"]
        items.append(("reference model",
                      f"{ref.get('model')} (its initial range {fmt_band(ref.get('initial_range'))})"))
    items.append(("range rule", d.get("range_rule") or "–"))
    sec.blocks.append(kv(items))
    for fig in (figs.pick(run / "analysis.png", "cosine similarity (mean ± std) per pair type and angle gap",
                          "analysis.png", draw_analysis, run / "result.json"),
                figs.pick(run / "probe.png", "held-out accuracy of a linear probe N vs M per layer",
                          "probe.png", draw_probe, run / "result.json") if d.get("probe_accuracy") else None):
        if fig:
            sec.blocks.append(fig)
    raw, cen = d["raw"], d["centred"]
    probe = d.get("probe_accuracy") or []
    ref = d.get("reference") or {}
    header = ["layer", "N-N cos", "M-M cos", "N-M cos", "raw gap °", "centred gap °"]
    header += ["probe acc."] if probe else []
    header += ["centred gap − reference °"] if ref.get("centred_gap_difference") else []
    rng = d.get("initial_range")
    rows, strong = [], set()
    for i in range(d["num_layers"]):
        row = [str(i), fmt(raw["nn_exact"][i]), fmt(raw["mm_exact"][i]), fmt(raw["nm_exact"][i]),
               fmt(raw["gap_exact"][i]), fmt(cen["gap_exact"][i])]
        row += [fmt(probe[i])] if probe else []
        row += [fmt(ref["centred_gap_difference"][i])] if ref.get("centred_gap_difference") else []
        rows.append(row)
        if rng and rng[0] <= i <= rng[1]:
            strong.add(i)
    sec.blocks.append(Details("per-layer numbers (exact all-pairs means; initial range highlighted)",
                              [Table(header, rows, "per-layer statistics", strong)]))
    if d.get("notes"):
        sec.blocks.append(Bullets(list(d["notes"])))
    return sec


def locate_section(loc: dict, run: Path, figs: Figures) -> Section:
    sec = Section("localization", "Localization evidence")
    found = list(loc.get("safety_layers") or [])
    base = loc.get("baseline") or {}
    sp = loc.get("proxy_generation_spearman") or {}
    sec.blocks.append(Para(
        f"Scaling each candidate range by alpha={fmt(loc.get('alpha'))} ({loc.get('direction')}) and counting "
        f"refusals on {loc.get('n_prompts')} over-rejection prompts ({loc.get('over_rejection')}); the safety layers "
        f"are the range that {'maximises' if loc.get('direction') == 'up' else 'minimises'} the count."))
    sec.blocks.append(kv([
        ("safety layers", f"{fmt_band(found)} ({fmt(loc.get('count'))} refusals)"),
        ("baseline R_o", f"{fmt(base.get('count'))} (proxy {fmt(base.get('proxy_count'))})"),
        ("initial range", f"{fmt_band(loc.get('init_range'))} ({loc.get('init_source')})"),
        ("judge / template", f"{loc.get('judge')} / {loc.get('template')}"),
        ("proxy vs generation Spearman", f"rho {fmt(sp.get('rho'))} (n={fmt(sp.get('n'))})"),
        ("model", f"{loc.get('model')} ({loc.get('num_layers')} layers)"),
    ]))
    if loc.get("alpha_search"):
        rows = [[fmt(a.get("alpha")), fmt(a.get("std")), fmt(a.get("threshold")),
                 _short(" ".join(fmt(c) for c in a.get("counts") or []), 120)] for a in loc["alpha_search"]]
        chosen = {i for i, a in enumerate(loc["alpha_search"]) if a.get("alpha") == loc.get("alpha")}
        sec.blocks.append(Table(["alpha", "std of counts", "threshold", "counts"], rows,
                                "alpha search (chosen alpha highlighted)", chosen))
    for s in loc.get("sweeps") or []:
        rows, strong = [], set()
        for i, r in enumerate(s.get("rows") or []):
            rows.append([fmt_band(r.get("range")), fmt(r.get("proxy_count")), fmt(r.get("count")),
                         fmt(bool(r.get("confirmed")))])
            if list(r.get("range") or []) == found:
                strong.add(i)
        sec.blocks.append(Table(["scaled range", "proxy count", "refusals R_o", "confirmed by generation"], rows,
                                f"sweep {s.get('stage')} (fixed bound {s.get('fixed')}); baseline R_o = "
                                f"{fmt(base.get('count'))}", strong))
    fig = figs.pick(run / "sweeps.png", "over-rejection refusals per scaled range", "sweeps.png",
                    draw_sweeps, run / "result.json")
    if fig:
        sec.blocks.append(fig)
    san = loc.get("sanity")
    if san:
        down, up = san.get("down") or {}, san.get("up") or {}
        sec.blocks.append(Table(
            ["check", "alpha", "harmful rate"],
            [["unscaled", "1", fmt(san.get("baseline_harmful_rate"))],
             ["scaled down (should rise)", fmt(down.get("alpha")), fmt(down.get("harmful_rate"))],
             ["scaled up (should fall)", fmt(up.get("alpha")), fmt(up.get("harmful_rate"))]],
            f"sanity check on {san.get('malicious')}: {'passed' if san.get('passed') else 'FAILED'}"))
    if loc.get("notes"):
        sec.blocks.append(Bullets(list(loc["notes"])))
    if loc.get("seconds"):
        sec.blocks.append(Details("timings (seconds)", [kv(_flatten(loc["seconds"]))]))
    return sec


def results_section(res: dict, cells: list[dict], figs: Figures) -> Section:
    sec = Section("results", "Results")
    rows = res.get("rows") or []
    for m in res.get("metrics") or []:
        table = []
        for r in rows:
            c = (r.get("metrics") or {}).get(m)
            if c is None:
                continue
            seeds = fmt(r.get("n_seeds")) + (f" ({len(r['failed'])} failed)" if r.get("failed") else "")
            table.append([str(r.get("scenario")), str(r.get("method")), fmt_lr(r.get("lr")), seeds,
                          fmt(c.get("before")), fmt(c.get("after_mean")), fmt_ci(c.get("after_ci")),
                          fmt(c.get("delta"), signed=True)])
        if table:
            sec.blocks.append(Table(["scenario", "method", "lr", "seeds", "before", "after (mean)", "interval",
                                     "Δ"], table, m))
    if res.get("interval"):
        sec.blocks.append(Para(f"interval: {res['interval']}"))
    fig = figs.draw("results.png", "metrics after fine-tuning per scenario and method (error bars: interval)",
                    draw_results, res) if rows else None
    if fig:
        sec.blocks.append(fig)
    if cells:
        counts = {}
        for c in cells:
            counts[c.get("status", "unknown")] = counts.get(c.get("status", "unknown"), 0) + 1
        sec.blocks.append(Para("cells: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))))
        body = []
        for c in cells:
            m = c.get("metrics") or {}
            body.append([str(c.get("id")), str(c.get("status")), fmt(m.get("harmful_rate")),
                         fmt(m.get("over_refusal_rate")), fmt(m.get("rouge_l")), fmt(m.get("harmful_score")),
                         _short(c.get("error"), 160) if c.get("error") else ""])
        sec.blocks.append(Details("cells", [Table(["cell", "status", "harmful rate", "over-refusal", "Rouge-L",
                                                   "harmful score", "error"], body, "one fine-tuning run each")]))
    return sec


def drift_section(drift: dict, drift_dir: Path, band, figs: Figures) -> Section:
    sec = Section("drift", "Drift after fine-tuning")
    cells = drift.get("cells") or {}
    band = band or drift.get("band")
    hold_keys = list(dict.fromkeys(k for c in cells.values() for k, v in (c.get("band_holds") or {}).items()
                                   if isinstance(v, (int, float, bool))))
    rows = []
    for cid, c in cells.items():
        norms = (c.get("weight_change") or {}).get("per_layer_rel_norm") or []
        inside = [v for i, v in enumerate(norms) if band and band[0] <= i <= band[1] and v is not None]
        outside = [v for i, v in enumerate(norms) if not (band and band[0] <= i <= band[1]) and v is not None]
        top = max(range(len(norms)), key=lambda i: norms[i] or 0.0) if norms else None
        holds = c.get("band_holds") or {}
        rows.append([cid, fmt(sum(inside) / len(inside)) if inside else "–",
                     fmt(sum(outside) / len(outside)) if outside else "–", fmt(top)]
                    + [fmt(holds.get(k)) if isinstance(holds.get(k), (int, float, bool)) else "–"
                       for k in hold_keys])
    if rows:
        sec.blocks.append(Table(["cell", f"mean rel. change in band {fmt_band(band)}", "mean rel. change outside",
                                 "most changed layer"] + hold_keys, rows, "weight change and band check per cell"))
    pngs = sorted(drift_dir.glob("*.png"))
    added = [f for f in (figs.existing(p, p.stem.replace("_", " ")) for p in pngs) if f]
    if not added and cells:
        fig = figs.draw("drift.png", "relative weight change and angle gap after fine-tuning", draw_drift,
                        drift, band)
        added = [fig] if fig else []
    sec.blocks += added
    return sec


def settings_section(parts: list[tuple[str, dict | None]]) -> Section | None:
    blocks = [Details(title, [kv(_flatten(d))]) for title, d in parts if d]
    return Section("settings", "Settings and versions", blocks) if blocks else None


def summary_section(items, headline: list[str]) -> Section:
    sec = Section("summary", "Summary", [kv(items)])
    if headline:
        sec.blocks.append(Bullets(headline))
    return sec


def experiment_summary(exp: dict, model: str, ana: dict | None, loc: dict | None, base: dict | None,
                       cells: list[dict], res: dict | None) -> Section:
    """The experiment's band, baseline rates and cell count, and each scenario's headline metric."""
    items = [("model", model), ("band", f"{fmt_band(exp.get('band'))} (from {exp.get('band_source', '–')})")]
    if ana is not None:
        items.append(("initial range (analyze)", fmt_band(ana.get("initial_range"))))
    if loc is not None:
        items.append(("safety layers (locate)", f"{fmt_band(loc.get('safety_layers'))}, "
                                                f"{fmt(loc.get('count'))} refusals vs baseline "
                                                f"{fmt((loc.get('baseline') or {}).get('count'))}"))
    if base is not None:
        items += [("baseline harmful rate", _rate(base.get("harmful"))),
                  ("baseline over-refusal", _rate(base.get("over_refusal")))]
    if cells:
        done = sum(c.get("status") == "done" for c in cells)
        items.append(("cells", f"{done} of {len(cells)} done"))
    items += [("started", exp.get("started") or "–"), ("finished", exp.get("finished") or "not finished")]
    headline = []
    if res:
        metric = "harmful_rate" if "harmful_rate" in (res.get("metrics") or []) else (res.get("metrics") or [None])[0]
        for sc in dict.fromkeys(r.get("scenario") for r in res.get("rows") or []):
            rs = [r for r in res["rows"] if r.get("scenario") == sc and metric in (r.get("metrics") or {})]
            if rs:
                before = rs[0]["metrics"][metric].get("before")
                after = ", ".join(f"{r.get('method')} {fmt(r['metrics'][metric].get('after_mean'))}" for r in rs)
                headline.append(f"{sc}: {metric} before {fmt(before)}; after {after}")
    return summary_section(items, headline)


def analyze_summary(d: dict) -> Section:
    items = [("model", d.get("model")), ("layers", d.get("num_layers")),
             ("initial range", fmt_band(d.get("initial_range"))), ("template", d.get("template"))]
    probe = d.get("probe_accuracy") or []
    headline = [f"best probe accuracy {fmt(max(probe))} at layer {probe.index(max(probe))}"] if probe else []
    gap = (d.get("centred") or {}).get("gap_exact") or []
    if gap:
        headline.append(f"largest centred gap {fmt(max(gap))}° at layer {gap.index(max(gap))}")
    return summary_section(items, headline)


def locate_summary(d: dict) -> Section:
    items = [("model", d.get("model")), ("safety layers", fmt_band(d.get("safety_layers"))),
             ("refusals of that band", fmt(d.get("count"))),
             ("baseline R_o", fmt((d.get("baseline") or {}).get("count"))),
             ("alpha", f"{fmt(d.get('alpha'))} ({d.get('direction')})")]
    san = d.get("sanity") or {}
    headline = [f"sanity check {'passed' if san.get('passed') else 'failed'}"] if san else []
    return summary_section(items, headline)

