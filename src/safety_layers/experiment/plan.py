"""What an experiment will run, before it runs: every cell with its training rows and optimizer
steps (``safety-layers experiment CONFIG --dry-run``). Nothing is loaded or trained; the rows come
from the config and, when ``n`` is unset, from counting the data file."""

from __future__ import annotations

import math

from .grid import grid, parse_scenario


def _source_rows(cfg) -> int | None:
    from ..core.data import read_records

    try:
        return len(read_records(cfg.data, dedupe=True).rows)
    except Exception:  # noqa: BLE001 - a dry run reports what it cannot count instead of failing
        return None


def training_rows(cfg, scenario: str, source_rows: int | None) -> int | None:
    """Rows of a scenario's training file (the builders' arithmetic, :mod:`safety_layers.scenarios`)."""
    from ..scenarios import harmful_count

    kind, p = parse_scenario(scenario)
    n = cfg.n_for(scenario)
    if kind == "backdoor":
        half = n if n is not None else (source_rows // 2 if source_rows is not None else None)
        return None if half is None else 2 * half
    n = n if n is not None else source_rows
    if n is None:
        return None
    return n + harmful_count(n, p) if kind == "harmful" else n


def cell_steps(cfg, rows: int | None) -> int | None:
    """Optimizer steps of one cell on one process: ``max_steps``, or epochs x batches."""
    if cfg.max_steps:
        return cfg.max_steps
    if rows is None:
        return None
    per_epoch = math.ceil(math.ceil(rows / cfg.batch_size) / cfg.grad_accum)     # as transformers' Trainer counts
    return math.ceil(cfg.epochs * per_epoch)


def _prompts(cfg) -> int | None:
    """Malicious prompts reverse DPO builds pairs from (the bundled ones unless ``alignment_data``)."""
    from ..finetune.baseline_data import alignment_examples

    try:
        return len(alignment_examples(cfg.method_options.get("alignment_data"), cfg.method_options.get("rdpo_prompts")))
    except Exception:  # noqa: BLE001 - a dry run reports what it cannot count instead of failing
        return None


def plan(cfg) -> list[dict]:
    """One row per cell: scenario, method, lr, seed, training rows and steps, and a note for the
    methods whose steps do not all train on the scenario's rows."""
    source = None if cfg.n is not None and not isinstance(cfg.n, dict) else _source_rows(cfg)
    out = []
    for cell in grid(cfg):
        rows = training_rows(cfg, cell.scenario, source)
        note = ""
        if cell.method in ("rdpo", "rdpo-sppft"):
            rows, note = _prompts(cfg), "at most: one preference pair per malicious prompt the compliant model answers"
        steps = cell_steps(cfg, rows)
        if cell.method == "lisa" and steps:
            opts = {"lisa_alignment_steps": 100, "lisa_finetune_steps": 900, **cfg.method_options}
            k1, k2 = opts["lisa_alignment_steps"], opts["lisa_finetune_steps"]
            aligning = sum(1 for s in range(steps) if s % (k1 + k2) < k1)
            note = f"{aligning} of the steps on alignment data"
        out.append({"cell": cell.id, "scenario": cell.scenario, "method": cell.method, "lr": cell.lr,
                    "seed": cell.seed, "rows": rows, "steps": steps, "note": note})
    return out


def plan_text(cfg) -> str:
    rows = plan(cfg)
    lines = [f"{cfg.name}: {len(rows)} cells on {cfg.model}",
             "| scenario | method | lr | seed | rows | steps | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scenario']} | {r['method']} | {r['lr']:g} | {r['seed']} | "
                     f"{r['rows'] if r['rows'] is not None else '?'} | {r['steps'] if r['steps'] is not None else '?'} "
                     f"| {r['note']} |")
    total = sum(r["steps"] or 0 for r in rows)
    lines.append(f"total: {total:,} optimizer steps" + (" (cells marked ? not counted)"
                                                      if any(r["steps"] is None for r in rows) else ""))
    return "\n".join(lines)
