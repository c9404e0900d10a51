"""Architecture map, loading, saving and fingerprints."""

import pytest
import torch

from conftest import ARCH_NAMES, tiny_model
from safety_layers.core.errors import SafetyLayersError
from safety_layers.core.layers import LayerRange
from safety_layers.core.models import PAPER_COMPONENTS, find_blocks, fingerprint, load_model, save_model

FUSED = {"phi3": {"attn.qkv", "attn.o", "mlp.gate_up", "mlp.down"},
         "gpt2": {"attn.qkv", "attn.o", "mlp.up", "mlp.down"},
         "gpt_neox": {"attn.qkv", "attn.o", "mlp.up", "mlp.down"}}
SPLIT = {"attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"}


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_every_architecture_maps_blocks_and_weights(arch):
    lm = tiny_model(arch, layers=3)
    assert len(lm.blocks) == 3
    weights = lm.blocks.weights(1)
    names = {k.removesuffix(".weight") for k in weights}
    assert names == FUSED.get(arch, SPLIT)
    # every mapped weight is a real parameter of block 1 and of no other block
    params_of_block1 = {id(p) for p in lm.blocks.layers[1].parameters()}
    assert all(id(w) in params_of_block1 for w in weights.values())
    assert lm.blocks.final_norm is not None


@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3", "gpt2"])
def test_norm_weights_are_listed_only_on_request(arch):
    lm = tiny_model(arch, layers=2)
    assert not any(k.startswith("norm.") for k in lm.blocks.weights(0))
    norms = [k for k in lm.blocks.weights(0, norms=True) if k.startswith("norm.")]
    assert len(norms) >= 2


def test_unknown_architecture_names_what_was_missing():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    with pytest.raises(SafetyLayersError, match="unsupported architecture.*no decoder blocks found at.*model.layers"):
        find_blocks(Odd())


def test_block_missing_a_projection_is_named():
    lm = tiny_model("llama", layers=2)
    del lm.model.model.layers[0].mlp.gate_proj
    with pytest.raises(SafetyLayersError, match="lacks mlp.gate_proj"):
        find_blocks(lm.model)


def test_fingerprint_changes_when_weights_change_in_place():
    lm = tiny_model("llama")
    before = fingerprint(lm.model)
    assert fingerprint(lm.model) == before
    with torch.no_grad():
        lm.blocks.component(2, "mlp.down").weight.mul_(1.1)
    assert fingerprint(lm.model) != before


def test_save_roundtrip_loads_identical_safetensors(tmp_path):
    lm = tiny_model("qwen2")
    out = save_model(lm.model, lm.tokenizer, tmp_path / "m")
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    again = load_model(str(out))
    assert again.num_layers == lm.num_layers
    for (n, a), (_, b) in zip(lm.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), n
    with pytest.raises(SafetyLayersError, match="exists"):
        save_model(lm.model, lm.tokenizer, out)
    lm2 = tiny_model("qwen2", seed=1)
    save_model(lm2.model, lm2.tokenizer, out, overwrite=True)          # replaced whole, no temp folder left
    assert torch.equal(load_model(str(out)).model.lm_head.weight, lm2.model.lm_head.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_importing_the_package_sets_no_warning_filter():
    """Silencing is scoped to the GGUF load: the user's warnings filters stay as they were."""
    import warnings

    import safety_layers.core.models  # noqa: F401

    assert not [f for f in warnings.filters if f[1] is not None and "gguf" in f[1].pattern]


def test_missing_folder_and_offline_hub_give_one_line_errors(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SafetyLayersError, match="not found"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(SafetyLayersError, match="hub") as e:
        load_model("some-org/some-model-that-is-not-cached")
    assert "\n" not in str(e.value)


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(SafetyLayersError, match="GGUF file not found"):
        load_model(str(tmp_path / "x.gguf"))


def test_layer_range_is_inclusive_and_checked():
    r = LayerRange.parse("6-12")
    assert r.indices == list(range(6, 13)) and len(r) == 7 and 12 in r and 13 not in r
    assert LayerRange.parse("[6, 12]") == r == LayerRange.parse((6, 12))
    assert LayerRange.parse("7").indices == [7]
    with pytest.raises(SafetyLayersError, match="outside the model"):
        r.check(12)
    r.check(13)
    for bad in ("12-6", "a-b", "-3"):
        with pytest.raises(SafetyLayersError):
            LayerRange.parse(bad)


def test_paper_components_cover_fused_and_split_names():
    assert {"attn.qkv", "mlp.gate_up", "attn.q", "mlp.down"} <= set(PAPER_COMPONENTS)
