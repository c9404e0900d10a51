"""Drift diagnostics: weight-change norms, gap curves of a tuned model, does the band still hold."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_model
from helpers_finetune import benign_rows, one_thread, run_case, write_jsonl

from safety_layers.analysis.run import AnalyzeConfig, analyze
from safety_layers.experiment import drift_on_demand
from safety_layers.experiment.drift import (BandProbe, DriftConfig, band_holds, gap_curves, gap_shift, weight_change,
                                            write_drift)
from safety_layers.core.errors import SafetyLayersError
from safety_layers.judges.proxy import FirstTokenProxy
from safety_layers.core.scaling import scaled_layers

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


@pytest.fixture(autouse=True)
def _quiet(monkeypatch, tmp_path):
    monkeypatch.setenv("SAFETY_LAYERS_CACHE", str(tmp_path / "cache"))
    with one_thread():
        yield


def test_weight_change_is_the_relative_frobenius_norm_per_layer():
    base, tuned = tiny_model("llama", seed=0), tiny_model("llama", seed=0)
    with torch.no_grad():
        for w in tuned.blocks.weights(2).values():
            w.mul_(1.1)                                        # every weight of layer 2 moves by 10%
        down = tuned.blocks.weights(3)["mlp.down.weight"]
        delta = torch.full_like(down, 0.01)
        down.add_(delta)
    wc = weight_change(base, tuned, band="0-1")
    per = wc["per_layer_rel_norm"]
    assert per[0] == per[1] == 0.0 and per[2] == pytest.approx(0.1, rel=1e-6)
    assert wc["attn_rel_norm"][2] == pytest.approx(0.1, rel=1e-6) and wc["mlp_rel_norm"][2] == pytest.approx(0.1, rel=1e-6)
    assert wc["attn_rel_norm"][3] == 0.0                       # only the MLP of layer 3 moved
    mlp0 = torch.cat([w.detach().reshape(-1).double() for n, w in base.blocks.weights(3).items() if n.startswith("mlp.")])
    assert wc["mlp_rel_norm"][3] == pytest.approx(delta.double().norm().item() / mlp0.norm().item(), rel=1e-5)
    assert wc["band"] == [0, 1] and wc["band_max"] == 0.0 and wc["outside_mean"] == pytest.approx((per[2] + per[3]) / 2)
    assert wc["embedding_rel_norm"] == 0.0
    with pytest.raises(SafetyLayersError, match="base has 4 layers, the tuned model 3"):
        weight_change(base, tiny_model("llama", layers=3))


@pytest.mark.parametrize("method", ["sppft", "full"])
def test_training_moves_every_layer_but_the_frozen_band(tmp_path, method):
    prep, result, _ = run_case("phi3", method, "1-2", tmp_path)   # fused qkv / gate_up projections
    wc = weight_change(tiny_model("phi3", seed=0), prep.lm, band="1-2")
    per = wc["per_layer_rel_norm"]
    if method == "sppft":
        assert per[1] == per[2] == 0.0 and wc["band_max"] == 0.0 and min(per[0], per[3]) > 0
    else:
        assert min(per) > 0
    assert wc["embedding_rel_norm"] > 0


def test_gap_curves_match_the_analysis_and_shift_by_zero_on_the_same_model(tmp_path):
    lm = tiny_model("llama", seed=1)
    acfg = AnalyzeConfig(limit=6, pairs=20, bootstrap=0, probe=False, progress=False)
    res = analyze(acfg, model=lm)
    g = gap_curves(lm, acfg, progress=False, cache=False)
    assert g["centred"] == res.centred.gap_exact and g["raw"] == res.raw.gap_exact and g["curve"] == "centred"
    shift = gap_shift(g, gap_curves(lm, acfg, progress=False, cache=False))
    assert shift["difference"] == [0.0] * 4 and shift["max_abs"] == 0.0
    other = gap_curves(tiny_model("llama", seed=2), acfg, progress=False, cache=False)
    assert gap_shift(g, other)["max_abs"] > 0


def test_band_holds_compares_the_refusal_rise():
    untuned = {"unscaled": 2, "scaled": 10, "n": 20}
    kept = band_holds(untuned, {"unscaled": 3, "scaled": 9, "n": 20})
    assert kept["rise_untuned"] == 8 and kept["rise_tuned"] == 6 and kept["retained"] == 0.75 and kept["holds"] is True
    lost = band_holds(untuned, {"unscaled": 5, "scaled": 6, "n": 20})
    assert lost["retained"] == 0.125 and lost["holds"] is False
    flat = band_holds({"unscaled": 4, "scaled": 4, "n": 20}, {"unscaled": 1, "scaled": 7, "n": 20})
    assert flat["retained"] is None and flat["holds"] is None


def test_band_probe_counts_with_the_band_scaled_and_restores_it():
    lm = tiny_model("llama", seed=3)
    fp = lm.fingerprint()
    probe = BandProbe(DriftConfig(judge="proxy", limit=8), "1-2", alpha=1.5, progress=False)
    proxy = FirstTokenProxy(lm)
    plain = proxy.scores(probe.prompts)
    with scaled_layers(lm, "1-2", 1.5):
        scaled = proxy.scores(probe.prompts)
    assert not np.allclose(plain, scaled)
    probe.threshold = float(np.median(np.concatenate([plain, scaled])))
    counts = probe.counts(lm)
    assert counts["unscaled"] == int((plain >= probe.threshold).sum())
    assert counts["scaled"] == int((scaled >= probe.threshold).sum())
    assert counts["expected_scaled"] == pytest.approx(scaled.sum()) and counts["n"] == 8
    assert lm.fingerprint() == fp                              # the scaling was undone
    with pytest.raises(SafetyLayersError, match="no threshold"):
        BandProbe(DriftConfig(judge="proxy", limit=2), "1-2", 1.5, progress=False).counts(lm)


def test_drift_config_values():
    assert DriftConfig.from_value(False).enabled is False and DriftConfig.from_value(None).enabled is True
    assert DriftConfig.from_value({"judge": "proxy"}).judge == "proxy"
    with pytest.raises(SafetyLayersError, match=r"unknown key\(s\) in drift: judg; allowed: alpha"):
        DriftConfig.from_value({"judg": "proxy"})
    with pytest.raises(SafetyLayersError, match="keyword or proxy"):
        DriftConfig(judge="llm")
    with pytest.raises(SafetyLayersError, match="must be > 1"):
        DriftConfig(alpha=0.8)


def test_write_drift_assembles_the_cells_and_draws(tmp_path):
    run = tmp_path / "run"
    assert write_drift(run) is None
    base = {"settings": {"band": [1, 2]}, "gap": {"raw": [0, 1, 2, 3], "centred": [0, 2, 4, 1], "curve": "centred"},
            "band_holds": {"probe": {"alpha": 1.2, "judge": "keyword"}, "counts": {"unscaled": 1, "scaled": 5, "n": 9}}}
    (run / "drift").mkdir(parents=True)
    (run / "drift" / "baseline.json").write_text(json.dumps(base))
    for method, per in (("full", [0.1, 0.1, 0.1, 0.1]), ("sppft", [0.1, 0.0, 0.0, 0.1])):
        cell = {"scenario": "implicit", "method": method, "lr": 1e-4, "seed": 0,
                "weight_change": {"per_layer_rel_norm": per}, "gap_curve": [0, 1, 3, 1],
                "band_holds": band_holds(base["band_holds"]["counts"], {"unscaled": 2, "scaled": 4, "n": 9})}
        folder = run / "cells" / f"implicit__{method}__lr0.0001__seed0"
        folder.mkdir(parents=True)
        (folder / "drift.json").write_text(json.dumps(cell))
    out = write_drift(run)
    saved = json.loads((run / "drift" / "drift.json").read_text())
    assert saved == json.loads(json.dumps(out))
    assert saved["band"] == [1, 2] and saved["baseline_gap_curve"] == [0, 2, 4, 1]
    assert set(saved["cells"]) == {"implicit__full__lr0.0001__seed0", "implicit__sppft__lr0.0001__seed0"}
    assert saved["cells"]["implicit__sppft__lr0.0001__seed0"]["band_holds"]["retained"] == 0.5
    for png in ("weight_change.png", "gap_curves.png", "band_holds.png"):
        assert (run / "drift" / png).stat().st_size > 1000


def test_drift_on_demand_for_kept_models(tmp_path):
    from safety_layers.experiment import ExperimentConfig, run_experiment

    data = write_jsonl(tmp_path / "benign.jsonl", benign_rows(12))
    cfg = ExperimentConfig(model="tiny-llama", band="1-2", data=str(data), n=8, scenarios=["normal"],
                           methods=["sppft"], lrs=[1e-2], seeds=[0], epochs=1, max_steps=2, max_length=64,
                           evaluate={"limit": 3, "max_new_tokens": 3, "over_rejection": None},
                           analysis={"limit": 4, "pairs": 10, "bootstrap": 0, "probe": False},
                           drift={"enabled": False, "limit": 3, "max_new_tokens": 3}, keep_models=True)
    run = tmp_path / "run"
    run_experiment(cfg, run, progress=False, model=tiny_model("llama"))
    cell_dir = run / "cells" / "normal__sppft__lr0.01__seed0"
    assert (cell_dir / "train" / "model" / "model.safetensors").is_file() and not (cell_dir / "drift.json").exists()
    out = drift_on_demand(run, progress=False, model=tiny_model("llama"))
    d = out["cells"]["normal__sppft__lr0.01__seed0"]
    per = d["weight_change"]["per_layer_rel_norm"]
    assert per[1] == per[2] == 0.0 and min(per[0], per[3]) > 0 and len(d["gap_curve"]) == 4
    assert json.loads((cell_dir / "cell.json").read_text())["drift"]["band_max_rel_change"] == 0.0
    again = drift_on_demand(run, progress=False, model=tiny_model("llama"))   # nothing left to compute
    assert again["cells"] == json.loads(json.dumps(out["cells"]))
    assert not math.isnan(d["band_holds"]["tuned"]["unscaled"])
