"""The transplant table of issue 21 on the demo model: does refusal follow the band?

Each row copies whole layers (attention, MLP, norms) between the aligned demo model and the bare
SmolLM2-135M-Instruct it was aligned from, in both directions: the located band (10-14 on demo v6),
a control band of the same width (5-9), the layers after the band (15-29, the paper's 16-31
experiment) and, aligned into bare, the width-5 bands inside 15-29 and 20-29. Every row is its own run folder under OUT; a finished row is skipped, so the
script can be run one row at a time (each well under 8 minutes on 2 cores):

    SAFETY_LAYERS_CACHE=... python studies/transplant_table.py runs/transplant-table --only aligned-10-14-into-bare
    python studies/transplant_table.py runs/transplant-table --table      # the Markdown table of the rows done

The transplanted weights are deleted after evaluation (the manifest is kept); completions stay
in each row's eval folders and are never printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safety_layers.core.stats import wilson_interval
from safety_layers.core.runs import read_json
from safety_layers.transplant import TransplantConfig, transplant

ALIGNED, BARE = "demo", "smollm2-135m-instruct"
ROWS = {   # name: (base, donor, layers)
    "aligned-10-14-into-bare": (BARE, ALIGNED, "10-14"),
    "aligned-5-9-into-bare": (BARE, ALIGNED, "5-9"),
    "aligned-15-29-into-bare": (BARE, ALIGNED, "15-29"),
    "aligned-15-19-into-bare": (BARE, ALIGNED, "15-19"),       # which part of 15-29 carries refusal?
    "aligned-20-24-into-bare": (BARE, ALIGNED, "20-24"),
    "aligned-25-29-into-bare": (BARE, ALIGNED, "25-29"),
    "aligned-20-29-into-bare": (BARE, ALIGNED, "20-29"),
    "bare-10-14-into-aligned": (ALIGNED, BARE, "10-14"),
    "bare-5-9-into-aligned": (ALIGNED, BARE, "5-9"),
    "bare-15-29-into-aligned": (ALIGNED, BARE, "15-29"),
}
EVALUATE = {"malicious": "advbench:../shared/data/harmful_behaviors.csv", "over_rejection": "over-rejection",
            "limit": 32, "max_new_tokens": 32, "judges": "keyword"}


def run_row(out: Path, name: str) -> None:
    folder = out / name
    if (folder / "result.json").is_file():
        print(f"{name}: done earlier")
        return
    base, donor, layers = ROWS[name]
    cfg = TransplantConfig(base=base, donor=donor, layers=layers, evaluate=dict(EVALUATE), progress=False,
                           overwrite=True)
    res = transplant(cfg, run_dir=folder)
    (folder / "model" / "model.safetensors").unlink(missing_ok=True)
    print(f"{name}: {res.seconds}")


def _cell(r: dict | None) -> str:
    if not r or not r.get("decided"):
        return "-"
    lo, hi = wilson_interval(r["count"], r["decided"])
    return f"{r['count']}/{r['decided']} = {100 * r['rate']:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]"


def table(out: Path) -> str:
    lines = ["| transplant | base | donor | layers | harmful rate [95% Wilson] | over-refusal [95% Wilson] | s |",
             "|---|---|---|---|---|---|---|"]
    refs = {}
    for name in ROWS:
        p = out / name / "result.json"
        if not p.is_file():
            continue
        d = read_json(p)
        ev = d["evaluation"]
        for who in ("base", "donor"):
            refs.setdefault(d[who], ev.get(who))
        t = ev.get("transplant") or {}
        lines.append(f"| {name} | {d['base']} | {d['donor']} | {d['layers'][0]}-{d['layers'][1]} | "
                     f"{_cell(t.get('harmful'))} | {_cell(t.get('over_refusal'))} | {d['seconds'].get('total', 0):.0f} |")
    for model, e in refs.items():
        if e:
            lines.append(f"| (untouched) | {model} | - | - | {_cell(e.get('harmful'))} | {_cell(e.get('over_refusal'))} | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--only", action="append", choices=list(ROWS), help="run only this row (repeatable)")
    p.add_argument("--table", action="store_true", help="print the table of the finished rows and stop")
    a = p.parse_args(argv)
    out = Path(a.out)
    if not a.table:
        for name in a.only or list(ROWS):
            run_row(out, name)
    print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
