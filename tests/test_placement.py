"""The one device/dtype policy (core/placement.py): its decisions on a CPU and on faked GPUs,
every step config carrying it, env.json recording it, and fp32 statistics from bf16 weights."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import tiny_model
from safety_layers.core.errors import SafetyLayersError
from safety_layers.core.placement import as_placement, describe, has_device_settings, resolve_placement


def fake_gpus(monkeypatch, count: int = 1, bf16: bool = True):
    """Make torch report ``count`` CUDA GPUs (nothing runs on them: only the policy's decisions are read)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def test_cpu_defaults_keep_fp32(monkeypatch):
    fake_gpus(monkeypatch, 0)
    p = resolve_placement()
    assert (p.device, p.dtype, p.device_map) == ("cpu", torch.float32, None)
    assert resolve_placement("cpu", "bf16").dtype == torch.bfloat16   # an alias, allowed on a CPU


def test_auto_on_a_gpu_picks_bf16_or_fp16(monkeypatch):
    fake_gpus(monkeypatch, 2, bf16=True)
    assert resolve_placement().record() == {"device": "cuda:0", "dtype": "bfloat16", "device_map": None}
    monkeypatch.setenv("LOCAL_RANK", "1")                      # one GPU per process under a launcher
    assert resolve_placement().device == "cuda:1"
    assert resolve_placement("cuda:0").device == "cuda:0"
    fake_gpus(monkeypatch, 2, bf16=False)
    assert resolve_placement().dtype == torch.float16           # an older GPU without bf16
    assert resolve_placement("cpu").record() == {"device": "cpu", "dtype": "float32", "device_map": None}
    assert resolve_placement("auto", "auto", "auto").device_map == "auto"


def test_paper_mode_keeps_fp32_and_the_gpu(monkeypatch):
    from safety_layers.finetune.config import FinetuneConfig

    fake_gpus(monkeypatch, 1)
    paper = FinetuneConfig(model="m", data="d.jsonl", paper=True)
    assert paper.dtype == "float32" and "dtype=float32" in paper.paper_set
    assert paper.placement().record() == {"device": "cuda:0", "dtype": "float32", "device_map": None}
    ours = FinetuneConfig(model="m", data="d.jsonl")
    assert ours.dtype == "auto" and ours.placement().dtype == torch.bfloat16
    # a dtype the user set is kept in paper mode
    assert FinetuneConfig(model="m", paper=True, dtype="bfloat16").placement().dtype == torch.bfloat16


@pytest.mark.parametrize("device,dtype,device_map,words", [
    ("cuda", "auto", None, "no CUDA GPU"),
    ("cuda:0", "auto", None, "no CUDA GPU"),
    ("cpu", "float16", None, "float16 on a CPU"),
    ("tpu", "auto", None, "unknown device"),
    ("cpu", "float8", None, "unknown dtype"),
    ("auto", "auto", "auto", "--device-map auto"),
    ("auto", "auto", "balanced", "unknown device_map"),
])
def test_bad_input_is_one_line(monkeypatch, device, dtype, device_map, words):
    fake_gpus(monkeypatch, 0)
    with pytest.raises(SafetyLayersError) as e:
        resolve_placement(device, dtype, device_map)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_gpu_index_beyond_the_machine(monkeypatch):
    fake_gpus(monkeypatch, 2)
    with pytest.raises(SafetyLayersError, match="2 GPU"):
        resolve_placement("cuda:5")
    with pytest.raises(SafetyLayersError, match="drop --device"):
        resolve_placement("cpu", "auto", "auto")


def test_every_model_loading_step_takes_the_settings():
    from safety_layers.align.config import AlignConfig
    from safety_layers.analysis import AnalyzeConfig
    from safety_layers.evaluate import EvaluateConfig
    from safety_layers.experiment.config import ExperimentConfig
    from safety_layers.finetune.config import FinetuneConfig
    from safety_layers.locate import LocateConfig

    for cls in (AnalyzeConfig, LocateConfig, EvaluateConfig, AlignConfig, FinetuneConfig, ExperimentConfig):
        assert has_device_settings(cls), cls
        assert [f.name for f in dataclasses.fields(cls)][-3:] == ["device", "dtype", "device_map"], cls
    # the classifier judge gets the evaluation's settings
    opts = EvaluateConfig(model="m", device="cpu", dtype="bfloat16").judge_settings("classifier")
    assert (opts["device"], opts["dtype"]) == ("cpu", "bfloat16")


def test_experiment_sections_take_the_experiments_settings():
    from safety_layers.experiment.config import ExperimentConfig

    cfg = ExperimentConfig(model="m", data="d.jsonl", device="cpu", dtype="bfloat16",
                           locate={"judge": "keyword"}, evaluate={"limit": 2})
    assert (cfg.locate.device, cfg.locate.dtype) == ("cpu", "bfloat16")
    assert (cfg.evaluate.device, cfg.evaluate.dtype) == ("cpu", "bfloat16")
    with pytest.raises(SafetyLayersError):
        ExperimentConfig(model="m", data="d.jsonl", locate={"dtype": "float32"})


def test_training_steps_refuse_a_device_map():
    from safety_layers.finetune.config import FinetuneConfig

    with pytest.raises(SafetyLayersError, match="FSDP"):
        FinetuneConfig(model="m", device_map="auto")


def test_load_or_use_passes_the_settings(monkeypatch):
    import safety_layers.core.models as models

    seen = {}
    monkeypatch.setattr(models, "load_model", lambda name, **kw: seen.update(name=name, **kw) or "loaded")
    from safety_layers.analysis import AnalyzeConfig

    assert models.load_or_use("some-model", AnalyzeConfig(model="x", dtype="bfloat16")) == "loaded"
    assert seen == {"name": "some-model", "device": "cpu", "dtype": torch.bfloat16, "device_map": None}
    assert as_placement(None).record()["device"] in ("cpu", "cuda:0")


def test_env_records_where_the_model_ran():
    from safety_layers.core.runs import environment

    lm = tiny_model("llama")
    lm.model.to(torch.bfloat16)
    env = environment(lm)
    assert (env["model_device"], env["model_dtype"]) == ("cpu", "bfloat16")
    assert json.dumps(env)                                     # env.json can hold it
    assert describe(tiny_model("gpt2").model)["model_dtype"] == "float32"


def test_statistics_read_fp32_copies_of_bf16_states():
    from safety_layers.engine.activations import last_token_states

    lm = tiny_model("llama")
    ref = last_token_states(lm, ["hello there", "how do I bake"], cache=False, progress=False)
    lm.model.to(torch.bfloat16)
    got = last_token_states(lm, ["hello there", "how do I bake"], cache=False, progress=False)
    assert ref.dtype == got.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(ref.flatten(1), got.flatten(1))
    assert (cos > 0.99).all()                                  # bf16 weights, same vectors to bf16 precision


def test_a_config_only_folder_names_plan(tmp_path):
    from safety_layers.core.models import load_model

    tiny_model("llama").model.config.save_pretrained(tmp_path)
    with pytest.raises(SafetyLayersError, match="safety-layers plan") as e:
        load_model(str(tmp_path), device="cpu")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("flags,words", [(["--device", "cuda"], "no CUDA GPU"),
                                         (["--dtype", "float16"], "float16 on a CPU")])
def test_the_cli_names_a_device_or_dtype_this_machine_lacks(monkeypatch, tmp_path, capsys, flags, words):
    from safety_layers.cli.main import main

    fake_gpus(monkeypatch, 0)
    lm = tiny_model("llama")
    lm.model.save_pretrained(tmp_path / "m")
    lm.tokenizer.save_pretrained(tmp_path / "m")
    assert main(["analyze", "--model", str(tmp_path / "m"), "--limit", "2", *flags]) != 0
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err


def test_experiment_cells_train_where_the_experiment_runs(monkeypatch):
    from safety_layers.experiment.config import ExperimentConfig
    from safety_layers.finetune.devices import cpu_args

    fake_gpus(monkeypatch, 1)
    assert cpu_args(ExperimentConfig(model="m", data="d.jsonl", device="cpu").placement()) == {"use_cpu": True}
    assert cpu_args(ExperimentConfig(model="m", data="d.jsonl").placement()) == {}


def test_experiment_command_line_device_and_dtype_override_the_file(tmp_path):
    from safety_layers.experiment.config import ExperimentConfig

    path = tmp_path / "e.yaml"
    path.write_text("model: m\ndata: d.jsonl\ndtype: float32\nevaluate: {limit: 2}\n")
    assert ExperimentConfig.from_yaml(path).dtype == "float32"
    cfg = ExperimentConfig.from_yaml(path, device="cpu", dtype="bfloat16")
    assert (cfg.device, cfg.dtype, cfg.evaluate.dtype) == ("cpu", "bfloat16", "bfloat16")
    assert ExperimentConfig.from_yaml(path, device=None, dtype=None).dtype == "float32"   # unset flags keep the file
