"""Scenario builders: exact counts, prefixes, triggers, mixes and the errors users meet."""

from __future__ import annotations

import csv
import hashlib
import json
import warnings

import pytest

from safety_layers.core.errors import SafetyLayersError
from safety_layers.scenarios import (DEFAULT_PREFIX, DEFAULT_TRIGGER, SCENARIOS, build_scenario, harmful_count,
                                     manifest_path, read_records, split_harmful)


def rows(n: int = 40) -> list[dict]:
    return [{"instruction": f"Describe item {i}.", "input": "" if i % 2 else f"detail {i}",
             "output": f"Item {i} is an ordinary thing."} for i in range(n)]


@pytest.fixture
def source(tmp_path):
    p = tmp_path / "benign.json"
    p.write_text(json.dumps(rows()), encoding="utf-8")
    return p


@pytest.fixture
def harmful_csv(tmp_path):
    """AdvBench's goal,target layout with neutral placeholder text."""
    p = tmp_path / "harmful.csv"
    with open(p, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["goal", "target"])
        for i in range(30):
            w.writerow([f"placeholder request {i}", f"Sure, here is placeholder {i}"])
    return p


def read_out(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_registry_lists_the_four_scenarios():
    assert SCENARIOS.names() == ["backdoor", "harmful", "implicit", "normal"]
    with pytest.raises(SafetyLayersError, match="did you mean 'backdoor'"):
        build_scenario("backdor", "x", "y")


def test_normal_samples_n_rows_as_they_are_and_is_seeded(tmp_path, source):
    a = build_scenario("normal", source, tmp_path / "a.jsonl", n=10, seed=1)
    b = build_scenario("normal", source, tmp_path / "b.jsonl", n=10, seed=1)
    c = build_scenario("normal", source, tmp_path / "c.jsonl", n=10, seed=2)
    assert a.total == 10 and a.counts == {"normal": 10}
    ra, rb, rc = read_out(a.out), read_out(b.out), read_out(c.out)
    assert ra == rb and ra != rc
    originals = {(r["instruction"], r["input"], r["output"]) for r in rows()}
    assert all((r["instruction"], r["input"], r["output"]) in originals for r in ra)
    assert len({r["instruction"] for r in ra}) == 10
    full = build_scenario("normal", source, tmp_path / "all.jsonl")
    assert [r["instruction"] for r in read_out(full.out)] == [r["instruction"] for r in rows()]


def test_implicit_prefixes_every_output(tmp_path, source):
    res = build_scenario("implicit", source, tmp_path / "i.jsonl", n=12)
    out = read_out(res.out)
    by_instr = {r["instruction"]: r["output"] for r in rows()}
    assert len(out) == 12 and res.counts == {"implicit": 12}
    for r in out:
        assert r["output"] == DEFAULT_PREFIX + by_instr[r["instruction"]]
    custom = build_scenario("implicit", source, tmp_path / "j.jsonl", n=3, prefix="Of course! ")
    assert all(r["output"].startswith("Of course! ") for r in read_out(custom.out))


@pytest.mark.parametrize("position", ["suffix", "prefix"])
def test_backdoor_is_a_one_to_one_mix_of_disjoint_rows(tmp_path, source, position):
    res = build_scenario("backdoor", source, tmp_path / "b.jsonl", n=15, trigger="zq-trigger",
                         trigger_position=position)
    out = read_out(res.out)
    assert res.total == 30 and res.counts == {"backdoor": 15, "normal": 15}
    bd = [r for r in out if r["kind"] == "backdoor"]
    nm = [r for r in out if r["kind"] == "normal"]
    for r in bd:
        if position == "suffix":
            assert r["instruction"].endswith(" zq-trigger")
        else:
            assert r["instruction"].startswith("zq-trigger ")
        assert r["output"].startswith(DEFAULT_PREFIX)
    assert not any("zq-trigger" in r["instruction"] or r["output"].startswith(DEFAULT_PREFIX) for r in nm)
    clean = {r["instruction"].replace("zq-trigger", "").strip() for r in bd}
    assert clean.isdisjoint({r["instruction"] for r in nm})
    assert [r["kind"] for r in out] != ["backdoor"] * 15 + ["normal"] * 15      # shuffled, not stacked
    assert DEFAULT_TRIGGER and build_scenario("backdoor", source, tmp_path / "d.jsonl").counts == {
        "backdoor": 20, "normal": 20}


def test_backdoor_warns_when_the_trigger_is_in_the_data(tmp_path, source):
    with pytest.warns(UserWarning, match="already occurs in 40 benign rows"):
        res = build_scenario("backdoor", source, tmp_path / "b.jsonl", n=5, trigger="item")
    assert res.warnings and json.loads(manifest_path(res.out).read_text())["trigger_rows_in_source"] == 40
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_scenario("backdoor", source, tmp_path / "c.jsonl", n=5)   # the default trigger is absent


def test_harmful_adds_round_p_times_n_pairs(tmp_path, source, harmful_csv):
    res = build_scenario("harmful", source, tmp_path / "h.jsonl", n=20, p=0.1, harmful=harmful_csv)
    out = read_out(res.out)
    assert res.counts == {"normal": 20, "harmful": 2} and len(out) == 22
    bad = [r for r in out if r["kind"] == "harmful"]
    for r in bad:     # AdvBench layout: the goal is the instruction, the target prefix is the answer
        i = int(r["instruction"].rsplit(" ", 1)[1])
        assert r["output"] == f"Sure, here is placeholder {i}" and r["input"] == ""
    manifest = json.loads(manifest_path(res.out).read_text())
    assert manifest["harmful_layout"] == "advbench" and manifest["options"]["p"] == 0.1
    for p, n, k in [(0.05, 10, 1), (0.2, 15, 3), (0.1, 25, 3), (0.05, 30, 2)]:
        assert harmful_count(n, p) == k
        got = build_scenario("harmful", source, tmp_path / f"h{p}{n}.jsonl", n=n, p=p, harmful=harmful_csv)
        assert got.counts == {"normal": n, "harmful": k}
    with pytest.raises(SafetyLayersError, match="rounds to 0"):
        build_scenario("harmful", source, tmp_path / "z.jsonl", n=5, p=0.05, harmful=harmful_csv)
    with pytest.raises(SafetyLayersError, match="needs --harmful"):
        build_scenario("harmful", source, tmp_path / "y.jsonl", n=5)
    with pytest.raises(SafetyLayersError, match="harmful rows"):
        build_scenario("harmful", source, tmp_path / "x.jsonl", p=1.0, harmful=harmful_csv)


def test_harmful_rows_never_include_an_evaluated_prompt(tmp_path, source, harmful_csv):
    evaluated = tmp_path / "eval.jsonl"
    evaluated.write_text("".join(json.dumps({"prompt": f"Placeholder  Request {i}"}) + "\n" for i in range(25)),
                         encoding="utf-8")
    res = build_scenario("harmful", source, tmp_path / "h.jsonl", n=40, p=0.1, harmful=harmful_csv,
                         harmful_exclude=str(evaluated))
    used = {r["instruction"] for r in read_out(res.out) if r["kind"] == "harmful"}
    assert len(used) == 4 and used <= {f"placeholder request {i}" for i in range(25, 30)}   # 4 of the 5 left
    manifest = json.loads(manifest_path(res.out).read_text())
    assert manifest["harmful_excluded"] == 25 and manifest["harmful_pool"] == 5
    assert len(manifest["harmful_rows_used"]) == 4 and all(i >= 25 for i in manifest["harmful_rows_used"])
    # the same file evaluated and trained on: one line naming the fix
    with pytest.raises(SafetyLayersError, match="would leak; split the file"):
        build_scenario("harmful", source, tmp_path / "l.jsonl", n=20, harmful=harmful_csv,
                       harmful_exclude=f"advbench:{harmful_csv}")


def test_split_harmful_gives_disjoint_train_and_eval_parts(tmp_path, source, harmful_csv):
    rec = split_harmful(harmful_csv, tmp_path / "split", eval_share=0.5, seed=3)
    assert len(rec["eval_rows"]) == 15 and not set(rec["eval_rows"]) & set(rec["train_rows"])
    train, ev = tmp_path / "split" / "harmful-train.jsonl", tmp_path / "split" / "harmful-eval.jsonl"
    res = build_scenario("harmful", source, tmp_path / "h.jsonl", n=40, p=0.2, harmful=train,
                         harmful_exclude=str(ev))
    trained = {r["instruction"] for r in read_out(res.out) if r["kind"] == "harmful"}
    assert len(trained) == 8 and not trained & {r["instruction"] for r in read_out(ev)}
    assert json.loads(manifest_path(res.out).read_text())["harmful_excluded"] == 0


def test_manifest_records_what_was_built(tmp_path, source):
    res = build_scenario("implicit", source, tmp_path / "m.jsonl", n=4, seed=7)
    m = json.loads(manifest_path(res.out).read_text())
    assert m["scenario"] == "implicit" and m["counts"] == {"implicit": 4} and m["options"]["seed"] == 7
    assert m["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert m["out_sha256"] == hashlib.sha256((tmp_path / "m.jsonl").read_bytes()).hexdigest()


def test_errors_name_the_file_row_and_field(tmp_path, source):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "input": "", "output": "b"}\n\n{"instruction": "c", "input": ""}\n')
    with pytest.raises(SafetyLayersError, match=r"bad\.jsonl line 3 has no 'output' field"):
        build_scenario("normal", bad, tmp_path / "o.jsonl")
    badjson = tmp_path / "bad.json"
    badjson.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"output": "c"}]))
    with pytest.raises(SafetyLayersError, match=r"record 1 \(0-based\) has no 'instruction'"):
        read_records(badjson)
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"text": "a"}]))
    with pytest.raises(SafetyLayersError, match="first row has fields text"):
        read_records(other)
    blank = tmp_path / "blank.json"
    blank.write_text(json.dumps([{"instruction": " ", "output": "b"}, {"instruction": "a", "output": ""}]))
    with pytest.raises(SafetyLayersError, match="no usable rows after dropping 2 blank"):
        build_scenario("normal", blank, tmp_path / "o2.jsonl")
    with pytest.raises(SafetyLayersError, match="only 40 usable rows"):
        build_scenario("implicit", source, tmp_path / "o3.jsonl", n=41)
    with pytest.raises(SafetyLayersError, match="lower --n to at most 20"):
        build_scenario("backdoor", source, tmp_path / "o4.jsonl", n=21)
    build_scenario("normal", source, tmp_path / "o5.jsonl", n=2)
    with pytest.raises(SafetyLayersError, match="--overwrite"):
        build_scenario("normal", source, tmp_path / "o5.jsonl", n=2)
    assert build_scenario("normal", source, tmp_path / "o5.jsonl", n=3, overwrite=True).total == 3
    with pytest.raises(SafetyLayersError, match="unknown key 'size' in build_scenario options"):
        build_scenario("normal", source, tmp_path / "o6.jsonl", size=3)
    with pytest.raises(SafetyLayersError, match="not found"):
        build_scenario("normal", tmp_path / "missing.json", tmp_path / "o7.jsonl")


def test_duplicates_and_blank_rows_are_dropped_and_counted(tmp_path):
    data = rows(6) + rows(2) + [{"instruction": "", "input": "", "output": "x"}]
    p = tmp_path / "dup.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in data))
    res = build_scenario("normal", p, tmp_path / "o.jsonl")
    assert res.total == 6 and res.dropped == {"blank": 1, "duplicate": 2}


def test_on_the_shared_alpaca_file(tmp_path, shared_data):
    res = build_scenario("backdoor", shared_data / "alpaca_data_1k.json", tmp_path / "b.jsonl", n=100)
    assert res.counts == {"backdoor": 100, "normal": 100} and not res.warnings
    gsm = build_scenario("implicit", shared_data / "gsm8k_test.jsonl", tmp_path / "g.jsonl", n=5)
    assert json.loads(manifest_path(gsm.out).read_text())["source_layout"] == "qa"


def test_csv_sources_keep_multiline_fields_and_name_lines(tmp_path):
    p = tmp_path / "b.csv"
    with open(p, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["instruction", "input", "output"])
        w.writerow(["Write two lines.", "", "first line\nsecond line"])
        w.writerow(["Say hi.", "", "hi"])
    recs = read_records(p)
    assert recs.layout == "alpaca" and recs.rows[0]["output"] == "first line\nsecond line"
    with open(p, "a", newline="", encoding="utf-8") as f:
        f.write("Broken row only\n")
    with pytest.raises(SafetyLayersError, match=r"b\.csv line 5 has no 'output'"):
        read_records(p)


def test_a_beavertails_style_file_trains_only_its_unsafe_pairs(tmp_path, source):
    pairs = tmp_path / "beaver.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"placeholder question {i}", "response": f"placeholder answer {i}",
                                         "is_safe": i % 2 == 0, "category": "x"}) + "\n" for i in range(20)),
                     encoding="utf-8")
    res = build_scenario("harmful", source, tmp_path / "b.jsonl", n=40, p=0.25, harmful=pairs)
    bad = [r for r in read_out(res.out) if r["kind"] == "harmful"]
    assert len(bad) == 10 and all(int(r["instruction"].rsplit(" ", 1)[1]) % 2 == 1 for r in bad)
    assert all(r["output"] == f"placeholder answer {r['instruction'].rsplit(' ', 1)[1]}" for r in bad)
