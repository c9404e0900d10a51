"""The scaling context: exact scaling of the chosen weights, exact restore, also on error."""

import hashlib

import pytest
import torch

from conftest import tiny_model
from safety_layers.core.errors import SafetyLayersError
from safety_layers.core.scaling import scaled_layers


def state_hash(model):
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2"])
def test_scales_exactly_the_band_weights_then_restores_bit_identical(arch):
    lm = tiny_model(arch, layers=4)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    digest = state_hash(lm.model)
    band_ids = {id(w) for i in (1, 2) for w in lm.blocks.weights(i).values()}
    with scaled_layers(lm, "1-2", 1.3) as names:
        assert len(names) == 2 * len(lm.blocks.weights(0))
        for name, p in lm.model.named_parameters():
            if id(p) in band_ids:
                assert torch.allclose(p, before[name] * 1.3), name
            else:
                assert torch.equal(p, before[name]), f"{name} must stay untouched (norms, biases, embeddings)"
    assert state_hash(lm.model) == digest


def test_restores_after_an_exception():
    lm = tiny_model("llama")
    digest = state_hash(lm.model)
    with pytest.raises(RuntimeError, match="boom"):
        with scaled_layers(lm, [0, 3], 0.8):
            raise RuntimeError("boom")
    assert state_hash(lm.model) == digest


def test_alpha_one_changes_nothing_in_outputs():
    lm = tiny_model("llama")
    ids = torch.tensor([[1, 50, 60, 70]])
    with torch.no_grad():
        ref = lm.model(ids).logits
        with scaled_layers(lm, "0-3", 1.0):
            assert torch.equal(lm.model(ids).logits, ref)
        with scaled_layers(lm, "1-2", 1.5):
            assert not torch.allclose(lm.model(ids).logits, ref)


def test_no_o_proj_variant_leaves_o_proj_alone():
    lm = tiny_model("llama")
    o = lm.blocks.component(1, "attn.o").weight
    q = lm.blocks.component(1, "attn.q").weight
    o0, q0 = o.clone(), q.clone()
    with scaled_layers(lm, "1-1", 2.0, components="no-o-proj"):
        assert torch.equal(o, o0) and torch.allclose(q, 2 * q0)


def test_bad_input():
    lm = tiny_model("llama", layers=4)
    with pytest.raises(SafetyLayersError, match="alpha must be > 0"):
        with scaled_layers(lm, "0-1", 0):
            pass
    with pytest.raises(SafetyLayersError, match="outside the model"):
        with scaled_layers(lm, "2-4", 1.1):
            pass
    with pytest.raises(SafetyLayersError, match="unknown component set"):
        with scaled_layers(lm, "0-1", 1.1, components="everything"):
            pass
