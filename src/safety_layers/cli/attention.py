"""``safety-layers attention``: attention maps of example pairs and per-layer content shares."""

from __future__ import annotations


def _print(result, run_dir) -> None:
    from rich.console import Console
    from rich.table import Table

    from ..analysis.attention import shares_table
    from ..core.runs import to_jsonable

    d = to_jsonable(result)
    ref = (result.reference or {}).get("model")
    t = Table(title=f"content words' share of the question's attention: {result.model} (template {result.template})")
    cols = ["layer", "N %", "M %", "M-N pts"] + ([f"{ref} N %", f"{ref} M %", f"{ref} M-N pts"] if ref else [])
    for c in cols:
        t.add_column(c, justify="right")
    band = result.band
    for row in shares_table(d):
        t.add_row(*row, style="bold red" if band and band[0] <= int(row[0]) <= band[1] else None)
    console = Console()
    console.print(t)
    sh = result.shares
    console.print(f"chance level (content words' share of word tokens): N {100 * sh['normal']['chance']:.1f}%, "
                  f"M {100 * sh['malicious']['chance']:.1f}%")
    console.print(f"results: {run_dir}/result.json; figures: {', '.join(result.figures)}")


def run_attention(cfg) -> int:
    from ..analysis.attention import attention
    from ..core.runs import run_folder
    from .commands import library_bars

    library_bars(cfg.progress)
    with run_folder("attention", cfg.model, cfg.out, overwrite=cfg.overwrite) as run_dir:
        result = attention(cfg, run_dir=run_dir)
    _print(result, run_dir)
    return 0
