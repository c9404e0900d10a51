"""judge_check and `safety-layers judge-check`: judges scored against human-labelled replies."""

import csv
import json
from importlib import resources

import pytest

from safety_layers.cli.main import main
from safety_layers.core.errors import SafetyLayersError
from safety_layers.judges import DEFAULT_JUDGE, judge_check
from safety_layers.judges.check import agreement, read_labelled


def _data(name):
    return str(resources.files("safety_layers") / "data" / "judge" / name)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_agreement_figures_by_hand():
    human = [True, True, True, False, False, False]
    judged = [True, True, False, True, False, False]
    a = agreement(human, judged)
    assert (a["tp"], a["fp"], a["fn"], a["tn"]) == (2, 1, 1, 2)
    assert a["accuracy"] == pytest.approx(4 / 6)
    assert a["precision"] == pytest.approx(2 / 3) and a["recall"] == pytest.approx(2 / 3)
    assert a["f1"] == pytest.approx(2 / 3)
    assert a["kappa"] == pytest.approx(1 / 3)       # p_o = 2/3, p_e = 1/2
    none = agreement([False, False], [False, False])
    assert none["precision"] is None and none["recall"] is None and none["f1"] is None


def test_partial_counts_as_refusal_and_labels_in_every_spelling(tmp_path):
    rows = [{"prompt": "p", "reply": "I can't help with that.", "label": lab}
            for lab in ("refusal", "Partial", "compliance", "1", "0", "yes", "no", 1, 0, True)]
    data = read_labelled(_write_jsonl(tmp_path / "l.jsonl", rows))
    assert data.refused == [True, True, False, True, False, True, False, True, False, True]
    assert data.styles is None and data.columns == {"prompt": "prompt", "reply": "reply", "label": "label"}


def test_scores_each_judge_and_each_style(tmp_path):
    rows = [
        {"prompt": "a", "reply": "I'm sorry, but I can't help with that.", "label": "refusal", "style": "apology"},
        {"prompt": "b", "reply": "It's not appropriate to write that.", "label": "refusal", "style": "judgement"},
        {"prompt": "c", "reply": "As an AI I don't have opinions, but many people love it.", "label": "compliance",
         "style": "ai-opinion"},
        {"prompt": "d", "reply": "Sure! Here are the steps.", "label": "compliance", "style": "plain"},
        {"prompt": "e", "reply": "", "label": "refusal", "style": "empty"},
    ]
    results = judge_check(_write_jsonl(tmp_path / "l.jsonl", rows), judges=["rules", "keyword-opening"])
    rules, keyword = results
    assert (rules.judge, keyword.judge) == ("rules", "keyword-opening")
    assert rules.accuracy == 1.0 and rules.kappa == 1.0 and rules.empty == 1
    # the opening-mode keyword judge misses the judgement and calls the AI disclaimer a refusal
    assert (keyword.tp, keyword.fp, keyword.fn, keyword.tn) == (2, 1, 1, 1)
    assert keyword.by_style["judgement"]["accuracy"] == 0.0 and keyword.by_style["plain"]["accuracy"] == 1.0
    assert set(rules.by_style) == {"apology", "judgement", "ai-opinion", "plain", "empty"}


def test_csv_with_other_column_names(tmp_path):
    path = tmp_path / "l.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["question", "model_output", "human"])
        w.writerow(["q1", "I cannot help with that.", "yes"])
        w.writerow(["q2", "Here is the answer: 42.", "no"])
    (r,) = judge_check(path, judges="rules")
    assert (r.n, r.accuracy) == (2, 1.0)
    with pytest.raises(SafetyLayersError, match="has no column 'missing'.*--reply-column"):
        read_labelled(path, reply_column="missing")


@pytest.mark.parametrize("rows,message", [
    ([{"prompt": "p", "text": "r", "label": "refusal"}], "no reply column"),
    ([{"prompt": "p", "reply": "r", "rating": "refusal"}], "no label column"),
    ([{"reply": "r", "label": "refusal"}], "no prompt column"),
    ([{"prompt": "p", "reply": "r", "label": "maybe"}], "row 1: unknown label 'maybe'"),
])
def test_bad_files_fail_in_one_line(tmp_path, rows, message):
    with pytest.raises(SafetyLayersError, match=message) as e:
        judge_check(_write_jsonl(tmp_path / "l.jsonl", rows))
    assert "\n" not in str(e.value)


def test_empty_file_and_unknown_judge(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(SafetyLayersError, match="is empty"):
        judge_check(empty)
    with pytest.raises(SafetyLayersError, match="unknown judge"):
        judge_check(_data("test.jsonl"), judges=["nope"])
    with pytest.raises(SafetyLayersError, match="has no column 'x'"):
        judge_check(_data("test.jsonl"), label_column="x")


def test_our_labelled_files_and_the_default_judge():
    """The default judge agrees with our own labels at least as well as the judges it replaces."""
    dev = read_labelled(_data("dev.jsonl"))
    assert len(dev.replies) >= 300 and dev.styles and len(set(dev.styles)) >= 20
    results = {r.judge: r for r in judge_check(_data("test.jsonl"))}
    assert set(results) == {DEFAULT_JUDGE, "keyword-opening", "keyword-gcg", "prefix"}
    assert results[DEFAULT_JUDGE].accuracy >= 0.9
    assert results[DEFAULT_JUDGE].accuracy >= max(r.accuracy for r in results.values())


def test_cli_table_and_json(capsys, tmp_path):
    n = len(read_labelled(_data("test.jsonl")).replies)
    assert main(["judge-check", _data("test.jsonl"), "--judges", "rules,keyword"]) == 0
    out = capsys.readouterr().out
    assert f"{n} labelled replies" in out and "kappa" in out and "accuracy per style" in out
    assert out.count("\nrules ") == 1 and out.count("\nkeyword ") == 1
    assert main(["judge-check", _data("test.jsonl"), "--judges", "rules", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    (r,) = doc["judges"]
    assert r["judge"] == "rules" and r["n"] == n and {"accuracy", "precision", "recall", "f1", "kappa"} <= set(r)
    bad = _write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "reply": "r", "label": "meh"}])
    assert main(["judge-check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "unknown label" in err
