"""NFFT: as many safety-critical weights frozen as the band holds, held bit-identical by gradient masks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from helpers_finetune import benign_rows, one_thread, snapshot, tiny_args, write_jsonl

from safety_layers.core.errors import SafetyLayersError
from safety_layers.finetune import FinetuneConfig, prepare, train_and_save
from safety_layers.finetune.nfft import SCORES_FILE, nfft_masks

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def _cfg(tmp_path: Path, band: str = "1-1", **kw) -> FinetuneConfig:
    data = write_jsonl(tmp_path / "data.jsonl", benign_rows(8))
    return FinetuneConfig(data=str(data), method="nfft", layers=band, max_length=256, overwrite=True,
                          out=str(tmp_path / "out"), nfft_samples=3, nfft_utility=str(data), **kw)


def test_nfft_freezes_the_bands_count_and_keeps_those_entries_and_their_state_at_zero(tmp_path):
    lm = tiny_model("llama", layers=4, seed=0)
    before = snapshot(lm.model)
    band_count = sum(p.numel() for p in lm.blocks.parameters(range(1, 2)).values())
    args = tiny_args(str(tmp_path / "run"), weight_decay=0.1)       # decay is the update a grad mask misses
    prep = prepare(_cfg(tmp_path), args, model=lm)
    masks = {n: m.clone() for n, m in prep.check.masks.items()}
    assert sum(int(m.sum()) for m in masks.values()) == band_count == prep.plan.frozen_params
    # the frozen entries are spread over the layers, not the band itself
    assert len({n.split(".layers.")[1].split(".")[0] for n in masks}) > 1
    result = train_and_save(prep)
    assert result.frozen_check == "passed" and result.method_info["frozen"] == band_count
    params = dict(lm.model.named_parameters())
    state = prep.trainer.optimizer.state
    for n, m in masks.items():
        p = params[n].detach()
        assert torch.equal(p[m], before[n][m]), n
        assert not torch.equal(p[~m], before[n][~m]), n                   # the rest of the matrix trains
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[params[n]][key][m].abs().sum() == 0, (n, key)
    manifest = json.loads((Path(result.out) / "manifest.json").read_text())
    assert manifest["frozen_parts"].startswith("safety-critical") and manifest["frozen"]["params"] == band_count
    assert (tmp_path / "run" / SCORES_FILE).is_file() and not result.method_info["scores_reused"]

    # a second run on the same model reads the stored scores and picks the same entries
    again = prepare(_cfg(tmp_path), tiny_args(str(tmp_path / "run")), model=tiny_model("llama", layers=4, seed=0))
    assert again.method_info["scores_reused"]
    assert all(torch.equal(again.check.masks[n], masks[n]) for n in masks)
    again.check.close()


def test_a_band_nfft_cannot_match_is_one_line(tmp_path):
    with pytest.raises(SafetyLayersError, match=r"band 0-2 freezes .* NFFT can match at most .*narrower band"):
        prepare(_cfg(tmp_path, band="0-2"), tiny_args(str(tmp_path / "run")), model=tiny_model("llama", layers=4))


def test_scores_of_another_model_are_refused(tmp_path):
    prep = prepare(_cfg(tmp_path), tiny_args(str(tmp_path / "run")), model=tiny_model("llama", layers=4))
    prep.check.close()
    with pytest.raises(SafetyLayersError, match="NFFT scores of another model"):
        prepare(_cfg(tmp_path), tiny_args(str(tmp_path / "run")), model=tiny_model("llama", layers=4, hidden=16))


def test_set_difference_skips_the_utility_top_and_takes_the_highest_safety():
    safety = {"a": torch.tensor([[9.0, 8.0, 1.0, 0.5]]), "b": torch.tensor([[7.0, 0.1, 0.2, 6.0]])}
    utility = {"a": torch.tensor([[5.0, 0.0, 0.0, 0.0]]), "b": torch.tensor([[0.0, 0.0, 0.0, 4.0]])}
    masks, info = nfft_masks(safety, utility, 3, utility_top=0.25)
    # a[0] and b[3] are each matrix's utility top-25%: left out although their safety score is high
    assert masks["a"].tolist() == [[False, True, True, False]]
    assert masks["b"].tolist() == [[True, False, False, False]]
    assert info["candidates"] == 6 and info["frozen"] == 3
    # ties (stored scores are bfloat16) break the same way whatever order the scores were read in
    flat = {n: torch.ones(1, 4) for n in ("m.2", "m.10", "m.1")}
    first, _ = nfft_masks(flat, flat, 5, utility_top=0.0)
    second, _ = nfft_masks(dict(reversed(flat.items())), flat, 5, utility_top=0.0)
    assert all(torch.equal(first[n], second[n]) for n in flat) and sum(int(m.sum()) for m in first.values()) == 5
    with pytest.raises(SafetyLayersError, match="can match at most 2"):
        nfft_masks(safety, utility, 3, utility_top=0.75)
