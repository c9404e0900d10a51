"""Lisa: alternating alignment and fine-tuning states with the proximal term."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from helpers_finetune import benign_rows, one_thread, snapshot, tiny_args, write_jsonl

from safety_layers.core.errors import SafetyLayersError
from safety_layers.finetune import FinetuneConfig, prepare, train_and_save
from safety_layers.finetune.lisa import in_alignment_state, proximal

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def _run(tmp_path, rho: float, **kw):
    data = write_jsonl(tmp_path / "data.jsonl", benign_rows(16))
    lm = tiny_model("llama", layers=2, seed=0)
    before = snapshot(lm.model)
    cfg = FinetuneConfig(data=str(data), method="lisa", max_length=256, overwrite=True, out=str(tmp_path / f"o{rho}"),
                         lisa_alignment_steps=1, lisa_finetune_steps=2, lisa_rho=rho, **kw)
    prep = prepare(cfg, tiny_args(str(tmp_path / f"run{rho}"), max_steps=6), model=lm)
    result = train_and_save(prep)
    moved = sum(float((p.detach() - before[n]).pow(2).sum()) for n, p in lm.model.named_parameters())
    return prep, result, moved


def test_the_states_alternate_and_the_proximal_term_holds_weights_back(tmp_path):
    prep, result, free = _run(tmp_path, rho=0.0)
    assert result.global_step == 6 and result.frozen_check == "passed"
    assert prep.trainer.alignment_batches == 2                  # steps 0 and 3 of rounds of 1 + 2
    assert prep.method_info["alignment_examples"] > 100 and prep.method_info["rho"] == 0.0
    _, _, held = _run(tmp_path, rho=1000.0)
    assert held < free


def test_state_schedule_and_proximal_value():
    assert [in_alignment_state(s, 100, 900) for s in (0, 99, 100, 999, 1000)] == [True, True, False, False, True]
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    assert float(proximal([(w, torch.tensor([0.0, 0.0]))], rho=2.0).detach()) == pytest.approx(5.0)


def test_own_alignment_data_and_a_missing_file(tmp_path):
    pairs = write_jsonl(tmp_path / "align.jsonl", [{"prompt": f"Bad thing {i}?", "response": "Sorry, no."}
                                                   for i in range(5)])
    prep, _, _ = _run(tmp_path, rho=1.0, alignment_data=str(pairs))
    assert prep.method_info["alignment_examples"] == 5
    with pytest.raises(SafetyLayersError, match="alignment data .*missing.jsonl does not exist"):
        _run(tmp_path, rho=1.0, alignment_data=str(tmp_path / "missing.jsonl"))


def test_the_baselines_run_as_experiment_cells_and_a_failing_one_is_recorded(tmp_path, monkeypatch):
    from safety_layers.experiment import ExperimentConfig, run_experiment

    monkeypatch.setenv("SAFETY_LAYERS_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "benign.jsonl", benign_rows(16))
    harmful = write_jsonl(tmp_path / "harmful.jsonl", [{"instruction": f"placeholder request {i}",
                                                        "output": f"Sure, placeholder {i}"} for i in range(10)])
    cfg = ExperimentConfig(model="tiny-llama", band="0-0", data=str(data), n=10, harmful_data=str(harmful),
                           scenarios=["harmful-p0.2"], methods=["nfft", "lisa", "rdpo"], lrs=[1e-2], seeds=[0],
                           epochs=1, max_steps=2, max_length=256, drift=None,
                           method_options={"nfft_samples": 2, "lisa_alignment_steps": 1, "lisa_finetune_steps": 1},
                           evaluate={"limit": 2, "max_new_tokens": 2, "over_rejection": None})
    res = run_experiment(cfg, tmp_path / "run", progress=False, model=tiny_model("llama", layers=4))
    assert (res.ran, res.failed) == (2, 1)
    cells = {p.parent.name.split("__")[1]: json.loads(p.read_text()) for p in (tmp_path / "run").glob("cells/*/cell.json")}
    assert cells["nfft"]["status"] == cells["lisa"]["status"] == "done"
    assert cells["nfft"]["finetune"]["method_info"]["frozen"] == cells["nfft"]["finetune"]["frozen_params"] > 0
    assert cells["lisa"]["finetune"]["method_info"]["alignment_steps"] == 1
    assert cells["rdpo"]["status"] == "failed" and "needs compliant_model" in cells["rdpo"]["error"]
    assert (tmp_path / "run" / "shared" / "nfft_scores.safetensors").is_file()
