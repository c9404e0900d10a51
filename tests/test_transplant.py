"""Layer transplant on tiny random models: what is copied (and only that), the saved model and its
manifest, the evaluation of all three models, the mismatch errors and the command line."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_model
from safety_layers.core.errors import SafetyLayersError
from safety_layers.core.layers import LayerRange
from safety_layers.core.models import load_model, save_model
from safety_layers.core.runs import read_json
from safety_layers.transplant import TransplantConfig, TransplantResult, copy_layers, part_parameters, transplant

DUMMY_EVAL = {"judges": "dummy", "limit": 3, "max_new_tokens": 2, "cache": False, "progress": False}


def _state(lm):
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2", "gpt_neox"])
def test_only_the_chosen_parts_of_the_chosen_layers_change(arch):
    base, donor = tiny_model(arch, seed=0), tiny_model(arch, seed=1)
    before, theirs = _state(base), _state(donor)
    copied = copy_layers(base, donor, LayerRange(1, 2), ["attn", "norms"])
    after = _state(base)
    attn = {n for i in (1, 2) for n in part_parameters(base.blocks, i, "attn")}
    norms = {n for i in (1, 2) for n in part_parameters(base.blocks, i, "norms")}
    assert set(copied["tensors"]) == attn | norms and attn and norms
    for name in after:
        if name in attn | norms:
            assert torch.equal(after[name], theirs[name]), name
        else:
            assert torch.equal(after[name], before[name]), name           # MLPs, other layers, embeddings
    assert [r["layer"] for r in copied["relative_difference"]] == [1, 2]
    assert all(r["attn"] > 0 for r in copied["relative_difference"])


def test_a_layer_copied_from_itself_changes_nothing():
    base, donor = tiny_model("llama", seed=0), tiny_model("llama", seed=0)
    before = _state(base)
    copied = copy_layers(base, donor, LayerRange(0, 3), ["attn", "mlp", "norms"])
    assert all(torch.equal(v, before[k]) for k, v in _state(base).items())
    assert copied["relative_difference"][0]["mlp"] == 0.0


def test_different_architectures_or_shapes_are_one_line_errors():
    with pytest.raises(SafetyLayersError, match="base is a llama model, donor a gpt2 model") as e:
        copy_layers(tiny_model("llama"), tiny_model("gpt2"), LayerRange(0, 1), ["attn"])
    assert "\n" not in str(e.value)
    with pytest.raises(SafetyLayersError, match="shape mismatch: base embeddings"):
        copy_layers(tiny_model("llama"), tiny_model("llama", hidden=64), LayerRange(0, 1), ["mlp"])
    with pytest.raises(SafetyLayersError, match="donor: layer range 2-5 is outside the model"):
        copy_layers(tiny_model("llama", layers=6), tiny_model("llama", layers=4), LayerRange(2, 5), ["mlp"])
    with pytest.raises(SafetyLayersError, match="unknown part"):
        TransplantConfig(layers="1-2", parts="attn,ffn")
    with pytest.raises(SafetyLayersError, match="no layers given"):
        TransplantConfig()


def test_intermediate_size_mismatch_names_the_tensor():
    import transformers as tf

    from safety_layers.core.models import LoadedModel, find_blocks

    base = tiny_model("llama")
    cfg = base.model.config.to_dict()
    cfg["intermediate_size"] = 96
    other = tf.LlamaForCausalLM(tf.LlamaConfig(**{k: v for k, v in cfg.items() if k in tf.LlamaConfig().to_dict()}))
    donor = LoadedModel(other, base.tokenizer, "wide", "memory", find_blocks(other))
    before = _state(base)
    with pytest.raises(SafetyLayersError, match=r"shape mismatch at model\.layers\.0\.mlp\.\w+_proj\.weight"):
        copy_layers(base, donor, LayerRange(0, 1), ["attn", "mlp"])
    assert all(torch.equal(v, before[k]) for k, v in _state(base).items())   # nothing copied before the check


def test_transplant_saves_a_loadable_model_with_manifest_and_evaluates_three_models(tmp_path):
    base, donor = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    theirs = _state(donor)
    cfg = TransplantConfig(base="tiny-base", donor="tiny-donor", layers="2-3", parts="mlp", evaluate=DUMMY_EVAL,
                           progress=False)
    res = transplant(cfg, base=base, donor=donor, run_dir=tmp_path)
    assert set(res.evaluation) == {"base", "donor", "transplant"}
    assert res.evaluation["transplant"]["harmful"]["n"] == 3
    assert (tmp_path / "eval" / "transplant" / "samples.jsonl").is_file()
    back = load_model(str(tmp_path / "model"))
    for name, p in back.model.state_dict().items():
        expected = theirs[name] if name.startswith(("model.layers.2.mlp", "model.layers.3.mlp")) else \
            _state(tiny_model("llama", seed=0))[name]
        assert torch.equal(p, expected), name
    manifest = read_json(tmp_path / "model" / "manifest.json")
    assert manifest["layers"] == [2, 3] and manifest["parts"] == ["mlp"]
    assert manifest["copied"]["tensors"] == 6 and len(manifest["copied"]["names"]) == 6
    assert manifest["base"]["name"] == "tiny-base" and manifest["donor"]["fingerprint"]
    assert TransplantResult.from_json(tmp_path / "result.json").copied_params == res.copied_params
    from safety_layers.report import write_report

    rep = write_report(tmp_path)
    assert rep.kind == "transplant" and rep.sections == ["summary", "transplant"]
    md = open(rep.markdown).read()
    assert "layers 2-3 (mlp) of tiny-donor into tiny-base" in md and "transplant" in md


def test_no_evaluation_when_switched_off(tmp_path):
    cfg = TransplantConfig(layers="0-0", evaluate=None, progress=False)
    res = transplant(cfg, base=tiny_model("llama"), donor=tiny_model("llama", seed=3), run_dir=tmp_path)
    assert res.evaluation == {} and (tmp_path / "model" / "model.safetensors").is_file()


def test_command_line(tmp_path, capsys):
    from safety_layers.cli.main import main

    a = save_model(tiny_model("llama").model, tiny_model("llama").tokenizer, tmp_path / "a")
    b = save_model(tiny_model("llama", seed=2).model, tiny_model("llama").tokenizer, tmp_path / "b")
    yaml = tmp_path / "t.yaml"
    yaml.write_text(json.dumps({"evaluate": DUMMY_EVAL, "progress": False}))
    rc = main(["transplant", "--config", str(yaml), "--base", str(a), "--donor", str(b), "--layers", "1-2",
               "--parts", "attn,mlp", "--out", str(tmp_path / "run")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "copied 14 tensors" in out and "transplant" in out
    assert (tmp_path / "run" / "model" / "manifest.json").is_file()
    g = save_model(tiny_model("gpt2").model, tiny_model("gpt2").tokenizer, tmp_path / "g")
    rc = main(["transplant", "--config", str(yaml), "--base", str(a), "--donor", str(g), "--layers", "1-2",
               "--out", str(tmp_path / "run2")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: base is a llama model, donor a gpt2 model") and "\n" not in err
