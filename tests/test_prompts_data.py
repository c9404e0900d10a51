"""Templates and prompt-set loaders."""

import json

import pytest

from conftest import byte_tokenizer
from safety_layers.core.data import load_prompts, read_located_rows, read_records, read_rows
from safety_layers.core.errors import SafetyLayersError
from safety_layers.core.prompts import render, resolve_template


def test_alpaca_template_is_the_papers_string():
    r = render(byte_tokenizer(), "Name a color.", "alpaca")
    assert r.text == ("Below is an instruction that describes a task. Write a response that appropriately "
                      "completes the request.\n\n### Instruction:\nName a color.\n\n### Response:\n")
    assert r.add_special_tokens
    r = render(byte_tokenizer(), "Sum these.", "alpaca", input="1, 2")
    assert "### Input:\n1, 2\n\n### Response:\n" in r.text and "paired with an input" in r.text


def test_chat_template_adds_generation_prompt_and_no_double_bos():
    r = render(byte_tokenizer(), "Hi", "chat")
    assert r.text.endswith("<|im_start|>assistant\n") and not r.add_special_tokens


def test_plain_fallback_without_chat_template():
    tok = byte_tokenizer(chat=False)
    assert resolve_template(tok, "chat") == "plain"
    assert render(tok, "Hi").text == "User: Hi\nAssistant:"
    with pytest.raises(SafetyLayersError, match="unknown template"):
        render(tok, "Hi", "vicuna")


def test_builtin_sets_load():
    for name, n in (("normal", 100), ("malicious", 100), ("over-rejection", 200)):
        s = load_prompts(name)
        assert len(s) >= n and all(p.strip() for p in s.prompts)
    assert load_prompts("over_rejection").name == "over-rejection"


def test_file_formats_and_columns(tmp_path):
    (tmp_path / "a.csv").write_text("id,question\n1,What is up?\n2,Why?\n")
    assert load_prompts(str(tmp_path / "a.csv")).prompts == ["What is up?", "Why?"]
    (tmp_path / "b.jsonl").write_text('{"q": "one"}\n{"q": "two"}\n')
    assert load_prompts(f"{tmp_path / 'b.jsonl'}:q").prompts == ["one", "two"]
    (tmp_path / "c.json").write_text(json.dumps([{"instruction": "Add", "input": "1 2", "output": "3"}]))
    assert load_prompts(str(tmp_path / "c.json")).prompts == ["Add\n\n1 2"]
    (tmp_path / "d.txt").write_text("alpha\n\nbeta\n")
    assert load_prompts(str(tmp_path / "d.txt"), limit=1).prompts == ["alpha"]


def test_one_reader_for_every_data_file(tmp_path):
    """Prompt sets and instruction records come through the same reader: same formats, same locations."""
    rows = [{"instruction": "Add", "input": "1 2", "output": "3"}, {"instruction": "Sub", "output": "0"}]
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows, "version": 1}))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))   # JSONL named .json
    (tmp_path / "lines.jsonl").write_text("".join(json.dumps(r) + "\n\n" for r in rows))
    (tmp_path / "tabs.tsv").write_text("instruction\tinput\toutput\nAdd\t1 2\t3\nSub\t\t0\n")
    for name in ("list.json", "wrapped.json", "lines.json", "lines.jsonl", "tabs.tsv"):
        found, cols = read_rows(tmp_path / name)
        assert [r["instruction"] for r in found] == ["Add", "Sub"] and cols[:2] == ["instruction", "input"], name
        assert read_records(tmp_path / name).rows[0] == {"instruction": "Add", "input": "1 2", "output": "3"}
    assert [w for w, _ in read_located_rows(tmp_path / "lines.jsonl")] == ["line 1", "line 3"]
    assert [w for w, _ in read_located_rows(tmp_path / "list.json")] == ["record 0 (0-based)", "record 1 (0-based)"]
    assert read_rows(tmp_path / "lines.json")[0] == read_rows(tmp_path / "list.json")[0]
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(SafetyLayersError, match="unsupported file type '.parquet'"):
        read_rows(tmp_path / "x.parquet")
    (tmp_path / "two.json").write_text(json.dumps({"a": [1], "b": [2]}))
    with pytest.raises(SafetyLayersError, match="one list inside an object"):
        read_rows(tmp_path / "two.json")


def test_loader_errors_are_one_line(tmp_path):
    (tmp_path / "a.csv").write_text("id,question\n1,What?\n")
    with pytest.raises(SafetyLayersError, match="no column 'prompt'; columns: id, question"):
        load_prompts(f"{tmp_path / 'a.csv'}:prompt")
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(SafetyLayersError, match="empty"):
        load_prompts(str(tmp_path / "e.csv"))
    with pytest.raises(SafetyLayersError, match="not found"):
        load_prompts(str(tmp_path / "missing.csv"))
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(SafetyLayersError, match="not valid JSON"):
        load_prompts(str(tmp_path / "bad.json"))
    with pytest.raises(SafetyLayersError, match="at least 2"):
        load_prompts(["only one"]).require(2)


def test_benchmark_presets(shared_data):
    adv = load_prompts(f"advbench:{shared_data / 'harmful_behaviors.csv'}")
    assert len(adv) == 520 and adv.prompts[0].startswith("Write a script that can exploit")
    safe = load_prompts(f"xstest-safe:{shared_data / 'xstest_prompts.csv'}")
    unsafe = load_prompts(f"xstest-unsafe:{shared_data / 'xstest_prompts.csv'}")
    assert (len(safe), len(unsafe)) == (250, 200)
    assert all(m["label"] == "safe" for m in safe.meta)
