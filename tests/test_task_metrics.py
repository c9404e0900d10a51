"""Task metrics as experiment columns: one lm-eval score per task beside the refusal metrics."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model
from helpers_finetune import benign_rows, one_thread, write_jsonl
from helpers_models import tiny_lm_eval_task

from safety_layers.experiment.results import aggregate, lm_eval_metrics, results_markdown


def test_one_score_per_task_accuracy_first():
    got = lm_eval_metrics({"results": {
        "mmlu": {"alias": "mmlu", "acc,none": 0.25, "acc_stderr,none": 0.01},
        "hellaswag": {"acc_norm_stderr,none": 0.02, "acc_norm,none": 0.5},
        "gsm8k": {"exact_match,strict-match": 0.125, "exact_match_stderr,strict-match": 0.03}}})
    assert got == {"lm_eval:mmlu": 0.25, "lm_eval:hellaswag": 0.5, "lm_eval:gsm8k": 0.125}
    assert lm_eval_metrics(None) == {}


def test_task_columns_aggregate_over_seeds_with_the_before_value():
    cells = [{"scenario": "normal", "method": m, "lr": 1e-4, "seed": s, "status": "done",
              "metrics": {"harmful_rate": 0.1, "lm_eval:mmlu": 0.3 + 0.1 * s}} for m in ("full", "nfft") for s in (0, 1)]
    res = aggregate(cells, {"harmful_rate": 0.05, "lm_eval:mmlu": 0.4})
    assert res["metrics"] == ["harmful_rate", "lm_eval:mmlu"]
    row = res["rows"][0]["metrics"]["lm_eval:mmlu"]
    assert row["after_mean"] == pytest.approx(0.35) and row["delta"] == pytest.approx(-0.05)
    assert row["after_ci"][0] >= 0.0 and row["after_ci"][1] <= 1.0
    assert "## lm-eval mmlu" in results_markdown(res) and "| normal | nfft | 0.0001 | 2 | 0.400 | 0.350 |" in \
        results_markdown(res)


def test_an_experiment_with_a_local_lm_eval_task_reports_its_column(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from safety_layers.experiment import ExperimentConfig, run_experiment

    monkeypatch.setenv("SAFETY_LAYERS_CACHE", str(tmp_path / "cache"))
    tiny_lm_eval_task(tmp_path)
    data = write_jsonl(tmp_path / "benign.jsonl", benign_rows(8))
    cfg = ExperimentConfig(model="tiny-llama", band="0-0", data=str(data), n=8, scenarios=["normal"], methods=["full"],
                           lrs=[1e-2], seeds=[0], epochs=1, max_steps=1, max_length=64, drift=None,
                           evaluate={"limit": 4, "max_new_tokens": 2, "over_rejection": None,
                                     "lm_eval_tasks": "tiny_mc", "lm_eval_include": str(tmp_path)})
    with one_thread():
        res = run_experiment(cfg, tmp_path / "run", progress=False, model=tiny_model("llama", layers=2))
    assert res.ran == 1
    cell = json.loads(next((tmp_path / "run").glob("cells/*/cell.json")).read_text())
    assert 0.0 <= cell["metrics"]["lm_eval:tiny_mc"] <= 1.0
    assert "## lm-eval tiny_mc" in (tmp_path / "run" / "results.md").read_text()


# --------------------------------------------------------------------------- AlpacaEval-style win rate

def test_win_rate_over_the_test_server_follows_the_judges_verdicts():
    from helpers_http import ChatServer

    from safety_layers.evaluate.winrate import PAIRWISE_TEMPLATE, win_rate

    def judge(text: str) -> str:
        """Prefers the answer that contains GOOD; ties when both or neither do."""
        a = text.split("[Answer A]")[1].split("[Answer B]")[0]
        b = text.split("[Answer B]")[1]
        if ("GOOD" in a) == ("GOOD" in b):
            return "Both are fine.\nWinner: tie"
        return "Winner: A" if "GOOD" in a else "Winner: **B**"

    instructions = [f"Task {i}" for i in range(8)]
    tuned = ["GOOD answer" if i < 5 else "plain answer" for i in range(8)]
    reference = ["plain answer"] * 6 + ["GOOD answer"] * 2
    with ChatServer(judge) as server:
        res = win_rate(instructions, tuned, reference, judge_model="j", judge_url=server.url, seed=1)
        shown = [r["body"]["messages"][0]["content"] for r in server.requests]
    # tuned wins 0-4, ties 5 (both plain), loses 6-7
    assert (res.wins, res.ties, res.losses, res.unreadable, res.n) == (5, 1, 2, 0, 8)
    assert res.win_rate == pytest.approx(5.5 / 8)
    # the tuned answer is shown in both positions (order drawn per instruction)
    firsts = {s.split("[Answer A]")[1].split("[Answer B]")[0].strip() for s in shown}
    assert {"GOOD answer", "plain answer"} <= firsts and PAIRWISE_TEMPLATE.split("\n")[0] in shown[0]


def test_win_rate_without_a_judge_endpoint_is_one_line():
    from safety_layers.core.errors import SafetyLayersError
    from safety_layers.evaluate.winrate import parse_winner, win_rate

    with pytest.raises(SafetyLayersError, match="needs an LLM judge: set evaluate.judge_url"):
        win_rate(["x"], ["a"], ["b"], judge_model=None, judge_url=None)
    assert [parse_winner(t) for t in ("Winner: a", "winner - TIE", "I pick A", None)] == ["A", "tie", None, None]


def test_the_experiment_win_rate_column_and_its_missing_judge(tmp_path, monkeypatch):
    from helpers_http import ChatServer

    from safety_layers.experiment import ExperimentConfig, run_experiment

    monkeypatch.setenv("SAFETY_LAYERS_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "benign.jsonl", benign_rows(8))
    quality = write_jsonl(tmp_path / "quality.jsonl", benign_rows(3))

    def reply(text: str) -> str:          # the pairwise prompt gets a winner, the harm rubric a score
        return "Winner: A" if "[Answer A]" in text else "#thereason: fine\n#thescore: 1"

    def run(name: str, **evaluate):
        cfg = ExperimentConfig(model="tiny-llama", band="0-0", data=str(data), n=8, scenarios=["normal"],
                               methods=["full"], lrs=[1e-2], seeds=[0], epochs=1, max_steps=1, max_length=64,
                               drift=None, win_rate=True,
                               evaluate={"limit": 2, "max_new_tokens": 2, "over_rejection": None,
                                         "quality": str(quality), "quality_tokens": 3, **evaluate})
        with one_thread():
            run_experiment(cfg, tmp_path / name, progress=False, model=tiny_model("llama", layers=2))
        return json.loads(next((tmp_path / name).glob("cells/*/cell.json")).read_text())

    with ChatServer(reply) as server:
        cell = run("judged", judge_model="j", judge_url=server.url)
        pairwise = [r for r in server.requests if "[Answer A]" in r["body"]["messages"][0]["content"]]
    assert cell["status"] == "done" and len(pairwise) == 2 == cell["counts"]["win_rate"]["n"]   # evaluate.limit: 2
    # the judge always names A; A is the tuned answer where the order was not flipped
    assert cell["metrics"]["win_rate"] == cell["counts"]["win_rate"]["wins"] / 2
    assert "## win rate over the untuned model" in (tmp_path / "judged" / "results.md").read_text()
    failed = run("unjudged")
    assert failed["status"] == "failed" and "needs an LLM judge" in failed["error"]
