"""The experiment grid: cell ids, resume, failures recorded, results aggregation, config checks."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import tiny_model
from helpers_finetune import benign_rows, one_thread, write_jsonl

from safety_layers.finetune import run as ft
from safety_layers.core.errors import SafetyLayersError
from safety_layers.experiment import (ExperimentConfig, aggregate, cell_id, grid, method_band, read_experiment,
                                  results_markdown, run_experiment, t_interval)
from safety_layers.core.layers import LayerRange

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


class CountTraining:
    """Wraps finetune.train_and_save to count how many cells really trained."""

    def __init__(self, mp):
        self.calls = []
        real = ft.train_and_save

        def wrapped(prep):
            self.calls.append(prep.cfg.method)
            return real(prep)

        mp.setattr(ft, "train_and_save", wrapped)


def tiny_config(data: Path, **overrides) -> ExperimentConfig:
    base = dict(model="tiny-llama", band="0-1", data=str(data), n=8, scenarios=["normal", "implicit"],
                methods=["full", "sppft", "freeze-before"], lrs=[1e-2], seeds=[0], epochs=1, max_steps=2,
                max_length=64, evaluate={"limit": 4, "max_new_tokens": 4},
                analysis={"limit": 4, "pairs": 20, "bootstrap": 0, "probe": False},
                drift={"limit": 4, "max_new_tokens": 4})
    base.update(overrides)
    return ExperimentConfig(**base)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny experiment: 2 scenarios x (full, sppft, freeze-before) with the band at layer 0,
    so freeze-before fails and the other four cells train."""
    root = tmp_path_factory.mktemp("experiment")
    data = write_jsonl(root / "benign.jsonl", benign_rows(16))
    with pytest.MonkeyPatch.context() as mp, one_thread():
        mp.setenv("SAFETY_LAYERS_CACHE", str(root / "cache"))
        counter = CountTraining(mp)
        cfg = tiny_config(data)
        result = run_experiment(cfg, root / "run", progress=False, model=tiny_model("llama"))
    return {"root": root, "run": root / "run", "cfg": cfg, "result": result, "trained": counter.calls, "data": data}


def _cells(run: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in (run / "cells").glob("*/cell.json")}


# --------------------------------------------------------------------------- grid and methods

def test_cell_grid_and_ids():
    cfg = ExperimentConfig(data="x.json", scenarios=["normal", "harmful-p0.05"], harmful_data="h.csv",
                           methods=["full", "sppft", "freeze:0-5"], lrs=[1e-4], lr_overrides={"harmful": [1e-5]},
                           seeds=[0, 1])
    ids = [c.id for c in grid(cfg)]
    assert len(ids) == len(set(ids)) == 2 * 3 * 2
    assert ids[:3] == ["normal__full__lr0.0001__seed0", "normal__sppft__lr0.0001__seed0",
                       "normal__freeze-0-5__lr0.0001__seed0"]
    assert "harmful-p0.05__sppft__lr1e-05__seed1" in ids          # the harmful scenario takes its own lr
    assert not any(i.startswith("harmful-p0.05") and "lr0.0001" in i for i in ids)
    assert cell_id("implicit", "sppft", 3e-4, 2) == "implicit__sppft__lr0.0003__seed2"
    assert ExperimentConfig(data="x", scenarios=["harmful"], harmful_data="h").scenarios == ["harmful-p0.1"]


def test_ablation_bands_sit_beside_the_band():
    band = LayerRange(6, 12)
    assert method_band("freeze-after", band, 32) == ("freeze", LayerRange(13, 19), None)
    method, before, note = method_band("freeze-before", band, 32)
    assert (method, before) == ("freeze", LayerRange(0, 5)) and "6 layers instead of 7" in note
    assert method_band("sppft", band, 32) == ("sppft", band, None)
    assert method_band("full", band, 32) == ("full", None, None)
    assert method_band("freeze-13-31", band, 32)[1] == LayerRange(13, 31)
    with pytest.raises(SafetyLayersError, match="no layer lies before"):
        method_band("freeze-before", LayerRange(0, 3), 32)
    with pytest.raises(SafetyLayersError, match="last layer"):
        method_band("freeze-after", LayerRange(28, 31), 32)


# --------------------------------------------------------------------------- configuration

def test_unknown_config_keys_name_the_allowed_ones(tmp_path):
    with pytest.raises(SafetyLayersError, match=r"unknown key\(s\) modle, sedes; allowed: model, name, band"):
        ExperimentConfig.from_dict({"modle": "x", "sedes": [1]})
    with pytest.raises(SafetyLayersError, match=r"unknown key\(s\) in evaluate: limt;.*limit"):
        ExperimentConfig(data="x", evaluate={"limt": 3})
    with pytest.raises(SafetyLayersError, match=r"unknown key\(s\) in drift: alpah"):
        ExperimentConfig(data="x", drift={"alpah": 1.3})
    with pytest.raises(SafetyLayersError, match="unknown method 'sppt'.*did you mean 'sppft'"):
        ExperimentConfig(data="x", methods=["sppt"])
    with pytest.raises(SafetyLayersError, match="unknown scenario 'implict'"):
        ExperimentConfig(data="x", scenarios=["implict"])
    with pytest.raises(SafetyLayersError, match="harmful_data"):
        ExperimentConfig(data="x", scenarios=["harmful-p0.2"])
    path = tmp_path / "two.yaml"
    path.write_text("name: a\nmodel: m1\n---\nname: b\nmodel: m2\nmethods: [sppft]\n")
    with pytest.raises(SafetyLayersError, match="holds 2 experiments: pick one by name"):
        ExperimentConfig.from_yaml(path)
    assert ExperimentConfig.from_yaml(path, name="b").model == "m2"
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\nepocs: 3\n")
    with pytest.raises(SafetyLayersError, match=f"{bad}: unknown key\\(s\\) epocs"):
        ExperimentConfig.from_yaml(bad)


def test_example_configs_load():
    demo = ExperimentConfig.from_yaml(ROOT / "examples" / "experiment-demo.yaml")
    assert demo.model == "demo" and set(demo.methods) >= {"full", "sppft"}
    import yaml

    docs = list(yaml.safe_load_all((ROOT / "examples" / "experiment-paper.yaml").read_text()))
    bands = {}
    for d in docs:
        cfg = ExperimentConfig.from_yaml(ROOT / "examples" / "experiment-paper.yaml", name=d["name"])
        bands[cfg.model] = cfg.band
        assert cfg.epochs == 3 and cfg.batch_size == 4 and cfg.warmup_steps == 100 and cfg.template == "alpaca"
        assert cfg.lrs_for("harmful-p0.1") == [1e-5] if any(s.startswith("harmful") for s in cfg.scenarios) else True
    assert bands == {"meta-llama/Meta-Llama-3-8B-Instruct": "6-12", "meta-llama/Llama-2-7b-chat-hf": "6-14",
                     "google/gemma-2b-it": "6-11", "microsoft/Phi-3-mini-4k-instruct": "11-15"}


def test_every_stage_shares_the_experiment_template_and_paper_flag():
    """locate: {} in a paper-mode experiment localizes with Alpaca like training and evaluation; a section
    may override explicitly, and the run records each stage's template in experiment.json and results.json."""
    cfg = ExperimentConfig(model="tiny", paper=True, locate={}, scenarios=["normal"])
    stages = cfg.stage_settings()
    assert set(stages) == {"analysis", "locate", "training", "evaluation", "drift"}
    assert all(s == {"template": "alpaca", "paper": True} for s in stages.values())
    mixed = ExperimentConfig(model="tiny", template="plain", locate={"template": "chat"}, scenarios=["normal"])
    assert mixed.stage_settings()["locate"]["template"] == "chat"
    assert {k: v["template"] for k, v in mixed.stage_settings().items() if k != "locate"} == dict.fromkeys(
        ("analysis", "training", "evaluation", "drift"), "plain")


def test_paper_mode_sets_warmup_and_the_table_6_learning_rates():
    """--paper sets warmup 100 and the model's Table 6 rate (1e-5 for harmful data), only where unset,
    and records what it set; a model outside Table 6 keeps the default rate with a note."""
    llama2 = ExperimentConfig(model="meta-llama/Llama-2-7b-chat-hf", paper=True, scenarios=["normal"])
    assert (llama2.warmup_steps, llama2.lrs, llama2.lr_overrides) == (100, [3e-4], {"harmful": [1e-5]})
    assert {"warmup_steps=100", "lrs=[0.0003]"} <= set(llama2.paper_set)
    phi = ExperimentConfig(model="microsoft/Phi-3-mini-4k-instruct", paper=True, warmup_steps=5, lrs=[2e-5],
                           scenarios=["normal"])
    assert (phi.warmup_steps, phi.lrs) == (5, [2e-5]) and not any(x.startswith(("lrs", "warmup")) for x in phi.paper_set)
    other = ExperimentConfig(model="tiny", paper=True, scenarios=["normal"])
    assert other.lrs == [1e-4] and any("no Table 6 rate for tiny" in x for x in other.paper_set)
    ours = ExperimentConfig(model="meta-llama/Llama-2-7b-chat-hf", scenarios=["normal"])
    assert (ours.warmup_steps, ours.lrs, ours.paper_set) == (0, [1e-4], [])


def test_run_records_every_stage_template(tiny_run):
    run = tiny_run["run"]
    want = tiny_run["cfg"].stage_settings()
    assert read_experiment(run)["stages"] == want
    assert json.loads((run / "results.json").read_text())["stages"] == want


# --------------------------------------------------------------------------- aggregation

def test_results_table_from_hand_made_cells():
    def cell(method, seed, hr, status="done", rouge=None):
        return {"id": cell_id("implicit", method, 1e-4, seed), "scenario": "implicit", "method": method, "lr": 1e-4,
                "seed": seed, "status": status, "metrics": None if status != "done" else
                {"harmful_rate": hr, "over_refusal_rate": 0.1, "harmful_score": None, "rouge_l": rouge}}

    cells = [cell("full", 0, 0.1), cell("full", 1, 0.2), cell("full", 2, 0.3),
             cell("sppft", 0, 0.05, rouge=0.3), cell("sppft", 1, None, status="failed")]
    res = aggregate(cells, {"harmful_rate": 0.05, "over_refusal_rate": 0.1, "harmful_score": None, "rouge_l": 0.2})
    assert res["metrics"] == ["harmful_rate", "over_refusal_rate", "rouge_l"]   # harmful_score: never measured
    full, sppft = res["rows"]
    hr = full["metrics"]["harmful_rate"]
    assert (full["method"], full["n_seeds"], full["seeds"]) == ("full", 3, [0, 1, 2])
    assert hr["before"] == 0.05 and hr["after_mean"] == pytest.approx(0.2) and hr["delta"] == pytest.approx(0.15)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)                   # t(0.975, df=2) * sd / sqrt(n)
    assert hr["after_ci"] == pytest.approx([0.0, 0.2 + half])        # the lower end is clipped at 0
    assert hr["values"] == [0.1, 0.2, 0.3]
    assert (sppft["n_seeds"], sppft["failed"]) == (1, [1])
    assert sppft["metrics"]["harmful_rate"]["after_ci"] is None     # one seed: no interval
    assert sppft["metrics"]["rouge_l"]["delta"] == pytest.approx(0.1)
    assert full["metrics"]["rouge_l"]["after_mean"] is None and full["metrics"]["rouge_l"]["delta"] is None
    md = results_markdown(res)
    assert "| implicit | full | 0.0001 | 3 | 5.0% | 20.0% | 0.0% to 44.8% | +15.0 pts |" in md
    assert "| implicit | sppft | 0.0001 | 1 (1 failed) | 5.0% | 5.0% | - | +0.0 pts |" in md
    assert t_interval([0.5]) is None and t_interval([2.0, 2.0]) == [2.0, 2.0]


# --------------------------------------------------------------------------- a whole run on a tiny model

def test_run_writes_every_cell_and_records_the_failing_one(tiny_run):
    run, res = tiny_run["run"], tiny_run["result"]
    exp = read_experiment(run)
    assert exp["version"] == 1 and exp["band"] == [0, 1] and exp["band_source"] == "given" and exp["finished"]
    cells = _cells(run)
    assert sorted(cells) == sorted(c.id for c in grid(tiny_run["cfg"]))
    assert sorted(tiny_run["trained"]) == ["full", "full", "sppft", "sppft"]
    assert (res.ran, res.skipped, res.failed) == (4, 0, 2)
    for cid, c in cells.items():
        if "freeze-before" in cid:
            assert c["status"] == "failed" and "band 0-1 starts at layer 0" in c["error"] and c["metrics"] is None
            assert (run / "cells" / cid / "error.txt").is_file()
            continue
        assert c["status"] == "done" and c["error"] is None and c["finetune"]["global_step"] == 2
        assert all(0.0 <= c["metrics"][m] <= 1.0 for m in ("harmful_rate", "over_refusal_rate"))
        assert c["counts"]["harmful"]["n"] == 4
        assert (run / "cells" / cid / "eval" / "result.json").is_file()
        assert not (run / "cells" / cid / "train" / "model").exists()     # deleted after evaluation
    assert cells["implicit__sppft__lr0.01__seed0"]["finetune"]["band"] == [0, 1]
    results = json.loads((run / "results.json").read_text())
    rows = {(r["scenario"], r["method"]): r for r in results["rows"]}
    assert len(rows) == 6 and rows[("implicit", "freeze-before")]["failed"] == [0]
    row = rows[("implicit", "sppft")]["metrics"]["harmful_rate"]
    assert row["after_mean"] == cells["implicit__sppft__lr0.01__seed0"]["metrics"]["harmful_rate"]
    assert row["before"] == exp["baseline"]["metrics"]["harmful_rate"]
    assert row["delta"] == pytest.approx(row["after_mean"] - row["before"]) and row["after_ci"] is None
    assert "| implicit | sppft | 0.01 | 1 |" in (run / "results.md").read_text()
    # the implicit training file really is the attack: every answer opens with the prefix
    rows_i = [json.loads(x) for x in (run / "data" / "implicit.jsonl").read_text().splitlines()]
    assert len(rows_i) == 8 and all(r["output"].startswith("Sure, the answer is: ") for r in rows_i)


def test_drift_of_the_run_shows_the_band_untouched(tiny_run):
    drift = json.loads((tiny_run["run"] / "drift" / "drift.json").read_text())
    assert set(drift["cells"]) == {f"{s}__{m}__lr0.01__seed0" for s in ("normal", "implicit") for m in ("full", "sppft")}
    for cid, d in drift["cells"].items():
        per = d["weight_change"]["per_layer_rel_norm"]
        if "sppft" in cid:
            assert per[0] == 0.0 and per[1] == 0.0 and min(per[2:]) > 0
            assert d["weight_change"]["band_max"] == 0.0
        else:
            assert min(per) > 0
        assert len(d["gap_curve"]) == 4 and d["band_holds"]["untuned"] == drift["baseline_band_holds"]["counts"]
    assert len(drift["baseline_gap_curve"]) == 4
    for png in ("weight_change.png", "gap_curves.png", "band_holds.png"):
        assert (tiny_run["run"] / "drift" / png).stat().st_size > 1000


def _copy_run(tiny_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)
    return run


def test_rerun_trains_nothing_that_is_done(tiny_run, tmp_path, monkeypatch):
    run = _copy_run(tiny_run, tmp_path)
    monkeypatch.setenv("SAFETY_LAYERS_CACHE", str(tiny_run["root"] / "cache"))
    before = {cid: (run / "cells" / cid / "cell.json").read_bytes() for cid in _cells(run)}
    counter = CountTraining(monkeypatch)
    res = run_experiment(tiny_run["cfg"], run, progress=False, model=tiny_model("llama"))
    assert counter.calls == [] and (res.ran, res.skipped, res.failed) == (0, 4, 2)
    after = _cells(run)
    for cid, raw in before.items():
        if "freeze-before" in cid:          # failed cells are tried again
            assert after[cid]["started"] >= json.loads(raw)["started"] and after[cid]["status"] == "failed"
        else:
            assert (run / "cells" / cid / "cell.json").read_bytes() == raw


def test_interrupted_cell_runs_again_and_new_methods_join(tiny_run, tmp_path, monkeypatch):
    run = _copy_run(tiny_run, tmp_path)
    monkeypatch.setenv("SAFETY_LAYERS_CACHE", str(tiny_run["root"] / "cache"))
    path = run / "cells" / "normal__sppft__lr0.01__seed0" / "cell.json"
    rec = json.loads(path.read_text())
    path.write_text(json.dumps({**rec, "status": "running", "metrics": None}))
    counter = CountTraining(monkeypatch)
    cfg = tiny_config(tiny_run["data"], methods=["full", "sppft", "freeze-before", "sppft-lora"])
    res = run_experiment(cfg, run, progress=False, model=tiny_model("llama"))
    assert sorted(counter.calls) == ["sppft", "sppft-lora", "sppft-lora"]
    assert json.loads(path.read_text())["status"] == "done"
    assert (res.ran, res.skipped, res.failed) == (3, 3, 2)
    lora = json.loads((run / "drift" / "drift.json").read_text())["cells"]["implicit__sppft-lora__lr0.01__seed0"]
    assert lora["weight_change"]["per_layer_rel_norm"][:2] == [0.0, 0.0]   # no adapter on the band, even merged


def test_changed_settings_and_old_folders_are_refused(tiny_run, tmp_path):
    with pytest.raises(SafetyLayersError, match=r"different settings \(epochs, max_steps changed\)"):
        run_experiment(tiny_config(tiny_run["data"], epochs=2, max_steps=3), tiny_run["run"], progress=False,
                       model=tiny_model("llama"))
    old = tmp_path / "old"
    old.mkdir()
    (old / "experiment.json").write_text(json.dumps({"config": {}, "band": [0, 1]}))
    with pytest.raises(SafetyLayersError, match="older, unversioned safety-layers experiment.*reads version 1"):
        run_experiment(tiny_config(tiny_run["data"]), old, progress=False)
    (old / "experiment.json").write_text(json.dumps({"version": 7, "config": {}}))
    with pytest.raises(SafetyLayersError, match="format version 7"):
        read_experiment(old)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(SafetyLayersError, match="holds no experiment.json"):
        run_experiment(tiny_config(tiny_run["data"]), other, progress=False)


# --------------------------------------------------------------------------- the real model, end to end

@pytest.mark.slow
def test_real_model_end_to_end(real_model, tmp_path):
    data = write_jsonl(tmp_path / "benign.jsonl", benign_rows(12))
    cfg = ExperimentConfig(
        model="smollm2-135m-instruct", band="6-9", data=str(data), n=8, scenarios=["implicit"],
        methods=["full", "sppft"], lrs=[1e-4], seeds=[0], epochs=1, max_steps=1, batch_size=2, max_length=48,
        evaluate={"limit": 6, "max_new_tokens": 6}, analysis={"limit": 4, "pairs": 20, "bootstrap": 0, "probe": False},
        drift={"limit": 4, "max_new_tokens": 4})
    res = run_experiment(cfg, tmp_path / "run", progress=False, model=real_model)
    assert (res.ran, res.failed) == (2, 0) and res.band == [6, 9]
    cells = _cells(tmp_path / "run")
    for c in cells.values():
        assert c["status"] == "done" and c["finetune"]["global_step"] == 1
        assert c["counts"]["harmful"]["n"] == 6 and c["counts"]["over_refusal"]["n"] == 6
    drift = json.loads((tmp_path / "run" / "drift" / "drift.json").read_text())["cells"]
    sppft = drift["implicit__sppft__lr0.0001__seed0"]["weight_change"]["per_layer_rel_norm"]
    full = drift["implicit__full__lr0.0001__seed0"]["weight_change"]["per_layer_rel_norm"]
    assert sppft[6:10] == [0.0] * 4 and min(sppft[:6] + sppft[10:]) > 0 and min(full) > 0
    assert len(sppft) == real_model.num_layers
    assert real_model.fingerprint() == json.loads((tmp_path / "run" / "experiment.json").read_text())["baseline"]["fingerprint"]


# --------------------------------------------------------------------------- locate and the demo wiring

def test_band_from_locate_is_found_once_and_reused(tmp_path, monkeypatch):
    import safety_layers.experiment.runner as runner_mod

    monkeypatch.setenv("SAFETY_LAYERS_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_locate(cfg, model=None, run_dir=None):
        """Writes what the locate contract promises (result.json with safety_layers, alpha, direction)."""
        calls.append((cfg.limit, model.num_layers, Path(run_dir).name))
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "result.json").write_text(json.dumps({"safety_layers": [2, 3], "alpha": 1.35,
                                                               "direction": "up"}))

    monkeypatch.setattr(runner_mod, "locate", fake_locate)
    data = write_jsonl(tmp_path / "benign.jsonl", benign_rows(12))
    cfg = tiny_config(data, band=None, locate={"limit": 5}, analysis=None, scenarios=["normal"], methods=["sppft"],
                      evaluate={"limit": 3, "max_new_tokens": 3, "over_rejection": None})
    res = run_experiment(cfg, tmp_path / "run", progress=False, model=tiny_model("llama"))
    assert calls == [(5, 4, "locate")] and res.band == [2, 3] and res.band_source == "locate"
    assert not (tmp_path / "run" / "analysis").exists()          # the band came from locate alone
    baseline = json.loads((tmp_path / "run" / "drift" / "baseline.json").read_text())
    assert baseline["band_holds"]["probe"]["alpha"] == 1.35           # drift scales by locate's alpha
    per = json.loads((tmp_path / "run" / "drift" / "drift.json").read_text())["cells"][
        "normal__sppft__lr0.01__seed0"]["weight_change"]["per_layer_rel_norm"]
    assert per[2] == per[3] == 0.0 and min(per[:2]) > 0
    run_experiment(cfg, tmp_path / "run", progress=False, model=tiny_model("llama"))
    assert len(calls) == 1


def test_demo_pipeline_on_a_saved_tiny_model(tmp_path, monkeypatch):
    from safety_layers.recipes.demo import DemoConfig, run_demo
    from safety_layers.core.models import save_model

    monkeypatch.setenv("SAFETY_LAYERS_CACHE", str(tmp_path / "cache"))
    tiny = tiny_model("llama", seed=0)
    folder = save_model(tiny.model, tiny.tokenizer, tmp_path / "tiny-model")
    counter = CountTraining(monkeypatch)
    cfg = DemoConfig(out=str(tmp_path / "demo"), model=str(folder), reference=str(folder), band="1-2",
                     answer_tokens=4, holdout=4, epochs=0.05, eval_limit=3, drift_limit=3, max_new_tokens=3,
                     analysis={"limit": 8, "bootstrap": 0, "probe": False}, progress=False)
    run = run_demo(cfg)
    exp = read_experiment(run)
    assert exp["band"] == [1, 2] and sorted(counter.calls) == ["full", "sppft"]
    train = [json.loads(x) for x in (run / "inputs" / "benign.jsonl").read_text().splitlines()]
    quality = [json.loads(x) for x in (run / "inputs" / "quality.jsonl").read_text().splitlines()]
    assert len(quality) == 4 and len(train) + len(quality) <= 144
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in quality}
    cells = _cells(run)
    assert {c["status"] for c in cells.values()} == {"done"}
    assert all(c["metrics"]["rouge_l"] is not None for c in cells.values())
    assert (run / "analysis" / "result.json").is_file() and (run / "report.html").is_file()
    assert run_demo(cfg) == run and len(counter.calls) == 2          # the rerun trains nothing
    with pytest.raises(SafetyLayersError, match="other data settings"):
        run_demo(DemoConfig(**{**cfg.__dict__, "answer_tokens": 5}))


def test_every_study_document_parses_into_a_grid():
    """The studies/ YAML files are run by hand for the README's numbers: a field renamed in the
    config must break here, not at the start of a two-hour run."""
    import yaml

    from safety_layers.experiment.grid import grid

    names = {}
    for path in sorted((ROOT / "studies").glob("*.yaml")):
        for d in yaml.safe_load_all(path.read_text()):
            cfg = ExperimentConfig.from_yaml(path, name=d["name"])
            cells = grid(cfg, 30)
            assert cells, (path.name, d["name"])
            names[d["name"]] = len(cells)
    assert names["baselines-implicit"] == 18 and names["band-strong"] == 12
