"""Fine-tuning: what is frozen stays bit-identical and out of the optimizer, on one and two processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ARCH_NAMES, tiny_model
from helpers_finetune import (benign_rows, invariants, one_thread, run_case, snapshot, tiny_args,
                              write_jsonl)

from safety_layers.core.errors import SafetyLayersError
from safety_layers.finetune import (FinetuneConfig, apply_method, export_axolotl, export_peft_config, finetune,
                                    prepare, read_band, resolve_band, tokenize_rows, train_and_save,
                                    unfrozen_patterns)
from safety_layers.core.layers import LayerRange

TESTS = Path(__file__).resolve().parent
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def _layer(name: str) -> int | None:
    m = re.search(r"\.(?:layers|h)\.(\d+)\.", name)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- training on one process

@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2"])
def test_sppft_freezes_exactly_the_band(tmp_path, arch):
    prep, result, inv = run_case(arch, "sppft", "1-2", tmp_path)
    assert result.global_step == 3 and result.frozen_check == "passed"
    # the frozen set is the band's attention + MLP, nothing else
    frozen = set(inv["frozen_unchanged"]) | set(inv["frozen_changed"])
    assert frozen and all(_layer(n) in (1, 2) for n in frozen)
    assert not any("norm" in n or ".ln_" in n for n in frozen)
    assert inv["frozen_changed"] == [] and inv["trainable_unchanged"] == []
    assert inv["frozen_in_optimizer"] == [] and inv["frozen_with_state"] == []
    assert inv["trainable_missing_from_optimizer"] == []
    # every trainable tensor has optimizer state after training; no frozen one has any
    opt = prep.trainer.optimizer
    assert sum(len(g["params"]) for g in opt.param_groups) == len(inv["trainable_changed"])
    assert len(opt.state) == len(inv["trainable_changed"])
    manifest = json.loads((Path(result.out) / "manifest.json").read_text())
    assert manifest["method"] == "sppft" and manifest["band"] == [1, 2]
    assert manifest["frozen"]["names_count"] == len(frozen) == result.frozen_tensors
    assert manifest["frozen"]["fraction"] == pytest.approx(result.frozen_params / result.total_params)
    assert manifest["data"]["sha256"] and manifest["training_args"]["seed"] == 0
    assert (Path(result.out) / "model.safetensors").is_file()


@pytest.mark.parametrize("arch", ["phi3", "llama"])
def test_sppft_lora_puts_no_adapter_on_the_band(tmp_path, arch):
    prep, result, inv = run_case(arch, "sppft-lora", "1-2", tmp_path)
    lora = inv["lora_names"]
    assert lora and {_layer(n) for n in lora} == {0, 3}
    targets = set(prep.model.peft_config["default"].target_modules)
    expected = {"phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
                "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}}[arch]
    assert targets == expected
    # each target module of layers 0 and 3 got an A and a B
    assert len(lora) == 2 * 2 * len(expected)
    assert inv["frozen_changed"] == [] and inv["trainable_unchanged"] == [] and inv["lora_zero"] == []
    assert set(inv["trainable_changed"]) == set(lora)
    assert inv["frozen_in_optimizer"] == [] and inv["frozen_with_state"] == []
    assert (Path(result.out) / "adapter_model.safetensors").is_file()
    cfg = json.loads((Path(result.out) / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] == [0, 3]


def test_merged_sppft_lora_leaves_the_band_untouched(tmp_path):
    from safety_layers.core.models import load_model

    original = snapshot(tiny_model("llama", layers=4, seed=0).model)
    _, result, _ = run_case("llama", "sppft-lora", "1-2", tmp_path, cfg_overrides={"merge_lora": True})
    manifest = json.loads((Path(result.out) / "manifest.json").read_text())
    assert manifest["format"] == "hf-model" and manifest["lora"]["merged"]
    merged = dict(load_model(result.out).model.named_parameters())
    assert set(merged) == set(original)                      # a plain model: no LoRA tensors left
    for n, p in merged.items():
        in_band, lora_target = _layer(n) in (1, 2), re.search(r"_proj\.weight$", n)
        if in_band or not lora_target:
            assert torch.equal(p, original[n]), n
        else:
            assert not torch.equal(p, original[n]), n


def test_freeze_norms_freezes_the_whole_block_for_every_architecture():
    for arch in ARCH_NAMES:
        lm = tiny_model(arch, layers=4)
        block = {n for n, _ in lm.model.named_parameters() if _layer(n) == 2}
        with_norms = set(lm.blocks.parameters(LayerRange(2, 2), norms=True))
        without = set(lm.blocks.parameters(LayerRange(2, 2), norms=False))
        assert with_norms == block, arch
        assert without < block and all(_layer(n) == 2 for n in without), arch


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path):
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt("simulated kill")

    data = write_jsonl(tmp_path / "data.jsonl", benign_rows(24))

    def run(tag, resume=False, callbacks=None, out_dir=None):
        lm = tiny_model("llama", layers=4, seed=0)
        cfg = FinetuneConfig(data=str(data), method="sppft", layers="1-2", max_length=64, resume=resume,
                             out=str(tmp_path / f"final-{tag}"))
        args = tiny_args(str(out_dir or tmp_path / f"run-{tag}"), max_steps=6, save_strategy="steps", save_steps=2,
                         save_total_limit=None)
        return lm, finetune(cfg, args, model=lm, callbacks=callbacks)

    lm_a, res_a = run("a")
    assert res_a.global_step == 6
    with pytest.raises(KeyboardInterrupt):
        run("b", callbacks=[Crash()])
    assert not (tmp_path / "final-b").exists()              # no final folder from an interrupted run
    assert sorted(p.name for p in (tmp_path / "run-b").glob("checkpoint-*")) == ["checkpoint-2"]
    with pytest.raises(SafetyLayersError, match="--resume"):
        run("b")                                             # checkpoints exist: must say resume or overwrite
    lm_c, res_c = run("b", resume=True)
    assert res_c.global_step == 6 and res_c.resumed_from.endswith("checkpoint-2")
    for (n, pa), pc in zip(lm_a.model.named_parameters(), lm_c.model.parameters(), strict=True):
        torch.testing.assert_close(pc, pa, rtol=0, atol=1e-6, msg=n)
    assert res_c.frozen_check == "passed"


# --------------------------------------------------------------------------- two processes (torchrun, gloo)

def test_two_process_torchrun_keeps_frozen_weights_out_of_the_optimizer(tmp_path):
    cases = ["phi3:sppft:1-2", "phi3:sppft-lora:1-2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent / "src"),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(TESTS / "helpers_finetune.py"), str(tmp_path), *cases, "align"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # align's SFT Trainer under DDP: each process trains on its half of the batch plan (4 batches, 2 steps),
    # the loss runs through the wrapper, so the gradients are averaged and the replicas stay equal
    aligned = [json.loads((tmp_path / f"align-rank{r}.json").read_text()) for r in (0, 1)]
    assert [a["steps"] for a in aligned] == [2, 2] and aligned[0]["losses"] != aligned[1]["losses"]
    assert aligned[0]["checksum"] == pytest.approx(aligned[1]["checksum"], rel=0, abs=1e-9)
    for case in cases:
        arch, method, _ = case.split(":")
        ranks = [json.loads((tmp_path / f"{arch}-{method}-rank{r}.json").read_text()) for r in (0, 1)]
        for inv in ranks:
            assert inv["world_size"] == 2 and inv["global_step"] == 3 and inv["frozen_check"] == "passed"
            assert inv["frozen_unchanged"] and inv["frozen_changed"] == []
            assert inv["trainable_changed"] and inv["trainable_unchanged"] == []
            assert inv["frozen_in_optimizer"] == [] and inv["frozen_with_state"] == []
            assert inv["final_exists"]
            if method == "sppft-lora":
                assert inv["lora_names"] and {_layer(n) for n in inv["lora_names"]} == {0, 3}
        # DDP kept the replicas in sync
        assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], rel=0, abs=1e-9)


# --------------------------------------------------------------------------- data

def test_tokenize_masks_the_prompt_and_ends_with_the_real_eos():
    tok = tiny_model("llama").tokenizer
    rows = [{"instruction": "Add 2 and 3.", "input": "", "output": "5"}]
    d = tokenize_rows(rows, tok, "chat", 128, train_on_inputs=False)
    ex = d.examples[0]
    learned = [t for t in ex.labels if t != -100]
    assert learned[-1] == tok.eos_token_id and ex.input_ids[-1] == tok.eos_token_id
    assert tok.decode(learned) == "5" + tok.eos_token
    n_prompt = ex.labels.index(learned[0])
    assert tok.decode(ex.input_ids[:n_prompt]).endswith("assistant\n")
    paper = FinetuneConfig(data="x", paper=True)
    assert (paper.template, paper.train_on_inputs) == ("alpaca", True)
    d2 = tokenize_rows(rows, tok, paper.template, 512, train_on_inputs=True)
    assert d2.examples[0].labels == d2.examples[0].input_ids
    assert "### Response:\n5" in tok.decode(d2.examples[0].input_ids)
    # truncation keeps the head; a prompt that fills max_length leaves nothing to learn and is dropped
    long = [{"instruction": "x" * 300, "input": "", "output": "y"}]
    d3 = tokenize_rows(long + rows, tok, "chat", 64)
    assert d3.dropped_too_long == 1 and len(d3.examples) == 1


# --------------------------------------------------------------------------- errors

def _cfg(tmp_path, **kw):
    data = kw.pop("data", None) or write_jsonl(tmp_path / "d.jsonl", benign_rows(8))
    return FinetuneConfig(data=str(data), max_length=64, out=str(tmp_path / "final"), **kw)


@pytest.mark.parametrize("kw, match", [
    ({"layers": "3-5"}, "outside the model"),
    ({"layers": "0-3"}, "nothing is left to train"),
    ({"layers": "0-3", "method": "sppft-lora"}, "nothing is left to train"),
    ({}, "needs a band"),
])
def test_bad_bands(tmp_path, kw, match):
    with pytest.raises(SafetyLayersError, match=match):
        prepare(_cfg(tmp_path, **kw), tiny_args(str(tmp_path / "run")), model=tiny_model("llama", layers=4))


def test_bad_data_and_outputs(tmp_path):
    lm = tiny_model("llama", layers=4)
    args = tiny_args(str(tmp_path / "run"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    with pytest.raises(SafetyLayersError, match=r"bad\.jsonl line 2 has no 'output'"):
        prepare(_cfg(tmp_path, data=bad, layers="1-2"), args, model=lm)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SafetyLayersError, match="empty.jsonl is empty"):
        prepare(_cfg(tmp_path, data=empty, layers="1-2"), args, model=lm)
    (tmp_path / "final").mkdir()
    with pytest.raises(SafetyLayersError, match="--overwrite"):
        prepare(_cfg(tmp_path, layers="1-2"), args, model=lm)
    with pytest.raises(SafetyLayersError, match="no training data"):
        prepare(FinetuneConfig(layers="1-2"), args, model=lm)
    with pytest.raises(SafetyLayersError, match="unknown method"):
        FinetuneConfig(method="sppt")


def test_not_enough_disk_is_refused_before_training(tmp_path, monkeypatch):
    import safety_layers.finetune.run as ft

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ft.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(SafetyLayersError, match="not enough disk space"):
        prepare(_cfg(tmp_path, layers="1-2"), tiny_args(str(tmp_path / "run"), save_strategy="steps"),
                model=tiny_model("llama", layers=4))


def test_band_from_a_locate_result(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"safety_layers": [6, 12]}))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "result.json").write_text(json.dumps({"safety_layers": [5, 11], "alpha": 1.2}))
    (tmp_path / "none.json").write_text(json.dumps({"alpha": 1.2, "range": [5, 11]}))
    assert read_band(tmp_path / "a.json") == LayerRange(6, 12)
    assert read_band(tmp_path / "run") == LayerRange(5, 11)
    with pytest.raises(SafetyLayersError, match="no 'safety_layers' entry"):
        read_band(tmp_path / "none.json")
    lm = tiny_model("llama", layers=4)
    (tmp_path / "b.json").write_text(json.dumps({"safety_layers": [1, 2]}))
    cfg = _cfg(tmp_path, locate=str(tmp_path / "b.json"))
    band = resolve_band(cfg, lm.num_layers)
    _, plan, frozen = apply_method(lm, cfg, band)
    assert plan.band == [1, 2] and frozen and all(_layer(n) in (1, 2) for n in frozen)
    with pytest.raises(SafetyLayersError, match="disagrees"):
        prepare(_cfg(tmp_path, locate=str(tmp_path / "b.json"), layers="0-1"), tiny_args(str(tmp_path / "r")),
                model=lm)


# --------------------------------------------------------------------------- exports and argument parsing

def _axolotl_unfrozen(patterns: list[str], names: list[str]) -> set[str]:
    """Axolotl's matching: '.' not followed by '+' is a literal dot; re.match from the start."""
    compiled = [re.compile(re.sub(r"\.(?!\+)", "\\.", p)) for p in patterns]
    return {n for n in names if any(c.match(n) for c in compiled)}


@pytest.mark.parametrize("norms", [False, True])
def test_axolotl_patterns_unfreeze_exactly_what_sppft_trains(norms):
    for arch in ARCH_NAMES:
        lm = tiny_model(arch, layers=4)
        names = [n for n, _ in lm.model.named_parameters()]
        frozen = set(lm.blocks.parameters(LayerRange(1, 2), norms=norms))
        text = export_axolotl("1-2", lm, freeze_norms=norms)
        pats = yaml.safe_load(text)["unfrozen_parameters"]
        assert pats == unfrozen_patterns("1-2", lm, freeze_norms=norms)
        assert _axolotl_unfrozen(pats, names) == set(names) - frozen, arch


def test_peft_config_export():
    lm = tiny_model("gpt2", layers=4)
    cfg = export_peft_config("1-2", lm, r=4)
    assert cfg.layers_to_transform == [0, 3] and cfg.layers_pattern == "h" and cfg.fan_in_fan_out
    assert set(cfg.target_modules) == {"c_attn", "c_proj", "c_fc"}
    phi = export_peft_config(LayerRange(0, 0), tiny_model("phi3", layers=4))
    assert phi.layers_to_transform == [1, 2, 3] and set(phi.target_modules) == {
        "qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert export_peft_config(None, lm).layers_to_transform is None
    with pytest.raises(SafetyLayersError, match="no layer is left"):
        export_peft_config("0-3", lm)


def test_command_line_yaml_then_flags(tmp_path, monkeypatch):
    """`safety-layers finetune`: a YAML of both dataclasses' fields, our flags over it, the
    Trainer's flags passed through; what reaches finetune() is checked, nothing trains."""
    import safety_layers.finetune as ft
    from safety_layers.cli.main import run

    seen = []
    monkeypatch.setattr(ft, "finetune", lambda cfg, targs: seen.append((cfg, targs)) or 1 / 0)

    def parse(argv):
        with pytest.raises(ZeroDivisionError):
            run(["finetune", *argv])
        return seen.pop()

    y = tmp_path / "run.yaml"
    y.write_text("method: sppft-lora\nlayers: 6-12\nlearning_rate: 0.0003\nlora_r: 8\nlora_alpha: 4\n"
                 "output_dir: runs/x\n")
    cfg, targs = parse(["--config", str(y), "--lora-r", "4", "--data", "d.jsonl", "--seed", "3"])
    assert (cfg.method, cfg.layers, cfg.lora_r, cfg.lora_alpha, cfg.data) == ("sppft-lora", "6-12", 4, 4, "d.jsonl")
    assert targs.learning_rate == 3e-4 and targs.output_dir == "runs/x" and targs.seed == 3
    _, auto = parse(["--method", "full", "--model", "smollm2-135m-instruct"])
    assert re.fullmatch(r"runs/finetune-smollm2-135m-instruct-full-\d{8}-\d{6}", auto.output_dir)
    y.write_text("methd: sppft\n")
    with pytest.raises(SafetyLayersError, match="did you mean 'method'"):
        run(["finetune", "--config", str(y)])
    with pytest.raises(SafetyLayersError, match="invalid choice"):
        run(["finetune", "--method", "nope"])
    with pytest.raises(SafetyLayersError, match="--lora-alpha"):
        run(["finetune", "--lora-alpha", "8"])                  # a YAML-only field is no flag


def test_full_method_trains_everything(tmp_path):
    lm = tiny_model("qwen2", layers=2)
    before = snapshot(lm.model)
    cfg = _cfg(tmp_path, method="full")
    prep = prepare(cfg, tiny_args(str(tmp_path / "run")), model=lm)
    result = train_and_save(prep)
    inv = invariants(prep, before)
    assert result.frozen_params == 0 and inv["trainable_unchanged"] == [] and not inv["frozen_unchanged"]
    # AdamW: two fp32 moments per parameter, plus a scalar step count per tensor
    low = 2 * 4 * result.trainable_params
    assert low <= result.optimizer_state_bytes <= low + 8 * len(inv["trainable_changed"])


def test_freeze_check_callback_catches_leaks_and_changes():
    from types import SimpleNamespace

    from safety_layers.finetune import FreezeCheckCallback

    w, v = torch.nn.Parameter(torch.ones(3, 3)), torch.nn.Parameter(torch.zeros(2))
    state = SimpleNamespace(is_world_process_zero=True)
    cb = FreezeCheckCallback({"w": w}, verbose=False)
    with pytest.raises(RuntimeError, match="in the optimizer"):
        cb.on_train_begin(SimpleNamespace(), state, None, optimizer=torch.optim.SGD([w, v], lr=0.1))
    cb.on_train_begin(SimpleNamespace(), state, None, optimizer=torch.optim.SGD([v], lr=0.1))
    assert cb.groups[0]["tensors"] == 1 and cb.groups[0]["params"] == 2
    cb.on_train_end(SimpleNamespace(), state, None)
    assert cb.result == "passed"
    with torch.no_grad():
        w[1, 1] += 1e-3
    with pytest.raises(RuntimeError, match="frozen parameters changed"):
        cb.on_train_end(SimpleNamespace(), state, None)


def test_exports_from_a_model_folder_need_no_weights(tmp_path):
    from safety_layers.core.models import save_model

    lm = tiny_model("phi3", layers=4)
    save_model(lm.model, lm.tokenizer, tmp_path / "m")
    assert export_axolotl("1-2", str(tmp_path / "m")) == export_axolotl("1-2", lm)
    assert export_peft_config("1-2", str(tmp_path / "m")).layers_to_transform == [0, 3]
    with pytest.raises(SafetyLayersError, match="outside the model"):
        export_axolotl("2-4", lm)
