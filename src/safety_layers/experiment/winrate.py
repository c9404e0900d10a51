"""The win-rate column (Tab.9's place): each cell's answers to the quality set against the untuned
model's, judged pairwise by the evaluate section's LLM judge (:mod:`safety_layers.evaluate.winrate`).
Both sets of answers are read from the evaluations' ``samples.jsonl``; nothing is generated again."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import SafetyLayersError


def quality_answers(samples: Path) -> dict[str, str]:
    """prompt -> completion of the quality rows (metric ``rouge_l``) of an evaluation's samples.jsonl."""
    from ..core.data import read_located_rows

    if not samples.is_file():
        raise SafetyLayersError(f"{samples} is missing: the win rate needs the evaluations' quality answers "
                                "(set evaluate.quality)")
    return {r["prompt"]: r["completion"] for _, r in read_located_rows(samples)
            if isinstance(r, dict) and r.get("metric") == "rouge_l"}


def cell_win_rate(run: Path, cell_eval: Path, ev) -> dict:
    """Win rate of a cell over the untuned model on the quality prompts both answered."""
    from ..evaluate.winrate import win_rate

    before = quality_answers(run / "baseline" / "eval" / "samples.jsonl")
    after = quality_answers(cell_eval / "samples.jsonl")
    prompts = [p for p in after if p in before]
    if not prompts:
        raise SafetyLayersError("no quality prompt has answers from both the untuned and the tuned model: "
                                "set evaluate.quality to compute the win rate")
    res = win_rate(prompts, [after[p] for p in prompts], [before[p] for p in prompts], judge_model=ev.judge_model,
                   judge_url=ev.judge_url, key_env=ev.judge_key_env)
    return {"win_rate": res.win_rate, "counts": {"n": res.n, "wins": res.wins, "losses": res.losses,
                                                 "ties": res.ties, "unreadable": res.unreadable}}
