"""The memory plan (finetune/plan.py, ``safety-layers plan``) and the paper's models at full
scale on the meta device: the published configs in tests/data/model-configs, no weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from safety_layers.cli.main import main
from safety_layers.core.errors import SafetyLayersError
from safety_layers.core.layers import LayerRange
from safety_layers.core.models import LoadedModel, find_blocks
from safety_layers.finetune import plan as planning
from safety_layers.finetune.plan import PlanConfig, check_training_fits, meta_model, plan_memory

CONFIGS = Path(__file__).parent / "data" / "model-configs"
#: folder -> (parameters in the README, the paper's band, the fraction it freezes, spec §3.8 / docs/paper.md §3.8)
PAPER = {
    "meta-llama--Meta-Llama-3-8B-Instruct": (8.030e9, "6-12", 19.0),
    "meta-llama--Llama-2-7b-chat-hf": (6.738e9, "6-14", 27.0),
    "google--gemma-2b-it": (2.506e9, "6-11", 26.4),
    "microsoft--Phi-3-mini-4k-instruct": (3.821e9, "11-15", 14.8),
}
OTHERS = {"Qwen--Qwen2.5-7B-Instruct": 7.616e9, "mistralai--Mistral-7B-Instruct-v0.3": 7.248e9}
ALL = {**{k: v[0] for k, v in PAPER.items()}, **OTHERS}
#: attention + MLP weights per decoder layer, from the README of the configs
PER_LAYER = {"meta-llama--Meta-Llama-3-8B-Instruct": 218.1e6, "meta-llama--Llama-2-7b-chat-hf": 202.4e6,
             "google--gemma-2b-it": 110.1e6, "microsoft--Phi-3-mini-4k-instruct": 113.2e6,
             "Qwen--Qwen2.5-7B-Instruct": 233.0e6, "mistralai--Mistral-7B-Instruct-v0.3": 218.1e6}


def folder(name: str) -> str:
    return str(CONFIGS / name)


def saved_tiny(tmp_path) -> tuple[str, str]:
    """A tiny llama saved as a model folder, and four training rows: (folder, data file)."""
    lm = tiny_model("llama")
    lm.model.save_pretrained(tmp_path / "m")
    lm.tokenizer.save_pretrained(tmp_path / "m")
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "hi", "output": "hello"}\n' * 4)
    return str(tmp_path / "m"), str(data)


@pytest.mark.parametrize("name", sorted(ALL))
def test_the_arch_map_resolves_every_block_at_full_scale(name):
    model = meta_model(folder(name))
    assert all(p.device.type == "meta" for p in model.parameters())      # no weight was read or allocated
    blocks = find_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - ALL[name]) / ALL[name] < 5e-4, total
    for i in range(len(blocks)):
        comps = blocks.components(i)
        assert set(comps) == set(blocks.spec.components) and comps, i
        assert len([n for n in blocks.spec.norms if hasattr(blocks.layers[i], n)]) >= 2, i   # pre-attention, pre-MLP
        # the band's weights are all of the block's attention and MLP parameters, the README's count
        band = sum(p.numel() for p in blocks.parameters([i]).values())
        assert abs(band - PER_LAYER[name]) / PER_LAYER[name] < 1e-3, (i, band)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_sppft_on_the_papers_band_freezes_the_papers_fraction(name):
    total, band, percent = PAPER[name]
    p = plan_memory(PlanConfig(model=folder(name), method="sppft", band=band, dtype="bfloat16"))
    assert round(100 * p.frozen_fraction, 1) == percent
    assert p.frozen + p.trainable == p.parameters and p.frozen == round(p.frozen_fraction * p.parameters)
    # norms stay trainable, as the released code leaves them
    model = meta_model(folder(name))
    from safety_layers.finetune.plan import apply_to_meta

    model = apply_to_meta(model, "sppft", LayerRange.parse(band))
    blocks = find_blocks(model)
    for i in LayerRange.parse(band).indices:
        norms = [n for n in blocks.spec.norms if hasattr(blocks.layers[i], n)]
        assert norms and all(q.requires_grad for n in norms for q in getattr(blocks.layers[i], n).parameters())
    frozen_layers = {int(n.split(f"{blocks.layers_path}.")[1].split(".")[0])
                     for n, q in model.named_parameters() if not q.requires_grad}
    assert frozen_layers == set(LayerRange.parse(band).indices)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_scaling_touches_exactly_the_papers_matrices(name):
    from safety_layers.core.scaling import scaled_layers

    model = meta_model(folder(name))
    lm = LoadedModel(model, None, name, "meta", find_blocks(model))
    by_id = {id(p): n for n, p in model.named_parameters()}
    with scaled_layers(lm, "6-7", 1.1) as names:
        touched = [by_id[id(w)] for i in (6, 7) for w in lm.blocks.weights(i).values()]
    assert len(names) == len(touched) == 2 * len(lm.blocks.weights(6))
    leaf = {n.split(".layers.")[1].split(".", 1)[1] for n in touched}
    if "phi3" in model.config.model_type:      # the released scaling_phi3: fused projections scaled whole
        want = {"self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight", "mlp.down_proj.weight"}
    else:
        want = {f"self_attn.{x}_proj.weight" for x in "qkvo"} | {f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
    assert leaf == want
    assert not any("norm" in n or "bias" in n or "embed" in n or "lm_head" in n for n in touched)


def test_plan_figures_follow_from_the_counts():
    name = "meta-llama--Meta-Llama-3-8B-Instruct"
    full = plan_memory(PlanConfig(model=folder(name), method="full", dtype="float32", batch_size=1, max_length=64))
    sppft = plan_memory(PlanConfig(model=folder(name), method="sppft", band="6-12", dtype="bfloat16",
                                   batch_size=1, max_length=64))
    n = full.parameters
    assert (full.trainable, full.frozen) == (n, 0)
    t = full.training
    assert (t["weights"], t["gradients"], t["optimizer"]) == (4 * n, 4 * n, 8 * n)   # fp32 AdamW: 16 bytes a parameter
    assert 125e9 < t["weights"] + t["gradients"] + t["optimizer"] < 131e9            # the issue's ~130 GB
    assert t["total"] == 16 * n + t["activations"]
    assert 0 < t["activations_checkpointed"] < t["activations"]
    s = sppft.training
    assert (s["weights"], s["gradients"], s["optimizer"]) == (2 * n, 2 * sppft.trainable, 4 * sppft.trainable)
    assert s["optimizer_8bit"] == 2 * sppft.trainable
    assert sppft.inference["weights"] == 2 * n and sppft.inference["kv_cache"] == 2 * 32 * 64 * 8 * 128 * 2
    assert full.training_bytes(shards=8) == int(16 * n / 8 + t["activations"])


def test_activations_grow_with_the_batch_and_spare_nothing_for_lora():
    name = folder("google--gemma-2b-it")
    one = plan_memory(PlanConfig(model=name, method="full", dtype="bfloat16", batch_size=1, max_length=32))
    two = plan_memory(PlanConfig(model=name, method="full", dtype="bfloat16", batch_size=2, max_length=32))
    assert 1.8 < two.training["activations"] / one.training["activations"] < 2.2
    lora = plan_memory(PlanConfig(model=name, method="sppft-lora", band="6-11", dtype="bfloat16"))
    assert lora.trainable < 0.01 * lora.parameters and lora.inference["weights"] == 2 * one.parameters


def test_plan_cli_json_and_text(capsys):
    name = folder("microsoft--Phi-3-mini-4k-instruct")
    assert main(["plan", "--model", name, "--band", "11-15", "--dtype", "bfloat16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"parameters", "trainable", "frozen", "frozen_fraction", "inference", "training", "devices"} <= set(out)
    assert round(100 * out["frozen_fraction"], 1) == 14.8 and out["devices"]
    assert main(["plan", "--model", name, "--band", "11-15", "--dtype", "bfloat16"]) == 0
    text = capsys.readouterr().out
    assert "14.8% frozen" in text and "gradient checkpointing" in text and "devices:" in text


@pytest.mark.parametrize("args,words", [
    (["--band", "30-40"], "layers"),
    (["--method", "sppft"], "needs a band"),
    (["--band", "0-31"], "nothing is left to train"),
])
def test_plan_bad_input_is_one_line(capsys, args, words):
    assert main(["plan", "--model", folder("meta-llama--Llama-2-7b-chat-hf"), *args]) != 0
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1, err


def test_unknown_method_is_refused():
    with pytest.raises(SafetyLayersError, match="unknown method"):
        PlanConfig(model="x", method="dora")


def test_a_plan_that_does_not_fit_stops_with_the_ways_out(monkeypatch):
    monkeypatch.setattr(planning, "capacity", lambda device: ("the CPU's RAM", 40 * 10**9))
    cfg = PlanConfig(model=folder("meta-llama--Meta-Llama-3-8B-Instruct"), method="full", dtype="float32",
                     batch_size=1, max_length=64)
    with pytest.raises(SafetyLayersError) as e:
        check_training_fits(cfg, "cpu")
    msg = str(e.value)
    assert "does not fit" in msg and "\n" not in msg and "40.0 GB free" in msg
    for way in ("--dtype bfloat16", "--gradient-checkpointing", "8-bit", "examples/accelerate-fsdp.yaml",
                "ZeRO-3", "lora"):
        assert way in msg, way
    # sharded over enough GPUs, or as LoRA in bf16, it fits the same room
    assert check_training_fits(cfg, "cpu", shards=8).parameters > 8e9
    lora = PlanConfig(model=cfg.model, method="sppft-lora", band="6-12", dtype="bfloat16", batch_size=1, max_length=64)
    assert check_training_fits(lora, "cpu").trainable < 1e8


def test_finetune_runs_the_check_before_loading(monkeypatch, tmp_path):
    """finetune stops with the plan's line before it reads a weight."""
    import safety_layers.core.models as models
    from safety_layers.finetune import finetune
    from safety_layers.finetune.config import FinetuneConfig

    model, data = saved_tiny(tmp_path)
    monkeypatch.setattr(planning, "capacity", lambda device: ("the CPU's RAM", 1000))
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded before the memory check"))
    with pytest.raises(SafetyLayersError, match="does not fit.*Ways out"):
        finetune(FinetuneConfig(model=model, data=data, method="sppft", layers="1-2",
                                device="cpu"), None)


def test_the_meta_count_equals_the_real_models_count():
    lm = tiny_model("gemma")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        lm.model.config.save_pretrained(d)        # a config-only folder is enough
        p = plan_memory(PlanConfig(model=d, method="sppft", band="1-2", dtype="float32"))
    real = sum(q.numel() for q in lm.model.parameters())
    frozen = sum(q.numel() for q in find_blocks(lm.model).parameters([1, 2]).values())
    assert (p.parameters, p.frozen) == (real, frozen)
    assert p.training["weights"] == 4 * real and torch.float32 == lm.model.dtype


def test_experiment_runs_the_check_before_loading(monkeypatch, tmp_path):
    """An experiment plans its most demanding method next to the untuned model it keeps."""
    from safety_layers.experiment import run_experiment
    from safety_layers.experiment.config import ExperimentConfig

    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "hi", "output": "hello"}\n' * 4)
    cfg = ExperimentConfig(model=folder("google--gemma-2b-it"), data=str(data), band="6-11", device="cpu",
                           dtype="bfloat16", methods=["sppft", "full"], batch_size=1, max_length=32)
    monkeypatch.setattr(planning, "capacity", lambda device: ("the CPU's RAM", 15 * 10**9))
    with pytest.raises(SafetyLayersError) as e:
        run_experiment(cfg, tmp_path / "run")
    msg = str(e.value)
    assert msg.startswith("full fine-tuning") and "untuned model" in msg and "Ways out" in msg
    assert not list((tmp_path / "run").glob("cells/*"))        # no cell started


@pytest.mark.slow
def test_the_gpu_check_smoke_runs_on_the_cpu(tmp_path):
    """bench/gpu_check.py --device cpu --quick: tiny models through analyze, locate, finetune, evaluate."""
    import subprocess
    import sys

    out = tmp_path / "check.json"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "bench" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--archs", "llama,phi3", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())["tiny"]
    assert [r["arch"] for r in rows] == ["llama", "phi3"]
    for r in rows:
        assert r["ok"] and r["model_device"] == "cpu" and r["model_dtype"] == "float32"
        assert r["steps"] == 2 and r["frozen_check"] == "passed" and r["trials"] >= 2


def test_an_out_of_memory_error_is_explained_with_the_plan(tmp_path, monkeypatch):
    from safety_layers.finetune import FinetuneConfig, prepare, train_and_save
    from safety_layers.finetune.config import default_training_args

    model, data = saved_tiny(tmp_path)
    args = default_training_args(str(tmp_path / "run"), max_steps=1, use_cpu=True, save_strategy="no",
                                 report_to=[], disable_tqdm=True)
    prep = prepare(FinetuneConfig(model=model, data=data, method="sppft", layers="1-2",
                                  device="cpu", out=str(tmp_path / "out")), args)
    assert prep.memory is not None and prep.memory.method == "sppft"          # the check ran and kept its plan

    def oom(**_):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(prep.trainer, "train", oom)
    with pytest.raises(SafetyLayersError) as e:
        train_and_save(prep)
    msg = str(e.value)
    assert msg.startswith("out of memory at step 0 of sppft fine-tuning") and "the plan estimated" in msg
    assert "Ways out" in msg and "no checkpoint yet" in msg and "\n" not in msg
