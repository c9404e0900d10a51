"""Report sections of the mechanism runs: the band-protection scan (inside an experiment), the
attention maps and the layer transplant (their own run folders). Counts and rates only."""

from __future__ import annotations

from pathlib import Path

from .figures import Figures
from .render import Bullets, Para, Section, Table, fmt, fmt_band, fmt_ci, fmt_lr


def scan_section(scan: dict, scan_dir: Path, figs: Figures) -> Section:
    """The scan's table (harmful rate and Rouge-L after the attack per window, random set and full
    fine-tuning) and its plots, the located band's row highlighted."""
    sec = Section("scan", "Band-protection scan")
    band, rng = scan.get("band"), scan.get("analyze_range")
    sec.blocks.append(Para(
        f"Each window of layers frozen in turn under the same attack; located band {fmt_band(band)}, analyze "
        f"range {fmt_band(rng)}, harmful rate before the attack {fmt(scan.get('before'))}. Random sets: "
        "non-contiguous layer sets of the same size (seeded), the control. Interval: 95% Student-t over seeds."))
    located = list(range(band[0], band[1] + 1)) if band else None
    groups: dict = {}
    for r in scan.get("rows") or []:
        groups.setdefault((r["scenario"], r["lr"]), []).append(r)
    for (scen, lr), rows in groups.items():
        body, strong = [], set()
        for i, r in enumerate(rows):
            h, q = r["harmful_rate"], r["rouge_l"]
            layers = r.get("layers") or []
            body.append([r["method"], r["kind"], ",".join(map(str, layers)) if r["kind"] == "random"
                         else fmt_band([layers[0], layers[-1]]) if layers else "–", fmt(r.get("n_seeds")),
                         fmt(h.get("mean")), fmt_ci(h.get("ci")), fmt(q.get("mean"))])
            if layers and layers == located:
                strong.add(i)
        sec.blocks.append(Table(["method", "kind", "layers frozen", "seeds", "harmful rate after", "interval",
                                 "Rouge-L after"], body, f"{scen}, lr {fmt_lr(lr)}", strong))
    if scan.get("seconds_per_cell") is not None:
        sec.blocks.append(Para(f"mean time per cell: {scan['seconds_per_cell']:.0f} s (training and evaluation)"))
    for name in scan.get("figures") or []:
        fig = figs.existing(scan_dir / name, f"harmful rate after the attack per window: {Path(name).stem}")
        if fig:
            sec.blocks.append(fig)
    return sec


def attention_sections(d: dict, run: Path, figs: Figures) -> list[Section]:
    """The per-layer content-word shares (N vs M, and the reference model's) and the pair heatmaps."""
    from ..analysis.attention import shares_table

    ref = (d.get("reference") or {}).get("model")
    sh = d["shares"]
    summary = Section("summary", "Attention maps", [Bullets([
        f"model {d.get('model')}, {d.get('num_layers')} layers, template {d.get('template')}",
        f"band {fmt_band(d.get('band'))}; normal set {d.get('normal')} (n={sh['normal']['n']}), malicious set "
        f"{d.get('malicious')} (n={sh['malicious']['n']})",
        f"chance level of the content share: N {fmt(sh['normal']['chance'])}, M {fmt(sh['malicious']['chance'])}"]
        + ([f"reference model: {ref}"] if ref else []))])
    band = d.get("band")
    rows = shares_table(d)
    strong = {i for i, r in enumerate(rows) if band and band[0] <= int(r[0]) <= band[1]}
    head = ["layer", "N %", "M %", "M-N pts"] + ([f"{ref} N %", f"{ref} M %", f"{ref} M-N pts"] if ref else [])
    shares = Section("shares", "Content words' share of the question's attention",
                     [Para("Per layer, of the attention the last prompt token gives to the question's words, the "
                           "share on content words rather than function words (our stop-word list)."),
                      Table(head, rows, "content share per layer (band highlighted)", strong)])
    maps = Section("pairs", "Example pairs")
    for name in d.get("figures") or []:
        fig = figs.existing(run / name, Path(name).stem.replace("-", " "))
        if fig:
            (shares if name == "shares.png" else maps).blocks.append(fig)
    return [summary, shares] + ([maps] if maps.blocks else [])


def _tp_rate(r: dict | None) -> str:
    if not r or not r.get("decided"):
        return "–"
    return f"{r['count']}/{r['decided']} = {fmt(r['rate'])} {fmt_ci(r.get('ci'))}"


def transplant_sections(d: dict) -> list[Section]:
    """What was copied, and the base, donor and transplanted model's rates side by side."""
    lay = d.get("layers")
    summary = Section("summary", "Layer transplant", [Bullets([
        f"layers {fmt_band(lay)} ({', '.join(d.get('parts') or [])}) of {d.get('donor')} into {d.get('base')}",
        f"copied {d.get('copied_tensors')} tensors, {d.get('copied_params'):,} of {d.get('total_params'):,} "
        f"parameters; model in {d.get('model_dir')}"])])
    ev = d.get("evaluation") or {}
    names = {"base": d.get("base"), "donor": d.get("donor"), "transplant": "transplant"}
    rows = [[names[k] or k, _tp_rate(ev[k].get("harmful")), _tp_rate(ev[k].get("over_refusal")),
             fmt(ev[k].get("rouge_l"))] for k in ("base", "donor", "transplant") if k in ev]
    result = Section("transplant", "Evaluation", [Table(["model", "harmful rate [95% CI]", "over-refusal [95% CI]",
                                                         "Rouge-L"], rows, "counts with Wilson intervals")]) \
        if rows else None
    return [summary] + ([result] if result else [])
