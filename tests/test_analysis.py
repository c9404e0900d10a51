"""Cosine statistics, angle gaps, the initial-range rule and its bootstrap."""

import random

import numpy as np
import pytest
import torch

from safety_layers.analysis.curves import (_deg, _gram_gap, analyze_states, bootstrap_range, curves, initial_range,
                                           sample_pairs)
from safety_layers.core.errors import SafetyLayersError


def synthetic(n=20, m=20, layers=8, d=16, split_from=4, seed=0):
    """N and M share a direction everywhere; from layer `split_from` M moves off along its own axis."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=g)
    hn = base + 0.3 * torch.randn(n, layers, d, generator=g)
    hm = base + 0.3 * torch.randn(m, layers, d, generator=g)
    push = torch.zeros(layers)
    push[split_from:] = torch.linspace(0.5, 1.5, layers - split_from)
    hm = hm + push[None, :, None] * torch.eye(d)[0]
    return hn.double(), hm.double()


def test_exact_means_equal_brute_force():
    hn, hm = synthetic()
    c = curves(hn, hm, r=50)
    k = 5
    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a, b, dim=0))  # noqa: E731
    nn = np.mean([cos(hn[i, k], hn[j, k]) for i in range(20) for j in range(20) if i != j])
    nm = np.mean([cos(hn[i, k], hm[j, k]) for i in range(20) for j in range(20)])
    assert c.nn_exact[k] == pytest.approx(nn, abs=1e-10)
    assert c.nm_exact[k] == pytest.approx(nm, abs=1e-10)
    assert c.gap_exact[k] == pytest.approx(float(_deg(nm) - _deg(nn)), abs=1e-8)
    angles = lambda pairs: np.mean([float(_deg(cos(*p))) for p in pairs])  # noqa: E731
    paper = angles([(hn[i, k], hm[j, k]) for i in range(20) for j in range(20)]) - \
        angles([(hn[i, k], hn[j, k]) for i in range(20) for j in range(20) if i != j])
    assert c.gap_exact_paper[k] == pytest.approx(paper, abs=1e-8)


def test_sampling_follows_the_released_code_seeds():
    pairs = sample_pairs(30, None, 3, seed=10)
    random.seed(11)
    assert pairs[1] == tuple(random.sample(range(30), 2))
    assert all(i != j for i, j in sample_pairs(5, None, 200, 10))


def test_gap_opens_where_the_sets_split_and_centring_is_reported():
    hn, hm = synthetic()
    out = analyze_states(hn, hm, pairs=100, bootstrap=20, probe=True)
    raw, cen = out["raw"], out["centred"]
    assert max(abs(g) for g in raw.gap_exact[:4]) < 1.5 < raw.gap_exact[5] < raw.gap_exact[7]
    assert out["initial_range"][0] >= 3 and out["initial_range"][1] <= 7
    assert out["probe_accuracy"][7] > 0.9 and out["probe_accuracy"][0] < 0.8
    assert cen.centre == "joint" and len(cen.gap_exact) == 8


def test_paper_curve_reads_the_range_from_the_papers_gap_definition():
    """range_curve='paper' (paper mode's) reads the range from the mean of per-pair angles over
    the sampled pairs, not from the code's angle of the exact mean, and says so in the rule."""
    hn, hm = synthetic()
    out = analyze_states(hn, hm, pairs=100, range_curve="paper", bootstrap=0, probe=False)
    raw = out["raw"]
    assert raw.gap_paper != raw.gap_exact                       # two definitions, two curves
    assert out["initial_range"] == initial_range(raw.gap_paper)
    assert "paper's definition" in out["range_rule"]
    assert analyze_states(hn, hm, pairs=100, range_curve="raw", bootstrap=0, probe=False)["initial_range"] == \
        initial_range(raw.gap_exact)
    with pytest.raises(SafetyLayersError, match="unknown range curve 'exact'"):
        analyze_states(hn, hm, range_curve="exact")


def test_gram_gap_with_unit_weights_equals_exact_curves():
    hn, hm = synthetic()
    x = torch.cat([hn, hm])
    G = torch.einsum("ikd,jkd->kij", x, x)
    w = torch.ones(40, dtype=torch.float64)
    assert np.allclose(_gram_gap(G, 20, w, centre=False), curves(hn, hm, 10).gap_exact, atol=1e-8)
    assert np.allclose(_gram_gap(G, 20, w, centre=True), curves(hn, hm, 10, centre="joint").gap_exact, atol=1e-8)


def test_initial_range_rule():
    gap = [0, 0.1, 0, 0.2, 2, 5, 8, 9.5, 10, 10, 9.8]
    assert initial_range(gap) == [4, 7]          # smoothed: 2.4 at 4 (>20% of rise), 9.17 at 7 (>80%)
    assert initial_range([0.1, 0.2, 0.1, 0.15]) is None            # no rise: no range
    assert initial_range([5, 4, 3, 2, 1]) is None                   # falls only


def test_bootstrap_interval_contains_the_point_estimate():
    hn, hm = synthetic()
    b = bootstrap_range(hn, hm, centre=True, samples=40, seed=1)
    point = initial_range(curves(hn, hm, 10, centre="joint").gap_exact)
    assert b["start_ci"][0] <= point[0] <= b["start_ci"][1]
    assert b["end_ci"][0] <= point[1] <= b["end_ci"][1]
    assert 0 < b["mode_share"] <= 1


def test_too_few_prompts():
    hn, hm = synthetic(n=1)
    with pytest.raises(SafetyLayersError, match="at least 2"):
        analyze_states(hn, hm)


def test_paper_mode_sets_only_what_is_unset():
    from safety_layers.analysis import AnalyzeConfig

    cfg = AnalyzeConfig(paper=True)
    assert (cfg.template, cfg.range_curve, cfg.paper_set) == ("alpaca", "paper", ["template=alpaca", "range_curve=paper", "dtype=float32"])
    kept = AnalyzeConfig(paper=True, template="chat")
    assert (kept.template, kept.range_curve, kept.paper_set) == ("chat", "paper", ["range_curve=paper", "dtype=float32"])
    ours = AnalyzeConfig()
    assert (ours.model, ours.template, ours.range_curve, ours.paper_set) == ("demo", "chat", "centred", [])


def test_analyze_writes_a_result_that_reads_back(tmp_path, monkeypatch):
    from conftest import tiny_model
    from safety_layers.analysis import AnalyzeConfig, AnalyzeResult, analyze

    monkeypatch.setenv("SAFETY_LAYERS_CACHE", str(tmp_path / "cache"))
    cfg = AnalyzeConfig(model="tiny", limit=6, pairs=20, bootstrap=5, progress=False)
    res = analyze(cfg, model=tiny_model("llama"), run_dir=tmp_path / "run")
    back = AnalyzeResult.from_json(tmp_path / "run" / "result.json")
    assert back == res and isinstance(back.raw, type(res.raw)) and len(back.centred.gap_exact) == res.num_layers
    assert (tmp_path / "run" / "analysis.png").stat().st_size > 10_000
    (tmp_path / "bad.json").write_text('{"model": "m"}')
    with pytest.raises(SafetyLayersError, match="bad.json"):
        AnalyzeResult.from_json(tmp_path / "bad.json")


def test_reference_model_is_rendered_in_the_aligned_models_format(monkeypatch, tmp_path):
    """A base reference without a chat template gets the aligned model's, so the curves compare models, not
    formats; the result says which format both used."""
    from conftest import byte_tokenizer, tiny_model

    from safety_layers.analysis import AnalyzeConfig, analyze
    from safety_layers.core import models
    from safety_layers.core.prompts import render

    aligned, base = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    base.tokenizer = byte_tokenizer(chat=False)
    seen = []
    real_render = render

    def spy(tokenizer, instruction, template="chat", **kw):
        out = real_render(tokenizer, instruction, template, **kw)
        seen.append((tokenizer is base.tokenizer, out.text))
        return out

    monkeypatch.setattr("safety_layers.engine.activations.render", spy)
    monkeypatch.setenv("SAFETY_LAYERS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "load_or_use", lambda m, *a, **k: base if m == "base" else m)
    prompts = ["How do I bake bread?", "Name a prime number", "Write a poem", "Sort a list"]
    (tmp_path / "n.txt").write_text("\n".join(prompts))
    (tmp_path / "m.txt").write_text("\n".join(p + " to hurt someone" for p in prompts))
    cfg = AnalyzeConfig(model="tiny", normal=str(tmp_path / "n.txt"), malicious=str(tmp_path / "m.txt"),
                        reference_model="base", bootstrap=0, probe=False, progress=False)
    res = analyze(cfg, model=aligned)
    assert res.reference["template"].startswith("chat")
    texts = {is_ref: {t for r, t in seen if r == is_ref} for is_ref in (True, False)}
    assert texts[True] and texts[True] == texts[False]
    assert not any(t.startswith("User:") for t in texts[True])


def test_bootstrap_layer_interval_is_not_truncated():
    """3 of 100 resamples end at layer 4: 3 % lie above 3, so the 95 % interval must reach 4 (int() gave 3)."""
    from safety_layers.analysis.curves import layer_interval

    assert layer_interval([3] * 97 + [4] * 3) == [3, 4]
    assert layer_interval([2] * 3 + [3] * 97) == [2, 3]
    assert layer_interval([5] * 10) == [5, 5]
