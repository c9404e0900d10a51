"""The band-protection scan: windows, random control sets, one resumable cell per window, table, plot, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_model
from helpers_finetune import benign_rows, one_thread, write_jsonl

from safety_layers.cli.main import main
from safety_layers.core.errors import SafetyLayersError
from safety_layers.core.layers import LayerRange
from safety_layers.experiment import ExperimentConfig, grid, method_band, method_label, run_experiment
from safety_layers.experiment import scan
from safety_layers.finetune import run as ft

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


# --------------------------------------------------------------------------- windows and sets

def test_windows_cover_the_model_at_the_stride():
    assert [str(w) for w in scan.windows(3, 1, 6)] == ["0-2", "1-3", "2-4", "3-5"]
    assert [str(w) for w in scan.windows(2, 2, 6)] == ["0-1", "2-3", "4-5"]
    assert [str(w) for w in scan.windows(6, 1, 6)] == ["0-5"]


@pytest.mark.parametrize("call, words", [
    (lambda: scan.windows(7, 1, 6), "wider than the model"),
    (lambda: scan.windows(3, 0, 6), "stride"),
    (lambda: method_label("scan:5/0"), "stride must be at least 1"),
    (lambda: method_label("random:1x3"), "at least 2 layers"),
    (lambda: scan.random_sets(6, 2, 0, 6), "cannot be non-contiguous"),
])
def test_bad_scan_input_is_one_line(call, words):
    with pytest.raises(SafetyLayersError) as e:
        call()
    assert words in str(e.value) and "\n" not in str(e.value)


def test_random_sets_are_seeded_distinct_and_not_contiguous():
    a = scan.random_sets(4, 5, 0, 12)
    assert a == scan.random_sets(4, 5, 0, 12)
    assert a != scan.random_sets(4, 5, 1, 12)
    assert len({tuple(s) for s in a}) == 5
    for s in a:
        assert len(set(s)) == 4 and s[-1] - s[0] + 1 != 4 and all(0 <= i < 12 for i in s)


def test_grid_expands_the_families_once_the_layer_count_is_known():
    cfg = ExperimentConfig(data="x.json", scenarios=["implicit"], methods=["full", "scan:2", "random:2x2@3"],
                           seeds=[0, 1])
    assert cfg.methods == ["full", "scan:2/1", "random:2x2@3"]
    with pytest.raises(SafetyLayersError, match="layer count"):
        grid(cfg)
    methods = list(dict.fromkeys(c.method for c in grid(cfg, 4)))
    sets = [scan.set_label(s) for s in scan.random_sets(2, 2, 3, 4)]
    assert methods == ["full", "freeze-0-1", "freeze-1-2", "freeze-2-3"] + sets
    assert len(grid(cfg, 4)) == 2 * len(methods)
    assert method_band(sets[0], LayerRange(1, 2), 4) == ("freeze-set", scan.set_layers(sets[0]), None)
    with pytest.raises(SafetyLayersError, match="wider than the model"):
        grid(cfg, 1)


# --------------------------------------------------------------------------- a tiny scan, end to end

def _config(data: Path, methods, **kw) -> ExperimentConfig:
    base = dict(model="tiny-llama", band="1-2", data=str(data), n=8, scenarios=["implicit"], methods=methods,
                lrs=[1e-2], seeds=[0], epochs=1, max_steps=2, max_length=64,
                evaluate={"limit": 4, "max_new_tokens": 4}, drift=False)
    base.update(kw)
    return ExperimentConfig(**base)


class Watch:
    """Wraps finetune.train_and_save: records each cell's method and how much each layer moved."""

    def __init__(self, mp):
        self.calls = []
        real = ft.train_and_save

        def wrapped(prep):
            before = {n: p.detach().clone() for n, p in prep.lm.model.named_parameters()}
            out = real(prep)
            moved = {}
            for n, p in prep.lm.model.named_parameters():
                if ".layers." in n and ("self_attn" in n or "mlp" in n):
                    i = int(n.split(".layers.")[1].split(".")[0])
                    moved[i] = moved.get(i, 0.0) + float((p.detach() - before[n]).abs().max())
            self.calls.append({"method": prep.cfg.method, "moved": moved})
            return out

        mp.setattr(ft, "train_and_save", wrapped)


@pytest.fixture(scope="module")
def tiny_scan(tmp_path_factory):
    root = tmp_path_factory.mktemp("scan")
    data = write_jsonl(root / "benign.jsonl", benign_rows(16))
    with pytest.MonkeyPatch.context() as mp, one_thread():
        mp.setenv("SAFETY_LAYERS_CACHE", str(root / "cache"))
        watch = Watch(mp)
        cfg = _config(data, ["full", "scan:2", "random:2x1"])
        result = run_experiment(cfg, root / "run", progress=False, model=tiny_model("llama"))
    return {"root": root, "run": root / "run", "cfg": cfg, "result": result, "watch": watch, "data": data}


def test_one_cell_per_window_and_the_controls(tiny_scan):
    res, run = tiny_scan["result"], tiny_scan["run"]
    ids = [c["id"] for c in res.cells]
    assert res.failed == 0 and res.ran == 5 == len(ids)
    assert [i.split("__")[1] for i in ids][:4] == ["full", "freeze-0-1", "freeze-1-2", "freeze-2-3"]
    rand = json.loads((run / "cells" / ids[4] / "cell.json").read_text())
    assert rand["frozen_layers"] == scan.set_layers(rand["method"]) and rand["frozen_band"] is None


def test_the_frozen_window_or_set_does_not_move(tiny_scan):
    calls = tiny_scan["watch"].calls
    sets = [scan.set_layers(c["id"].split("__")[1]) for c in tiny_scan["result"].cells]
    full, win01, rand = calls[0]["moved"], calls[1]["moved"], calls[4]["moved"]
    assert all(v > 0 for v in full.values())
    assert win01[0] == win01[1] == 0.0 and win01[2] > 0 and win01[3] > 0
    for i, v in rand.items():
        assert (v == 0.0) == (i in sets[4])


def test_scan_table_plot_and_report(tiny_scan):
    from safety_layers.report import write_report

    run = tiny_scan["run"]
    rec = json.loads((run / "scan" / "scan.json").read_text())
    assert rec["band"] == [1, 2] and rec["seconds_per_cell"] > 0
    kinds = [r["kind"] for r in rec["rows"]]
    assert kinds == ["full", "window", "window", "window", "random"]
    assert all(r["harmful_rate"]["mean"] is not None for r in rec["rows"])
    assert (run / "scan" / rec["figures"][0]).read_bytes()[:4] == b"\x89PNG"
    md = (run / "scan" / "scan.md").read_text()
    assert "| freeze-1-2 | 1-2 |" in md and "located band" in md
    rep = write_report(run)
    assert "scan" in rep.sections
    assert "Band-protection scan" in Path(rep.markdown).read_text()


def test_scan_resumes_without_training_again(tiny_scan, monkeypatch):
    monkeypatch.setenv("SAFETY_LAYERS_CACHE", str(tiny_scan["root"] / "cache"))
    watch = Watch(monkeypatch)
    with one_thread():
        res = run_experiment(tiny_scan["cfg"], tiny_scan["run"], progress=False, model=tiny_model("llama"))
    assert res.skipped == 5 and res.ran == 0 and watch.calls == []


def test_window_wider_than_the_model_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFETY_LAYERS_CACHE", str(tmp_path / "cache"))
    watch = Watch(monkeypatch)
    data = write_jsonl(tmp_path / "benign.jsonl", benign_rows(16))
    with pytest.raises(SafetyLayersError, match="wider than the model \\(4 decoder layers\\)"):
        run_experiment(_config(data, ["scan:6"]), tmp_path / "run", progress=False, model=tiny_model("llama"))
    assert watch.calls == [] and not (tmp_path / "run" / "baseline").exists()


def test_scan_command_bad_input_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "scan.yaml"
    cfg.write_text("model: tiny-llama\ndata: x.json\n")
    assert main(["scan", str(cfg), "--stride", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --stride 0") and "\n" not in err
    assert scan_methods_of(5, 2, 3) == ["full", "scan:5/2", "random:5x3"]


def scan_methods_of(*a):
    from safety_layers.cli.scan import scan_methods

    return scan_methods(*a)


def test_the_demo_study_is_thirty_cells_of_one_seed():
    root = Path(__file__).resolve().parents[1]
    for name in ("band-scan", "band-scan-gentle"):
        cfg = ExperimentConfig.from_yaml(root / "studies" / "band_scan.yaml", name)
        methods = [c.method for c in grid(cfg, 30)]
        assert len(methods) == 30 and methods[0] == "full" and "freeze-10-14" in methods
        assert sum(m.startswith("freeze-set-") for m in methods) == 3
