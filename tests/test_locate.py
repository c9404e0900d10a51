"""Localization: the sweep rules on the paper's own Table 1 counts, the alpha rule, resume,
weight safety, bad input, two processes, and one small run on the real model."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_locate import refusing_tiny_model, tiny_config
from helpers_models import ForwardCounter
from safety_layers.core.errors import SafetyLayersError
from safety_layers.core.layers import LayerRange
from safety_layers.locate import LocateConfig, LocateResult, locate, print_summary
from safety_layers.locate.search import mirror_alpha, search_alpha, sweep_bound

TESTS = Path(__file__).resolve().parent


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared machine they cost a lot."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFETY_LAYERS_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """One complete locate on the tiny model: (run folder, its generation cache, result)."""
    root = tmp_path_factory.mktemp("clean")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFETY_LAYERS_CACHE", str(root / "cache"))
        lm = refusing_tiny_model()
        digest = state_hash(lm.model)
        res = locate(tiny_config(), model=lm, run_dir=root / "run")
        assert state_hash(lm.model) == digest  # weights bit-identical after a whole localization
    return root / "run", root / "cache", res


def state_hash(model) -> str:
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest()


class Table:
    """A counting function backed by a {(start, end): count} table; records the order of its calls."""

    def __init__(self, counts: dict):
        self.counts = counts
        self.calls: list[tuple[int, int]] = []

    def __call__(self, rng: LayerRange) -> int:
        key = (rng.start, rng.end)
        self.calls.append(key)
        return self.counts[key]  # KeyError: the sweep asked for a range outside its window


def run_both(init, num_layers, upper_counts, lower_counts, direction, window=2, **kw):
    """Upper sweep with the lower bound fixed at init's start, then the lower sweep with the found upper bound."""
    up = Table(upper_counts)
    upper, s_up = sweep_bound("upper", init[0], init[1], num_layers, direction=direction, window=window, screen=up,
                              **kw)
    lo = Table(lower_counts)
    band, s_lo = sweep_bound("lower", upper.end, init[0], num_layers, direction=direction, window=window, screen=lo,
                             **kw)
    return band, s_up + s_lo, up, lo


# --------------------------------------------------------------------------- sweep logic on the paper's numbers

def test_llama3_table1_argmax_gives_6_12():
    upper = {(7, 10): 272, (7, 11): 241, (7, 12): 283, (7, 13): 266, (7, 14): 256}
    lower = {(9, 12): 300, (8, 12): 334, (7, 12): 283, (6, 12): 371, (5, 12): 358}  # [9,12] is not in Table 1
    band, sweeps, up, lo = run_both((7, 12), 32, upper, lower, "up")
    assert band == LayerRange(6, 12)
    assert sorted(up.calls) == sorted(upper) and all(s == 7 for s, _ in up.calls)     # lower bound fixed at i
    assert sorted(lo.calls) == sorted(lower) and all(e == 12 for _, e in lo.calls)    # upper bound fixed at k_u
    assert [s["stage"] for s in sweeps] == ["upper", "lower"]                          # interior optima: no widening
    assert sweeps[0]["chosen"] == [7, 12] and sweeps[1]["chosen"] == [6, 12]
    assert [r["range"] for r in sweeps[1]["rows"]] == [[9, 12], [8, 12], [7, 12], [6, 12], [5, 12]]


def test_phi3_table1_argmin_with_alpha_below_one_gives_11_15():
    upper = {(11, 13): 209, (11, 14): 190, (11, 15): 149, (11, 16): 181, (11, 17): 189}
    lower = {(13, 15): 237, (12, 15): 182, (11, 15): 149, (10, 15): 177, (9, 15): 163}
    band, sweeps, _, _ = run_both((11, 15), 32, upper, lower, "down")
    assert band == LayerRange(11, 15) and [s["stage"] for s in sweeps] == ["upper", "lower"]
    up, _ = sweep_bound("upper", 11, 15, 32, direction="up", window=2, screen=Table(upper), max_widen=0)
    assert up == LayerRange(11, 13)  # argmax on the same counts picks the other extreme


def test_gemma_table1_widens_past_an_edge_optimum_and_keeps_6_11():
    upper = {(8, 9): 310, (8, 10): 335, (8, 11): 368, (8, 12): 343, (8, 13): 326}
    lower = {(10, 11): 300, (9, 11): 330, (8, 11): 368, (7, 11): 371, (6, 11): 407,  # [10,11], [9,11] invented
             (5, 11): 404, (4, 11): 323}
    band, sweeps, _, lo = run_both((8, 11), 18, upper, lower, "up")
    assert band == LayerRange(6, 11)
    # 6-11 lies on the window's edge (8±2), so [5,11] and [4,11] are counted too, as in Table 1
    assert [s["stage"] for s in sweeps] == ["upper", "lower", "lower-widened"]
    assert sorted(lo.calls) == sorted(lower)
    band, sweeps, _, _ = run_both((8, 11), 18, upper, lower, "up", max_widen=0)
    assert band == LayerRange(6, 11) and len(sweeps) == 2


def test_edge_optimum_widens_until_inside_and_never_past_the_model():
    rising = Table({(2, e): e for e in range(2, 8)})  # more layers, more refusals: the optimum runs to the edge
    chosen, stages = sweep_bound("upper", 2, 4, 8, direction="up", window=1, screen=rising)
    assert chosen == LayerRange(2, 7)
    assert [s["stage"] for s in stages] == ["upper", "upper-widened", "upper-widened"]
    assert max(e for _, e in rising.calls) == 7 and len(rising.calls) == len(set(rising.calls))
    capped, stages = sweep_bound("upper", 2, 4, 8, direction="up", window=1, screen=Table(rising.counts), max_widen=1)
    assert capped == LayerRange(2, 6) and len(stages) == 2
    # downwards the fixed bound is the limit: [2,2] is the narrowest band there is
    falling = Table({(2, e): 10 - e for e in range(2, 8)})
    chosen, stages = sweep_bound("upper", 2, 4, 8, direction="up", window=1, screen=falling)
    assert chosen == LayerRange(2, 2) and sorted(falling.calls) == [(2, 2), (2, 3), (2, 4), (2, 5)]
    # lower sweep: widening stops at layer 0
    lower = Table({(s, 5): 10 - s for s in range(0, 6)})
    chosen, _ = sweep_bound("lower", 5, 3, 8, direction="up", window=1, screen=lower)
    assert chosen == LayerRange(0, 5) and min(s for s, _ in lower.calls) == 0


def test_ties_go_to_the_narrower_band():
    chosen, _ = sweep_bound("upper", 2, 4, 8, direction="up", window=1, screen=Table({(2, 3): 5, (2, 4): 9, (2, 5): 9}))
    assert chosen == LayerRange(2, 4)
    chosen, _ = sweep_bound("lower", 6, 3, 8, direction="down", window=1,
                            screen=Table({(2, 6): 4, (3, 6): 4, (4, 6): 7}))
    assert chosen == LayerRange(3, 6)  # [3,6] is narrower than [2,6]


def test_screened_shortlist_is_confirmed_and_the_confirmation_decides():
    proxy = Table({(2, 3): 9, (2, 4): 8, (2, 5): 1})
    gen = Table({(2, 3): 3, (2, 4): 6, (2, 5): 9})
    chosen, stages = sweep_bound("upper", 2, 4, 8, direction="up", window=1, screen=proxy, confirm=gen, confirm_top=2)
    assert chosen == LayerRange(2, 4)                        # generation ranks [2,4] over [2,3]
    assert sorted(gen.calls) == [(2, 3), (2, 4)]             # [2,5] is never generated: the proxy ranked it last
    rows = {tuple(r["range"]): r for r in stages[0]["rows"]}
    assert rows[(2, 5)] == {"range": [2, 5], "proxy_count": 1, "count": None, "confirmed": False}
    assert rows[(2, 4)]["count"] == 6 and rows[(2, 4)]["proxy_count"] == 8



def test_every_candidate_within_the_proxy_error_is_confirmed_and_disagreement_is_reported():
    """The proxy's top two ([2,6], [2,7]) miss by up to 4, so [2,8] (proxy 17, within 4 of 20) is recounted,
    its miss of 8 then pulls in [2,5]; generation's winner [2,8] is chosen and the disagreement reported."""
    proxy = Table({(2, 4): 10, (2, 5): 12, (2, 6): 20, (2, 7): 19, (2, 8): 17, (2, 9): 5})
    gen = Table({(2, 4): 10, (2, 5): 12, (2, 6): 18, (2, 7): 15, (2, 8): 25, (2, 9): 5})
    chosen, stages = sweep_bound("upper", 2, 6, 10, direction="up", window=2, screen=proxy, confirm=gen,
                                 confirm_top=2)
    assert chosen == LayerRange(2, 8)
    assert sorted(gen.calls) == [(2, 5), (2, 6), (2, 7), (2, 8)]    # [2,4] and [2,9] lie beyond the error
    last = stages[-1]
    assert last["proxy_error"] == 8 and last["proxy_winner"] == [2, 6] and last["disagree"] is True
    assert "measured error" in last["rule"]


# --------------------------------------------------------------------------- alpha rule

def test_alpha_search_stops_at_the_first_alpha_reaching_the_threshold():
    seen = []

    def sweep(alpha):  # std of [0, d, 0] is d / sqrt(3); d grows with |alpha - 1|
        seen.append(alpha)
        d = round(abs(alpha - 1) * 200)
        return [0, d, 0]

    alpha, hist, reached = search_alpha(sweep, "up", 0.05, 10, threshold=15.0)
    assert reached and alpha == 1.15 and seen == [1.05, 1.1, 1.15]           # 10/√3=5.8, 20/√3=11.5, 30/√3=17.3
    assert [round(h["std"], 2) for h in hist] == [5.77, 11.55, 17.32]
    alpha, hist, reached = search_alpha(sweep, "down", 0.05, 10, threshold=15.0)
    assert reached and alpha == 0.85


def test_alpha_search_cap_takes_the_largest_std_closer_to_one_on_ties():
    counts = {1.05: [1, 2, 3], 1.1: [1, 5, 1], 1.15: [5, 1, 1], 1.2: [2, 2, 2]}
    alpha, hist, reached = search_alpha(lambda a: counts[a], "up", 0.05, 4, threshold=100.0)
    assert not reached and len(hist) == 4 and alpha == 1.1


def test_mirror_alpha():
    assert mirror_alpha(1.2) == 0.8 and mirror_alpha(0.7) == 1.3 and mirror_alpha(2.5) == 0.4


# --------------------------------------------------------------------------- locate on a tiny model

def test_locate_tiny_model_writes_the_evidence(clean):
    run, _, res = clean
    data = json.loads((run / "result.json").read_text())
    assert data["safety_layers"] == [res.safety_layers[0], res.safety_layers[1]] and "range" not in data
    assert LocateResult.from_json(run / "result.json") == res  # the report and the experiment read it back
    assert data["screen"] == "proxy" and data["proxy"]["used"] and data["init_source"] == "user"
    assert data["std_threshold"] == pytest.approx(17.5 / 721 * 16)
    sweeps = data["sweeps"]
    assert sweeps[0]["stage"] == "upper" and all(r["range"][0] == 3 for r in sweeps[0]["rows"])
    lower = [s for s in sweeps if s["bound"] == "lower"]
    assert all(r["range"][1] == data["sweeps"][0]["chosen"][1] for s in lower for r in s["rows"])
    for s in sweeps:  # every row is screened by the proxy; confirmed rows also carry the generation count
        assert all(r["proxy_count"] is not None for r in s["rows"])
        assert all((r["count"] is not None) == r["confirmed"] for r in s["rows"])
    for bound in ("upper", "lower"):  # confirm_top, then every row within the proxy's measured error of the best
        stages = [s for s in sweeps if s["bound"] == bound]
        rows = [r for s in stages for r in s["rows"]]
        err, winner = stages[-1]["proxy_error"], stages[-1]["proxy_winner"]
        best = next(r["proxy_count"] for r in rows if r["range"] == winner)
        assert sum(r["confirmed"] for r in rows) >= 1
        assert all(abs(r["proxy_count"] - best) > err for r in rows if not r["confirmed"])
        assert err == max(abs(r["proxy_count"] - r["count"]) for r in rows if r["confirmed"])
    assert data["count"] == next(r["count"] for s in lower for r in s["rows"] if r["range"] == data["safety_layers"])
    assert data["proxy_generation_spearman"]["n"] >= 3
    assert len(data["table"].splitlines()) == len(sweeps)

    # every count is in the journal, in the order it was taken: the upper sweep before the lower one
    trials = [json.loads(x) for x in (run / "trials.jsonl").read_text().splitlines()]
    scaled = [t for t in trials if t["set"] == "over-rejection" and t["range"] is not None]
    assert {(tuple(t["range"]), t["method"]) for t in scaled} >= {
        (tuple(r["range"]), "proxy") for s in sweeps for r in s["rows"]}
    upper_idx = [i for i, t in enumerate(scaled) if t["range"][0] == 3]
    lower_idx = [i for i, t in enumerate(scaled) if t["range"][0] != 3]
    assert lower_idx and max(upper_idx) < min(lower_idx)
    assert (run / "sweeps.png").stat().st_size > 10_000
    assert {"config.json", "env.json", "samples.jsonl"} <= {p.name for p in run.iterdir()}

    # the console shows counts, never completions
    from rich.console import Console
    buf = io.StringIO()
    print_summary(res, console=Console(file=buf, width=200))
    shown = buf.getvalue()
    assert f"{res.safety_layers[0]}-{res.safety_layers[1]}" in shown
    completions = [json.loads(x)["completion"] for x in (run / "samples.jsonl").read_text().splitlines()]
    assert not [c for c in completions if len(c.strip()) >= 4 and c in shown]


def test_rerun_on_the_same_folder_evaluates_nothing(clean, tmp_path, monkeypatch):
    import shutil

    run, cache, first = clean
    shutil.copytree(run, tmp_path / "run")
    monkeypatch.setenv("SAFETY_LAYERS_CACHE", str(cache))  # samples.jsonl is rewritten from the generation cache
    assert first.evaluations["proxy"] > 5 and first.evaluations["generation"] > 5
    lm = refusing_tiny_model()
    with ForwardCounter(lm.model) as fc:
        again = locate(tiny_config(), model=lm, run_dir=tmp_path / "run")
    assert fc.calls == 0
    assert again.evaluations["proxy"] == again.evaluations["generation"] == 0
    assert again.evaluations["reused"] == first.evaluations["proxy"] + first.evaluations["generation"]
    assert (again.safety_layers, again.count, again.sweeps, again.sanity) == \
        (first.safety_layers, first.count, first.sweeps, first.sanity)
    # other settings in the same folder do not reuse counts that no longer apply
    other = locate(tiny_config(max_new_tokens=3), model=lm, run_dir=tmp_path / "run")
    assert other.evaluations["generation"] > 0 and other.evaluations["proxy"] == 0


def test_crash_mid_candidate_restores_weights_and_keeps_progress(clean, tmp_path, monkeypatch):
    from safety_layers.judges import proxy as proxy_mod

    reference = clean[2]
    lm = refusing_tiny_model()
    digest = state_hash(lm.model)
    original, calls = proxy_mod.FirstTokenProxy.scores, []

    def flaky(self, prompts):
        calls.append(1)
        if len(calls) == 5:  # calibration takes 2 calls, the baseline none: this is the 3rd scaled candidate
            raise RuntimeError("power cut")
        return original(self, prompts)

    monkeypatch.setattr(proxy_mod.FirstTokenProxy, "scores", flaky)
    with pytest.raises(RuntimeError, match="power cut"):
        locate(tiny_config(), model=lm, run_dir=tmp_path / "run")
    assert state_hash(lm.model) == digest
    trials = [json.loads(x) for x in (tmp_path / "run" / "trials.jsonl").read_text().splitlines()]
    assert sum(t["method"] == "proxy" for t in trials) == 4
    monkeypatch.setattr(proxy_mod.FirstTokenProxy, "scores", original)
    resumed = locate(tiny_config(), model=lm, run_dir=tmp_path / "run")
    assert resumed.evaluations["proxy"] == reference.evaluations["proxy"] - 4
    assert resumed.safety_layers == reference.safety_layers and resumed.sweeps == reference.sweeps


def test_alpha_search_on_the_model_records_every_step():
    res = locate(tiny_config(alpha=None, std_threshold=1.5, max_alpha_steps=3), model=refusing_tiny_model())
    assert res.alpha_source == "search" and res.alpha_reached and res.alpha == 1.1
    assert [h["alpha"] for h in res.alpha_search] == [1.05, 1.1]           # stops at the first alpha reaching 1.5
    assert res.alpha_search[0]["std"] < 1.5 <= res.alpha_search[1]["std"]
    assert [r["proxy_count"] for r in res.sweeps[0]["rows"]] == res.alpha_search[1]["counts"]  # reused by the sweep
    capped = locate(tiny_config(alpha=None, std_threshold=100.0, max_alpha_steps=2), model=refusing_tiny_model())
    assert not capped.alpha_reached and capped.alpha == 1.1 and len(capped.alpha_search) == 2
    assert any("no alpha up to 1.1" in note for note in capped.notes)


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, message", [
    (dict(alpha=0), "alpha must be > 0"),
    (dict(alpha=-1.2), "alpha must be > 0"),
    (dict(alpha=0.8), "direction is up"),
    (dict(alpha=1.2, direction="down"), "direction is down"),
    (dict(alpha=1.0), "scales nothing"),
    (dict(direction="sideways"), "unknown direction"),
    (dict(screen="guess"), "unknown screen"),
    (dict(window=0), "window must be >= 1"),
    (dict(alpha_step=1.5), "alpha_step"),
    (dict(components="everything"), "unknown component set"),
    (dict(sanity_alphas="1.2,0.8"), "sanity_alphas"),
])
def test_bad_config_is_one_clear_error(kwargs, message):
    with pytest.raises(SafetyLayersError, match=message):
        LocateConfig(**kwargs)


def test_paper_mode_counts_every_candidate_by_generation_on_the_alpaca_template():
    cfg = LocateConfig(paper=True)
    assert (cfg.template, cfg.screen, cfg.max_new_tokens) == ("alpaca", "generation", 16)
    assert cfg.paper_set == ["template=alpaca", "screen=generation", "judge=keyword", "dtype=float32"] and LocateConfig().paper_set == []
    assert LocateConfig(paper=True, template="chat").template == "chat"  # what the user set stays
    assert LocateConfig(paper=True, screen="proxy").screen == "proxy"
    assert LocateConfig().screen == "proxy" and LocateConfig(malicious="none").malicious is None


def test_bad_input_on_the_model(tmp_path):
    lm = refusing_tiny_model()
    with pytest.raises(SafetyLayersError, match="outside the model: it has 8 decoder layers"):
        locate(tiny_config(init="6-9"), model=lm)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(SafetyLayersError, match="empty"):
        locate(tiny_config(over_rejection=str(empty)), model=lm)
    with pytest.raises(SafetyLayersError, match="is empty"):
        locate(tiny_config(over_rejection=[]), model=lm)
    # a judge under which the model refuses nothing, scaled or not: no meaningless range
    with pytest.raises(SafetyLayersError, match=r"refuses none of the 16 .*--direction down"):
        locate(tiny_config(judge="dummy", alpha=None, max_alpha_steps=2, window=1), model=lm)


# --------------------------------------------------------------------------- two processes

def test_two_processes_find_the_same_band_as_one(clean, tmp_path):
    single = clean[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent / "src"),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "SAFETY_LAYERS_CACHE": str(tmp_path / "cache2")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(TESTS / "helpers_locate.py"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in (0, 1):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert got["world"] == 2
        res = got["result"]
        assert res["safety_layers"] == single.safety_layers and res["count"] == single.count
        assert res["sweeps"] == single.sweeps and res["baseline"] == single.baseline
        assert res["alpha_search"] == single.alpha_search and res["sanity"] == single.sanity
        assert res["proxy"]["threshold"] == pytest.approx(single.proxy["threshold"], rel=1e-6)
        assert res["evaluations"] == single.evaluations
    assert (tmp_path / "run-rank0" / "result.json").is_file() and (tmp_path / "run-rank0" / "trials.jsonl").is_file()
    assert not (tmp_path / "run-rank1").exists()  # only rank 0 writes


# --------------------------------------------------------------------------- the real model

CONTRACT_KEYS = {"model", "num_layers", "over_rejection", "n_prompts", "template", "judge", "direction", "alpha",
                 "baseline", "init_range", "init_source", "alpha_search", "sweeps", "safety_layers", "count",
                 "proxy_generation_spearman", "sanity", "notes", "seconds"}


@pytest.mark.slow
def test_real_model_end_to_end_feeds_finetune(real_model, tmp_path):
    from safety_layers.finetune.run import FinetuneConfig, resolve_band

    cfg = LocateConfig(model="smollm2-135m-instruct", init="5-10", alpha=1.2, window=1, max_widen=0, limit=10,
                       max_new_tokens=4, progress=False)
    res = locate(cfg, model=real_model, run_dir=tmp_path / "loc")
    path = tmp_path / "loc" / "result.json"
    data = json.loads(path.read_text())
    assert CONTRACT_KEYS <= set(data)
    assert data["num_layers"] == 30 and data["n_prompts"] == 10 and data["init_range"] == [5, 10]
    assert set(data["baseline"]) == {"count", "proxy_count"}
    assert set(data["sanity"]) >= {"malicious", "baseline_harmful_rate", "down", "up", "passed"}
    assert data["sanity"]["down"]["alpha"] == 0.8 and data["sanity"]["up"]["alpha"] == 1.2
    assert {"alpha", "std", "counts", "threshold"} <= set(data["alpha_search"][0])
    assert {"stage", "fixed", "rows"} <= set(data["sweeps"][0])
    assert set(data["proxy_generation_spearman"]) == {"rho", "n"}
    band = resolve_band(FinetuneConfig(model="smollm2-135m-instruct", method="sppft", locate=str(path)), 30)
    assert [band.start, band.end] == res.safety_layers
    assert (tmp_path / "loc" / "sweeps.png").is_file() and (tmp_path / "loc" / "trials.jsonl").is_file()
