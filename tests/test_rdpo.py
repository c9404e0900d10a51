"""Reverse DPO through TRL's DPOTrainer, with and without the band frozen."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model
from helpers_finetune import invariants, one_thread, snapshot, tiny_args, write_jsonl

from safety_layers.core.errors import SafetyLayersError
from safety_layers.finetune import FinetuneConfig, prepare, train_and_save
from safety_layers.finetune.baseline_data import alignment_examples
from safety_layers.finetune.rdpo import build_pairs, preference_pairs

pytest.importorskip("trl")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def _pairs(tmp_path, n: int = 8):
    return write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Do bad thing {i}.", "chosen": f"Step one of {i}.",
                                                  "rejected": "Sorry, I can't help with that."} for i in range(n)])


@pytest.mark.parametrize("method,band", [("rdpo", None), ("rdpo-sppft", "1-1")])
def test_reverse_dpo_trains_on_the_stored_pairs(tmp_path, method, band):
    lm = tiny_model("llama", layers=3, seed=0)
    before = snapshot(lm.model)
    cfg = FinetuneConfig(method=method, layers=band, max_length=128, overwrite=True, out=str(tmp_path / "out"),
                         rdpo_pairs=str(_pairs(tmp_path)))
    prep = prepare(cfg, tiny_args(str(tmp_path / "run"), max_steps=2), model=lm)
    result = train_and_save(prep)
    assert result.global_step == 2 and result.frozen_check == "passed" and result.samples == 8
    assert prep.method_info["pairs_reused"] and prep.data is None
    inv = invariants(prep, before)
    if band:
        assert inv["frozen_changed"] == [] and all(".layers.1." in n for n in inv["frozen_unchanged"])
        assert inv["frozen_unchanged"] and inv["frozen_with_state"] == []
    else:
        assert inv["frozen_unchanged"] == [] and len(inv["trainable_changed"]) > 10
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["method"] == method and manifest["method_info"]["beta"] == 0.1


def test_pairs_are_generated_once_into_the_run_folder(tmp_path, capsys):
    compliant = tiny_model("llama", layers=2, seed=5)
    examples = alignment_examples(None, 3, seed=0)
    counts = build_pairs(compliant, examples, 8, "chat", tmp_path / "pairs.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert counts["pairs"] == len(rows) == 3 - counts["dropped_refused"]
    assert all(r["rejected"].startswith("Sorry") and r["prompt"] in {e.prompt for e in examples} for r in rows)
    out = capsys.readouterr().out
    assert not any(r["chosen"] in out for r in rows if r["chosen"])          # replies are never printed


def test_a_compliant_model_that_refuses_gives_one_line():
    prompts = ["Do bad thing 1.", "Do bad thing 2."]
    pairs, dropped = preference_pairs(prompts, ["Sorry, no."] * 2, ["Here is how: first...", "I'm sorry, I can't."])
    assert len(pairs) == 1 and dropped == 1 and pairs[0]["chosen"].startswith("Here is how")
    with pytest.raises(SafetyLayersError, match="refused all 2 malicious prompts.*compliant_model"):
        preference_pairs(prompts, ["Sorry, no."] * 2, ["I'm sorry, I can't.", "I cannot help with that."])


def test_a_model_without_a_known_compliant_one_needs_the_option(tmp_path):
    cfg = FinetuneConfig(model="some/aligned-model", method="rdpo", overwrite=True)
    with pytest.raises(SafetyLayersError, match="needs compliant_model"):
        prepare(cfg, tiny_args(str(tmp_path / "run")), model=tiny_model("llama", layers=2))


def test_dry_run_lists_every_cell_with_rows_and_steps(tmp_path):
    from safety_layers.experiment import ExperimentConfig
    from safety_layers.experiment.plan import plan, plan_text

    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(30)])
    cfg = ExperimentConfig(model="m", band="1-2", data=str(data), harmful_data="h.csv", epochs=3, batch_size=4,
                           n={"harmful": 20}, scenarios=["normal", "backdoor", "harmful-p0.1"],
                           methods=["full", "lisa", "rdpo"], method_options={"lisa_alignment_steps": 2,
                                                                            "lisa_finetune_steps": 3})
    cells = {(c["scenario"], c["method"]): c for c in plan(cfg)}
    assert len(cells) == 9
    assert (cells[("normal", "full")]["rows"], cells[("normal", "full")]["steps"]) == (30, 24)      # 8 batches x 3
    assert (cells[("backdoor", "full")]["rows"], cells[("backdoor", "full")]["steps"]) == (30, 24)  # 2 x 15
    assert (cells[("harmful-p0.1", "full")]["rows"], cells[("harmful-p0.1", "full")]["steps"]) == (22, 18)
    assert cells[("harmful-p0.1", "lisa")]["note"] == "8 of the steps on alignment data"            # 2 per 5, 18 steps
    assert cells[("normal", "rdpo")]["rows"] == 414 and cells[("normal", "rdpo")]["steps"] == 312
    assert "| normal | full | 0.0001 | 0 | 30 | 24 |" in plan_text(cfg)
