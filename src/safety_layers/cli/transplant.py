"""``safety-layers transplant``: copy a donor's layers into a base model, save it and evaluate it."""

from __future__ import annotations


def _cell(r: dict | None) -> str:
    from ..core.stats import wilson_interval

    if not r or not r.get("decided"):
        return "-"
    lo, hi = wilson_interval(r["count"], r["decided"])
    return f"{r['count']}/{r['decided']} = {100 * r['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def _print(result, run_dir) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"transplant: layers {result.layers[0]}-{result.layers[1]} ({', '.join(result.parts)}) of "
                    f"{result.donor} into {result.base}")
    for c in ("model", "harmful rate [95% CI]", "over-refusal [95% CI]", "LLM score", "Rouge-L"):
        t.add_column(c, justify="left" if c == "model" else "right")
    names = {"base": result.base, "donor": result.donor, "transplant": "transplant"}
    for key in ("base", "donor", "transplant"):
        e = result.evaluation.get(key)
        if e is None:
            continue
        score = (e.get("harmful") or {}).get("llm_score")
        t.add_row(names[key], _cell(e.get("harmful")), _cell(e.get("over_refusal")),
                  f"{score:.2f}" if score is not None else "-",
                  f"{e['rouge_l']:.3f}" if e.get("rouge_l") is not None else "-")
    console = Console()
    console.print(f"copied {result.copied_tensors} tensors ({result.copied_params:,} of {result.total_params:,} "
                  "parameters)")
    if result.evaluation:
        console.print(t)
    console.print(f"model: {result.model_dir} (manifest.json inside); results: {run_dir}/result.json; "
                  "completions only in the eval folders")


def run_transplant(cfg) -> int:
    from ..core.runs import run_folder
    from ..transplant import transplant
    from .commands import library_bars

    library_bars(cfg.progress)
    with run_folder("transplant", cfg.base, cfg.out, overwrite=cfg.overwrite) as run_dir:
        result = transplant(cfg, run_dir=run_dir)
    _print(result, run_dir)
    return 0
