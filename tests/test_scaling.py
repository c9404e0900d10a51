"""The scaling context: exact scaling of the chosen weights, exact restore, also on error."""

import hashlib

import pytest
import torch

from conftest import ARCH_NAMES, VOCAB, byte_tokenizer, tiny_model
from safety_layers.core.errors import SafetyLayersError
from safety_layers.core.models import SUPPORTED_MODEL_TYPES, LoadedModel, find_blocks
from safety_layers.core.scaling import SCALING_EFFECTS, scaled_layers

QK_NORM_ARCHS = ["qwen3", "gemma3_text", "olmo2"]
POST_NORM_ARCHS = ["gemma2", "gemma3_text", "olmo2"]


def any_tiny(arch: str, seed: int = 0):
    """``tiny_model`` plus the q/k-norm architectures the shared fixture does not build, with its norms'
    random biases and its norms' eps near zero: a random init's activations are so small that eps would blur the factors tested here."""
    lm = _build(arch, seed)
    with torch.no_grad():   # random biases: the init's zeros would hide whether a bias is scaled
        for name, p in lm.model.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-0.5, 0.5)
    for mod in lm.model.modules():
        for attr in ("eps", "variance_epsilon"):
            if isinstance(getattr(mod, attr, None), float):
                setattr(mod, attr, 1e-12)
    return lm


def _build(arch: str, seed: int):
    if arch in ARCH_NAMES:
        return tiny_model(arch, seed=seed)
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = {"qwen3": lambda: tf.Qwen3Config(**common, head_dim=8),
              "olmo2": lambda: tf.Olmo2Config(**common)}[arch]()
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():   # random gains, so a norm's weight is not a neutral 1 (or 0 for gemma's 1 + w)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return LoadedModel(model, byte_tokenizer(), f"tiny-{arch}", "memory", find_blocks(model))


def _outputs(lm, path: str, ids, layer: int = 1):
    """The output of module ``path`` inside block ``layer`` for one forward pass."""
    got = []
    mod = lm.blocks.layers[layer].get_submodule(path)
    handle = mod.register_forward_hook(lambda m, a, out: got.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            lm.model(ids)
    finally:
        handle.remove()
    return got[0].clone()


IDS = torch.tensor([[1, 50, 60, 70, 80, 90]])


@pytest.mark.parametrize("arch", ARCH_NAMES + ["qwen3", "olmo2"])
def test_scaling_and_freezing_cover_one_parameter_set(arch):
    """What scaling multiplies is what freezing freezes: every parameter of the block's attention and MLP."""
    lm = any_tiny(arch)
    with scaled_layers(lm, "1-2", 1.5):
        pass
    scaled = {id(p) for i in (1, 2) for p in lm.blocks.layer_parameters(i).values()}
    frozen = {id(p) for p in lm.blocks.parameters([1, 2]).values()}
    subs = {path.split(".")[0] for path in lm.blocks.spec.components.values()}
    whole = {id(p) for i in (1, 2) for s in subs for p in lm.blocks.layers[i].get_submodule(s).parameters()}
    assert scaled == frozen == whole


@pytest.mark.parametrize("arch", ARCH_NAMES + ["qwen3", "olmo2"])
def test_every_scaled_projection_outputs_alpha_times_its_output(arch):
    """Biases scale with their matrix, so a projection's output is exactly alpha times (gpt2, gpt_neox, qwen2)."""
    lm = any_tiny(arch)
    for name, path in lm.blocks.spec.components.items():
        if lm.blocks.component(1, name) is None:
            continue
        base = _outputs(lm, path, IDS)
        with scaled_layers(lm, "1-1", 1.7, components=[name]):
            got = _outputs(lm, path, IDS)
        assert torch.allclose(got, 1.7 * base, atol=1e-5, rtol=1e-4), f"{arch} {name}"


@pytest.mark.parametrize("arch", QK_NORM_ARCHS)
def test_qk_norm_gain_carries_the_q_k_scaling(arch):
    """A q/k norm would undo scaling q and k; its gain is scaled too, so q and k come out alpha times."""
    lm = any_tiny(arch)
    for norm in ("self_attn.q_norm", "self_attn.k_norm"):
        base = _outputs(lm, norm, IDS)
        with scaled_layers(lm, "1-1", 1.7, components=["attn.q", "attn.k"]):
            got = _outputs(lm, norm, IDS)
        assert torch.allclose(got, 1.7 * base, rtol=1e-4, atol=1e-5), f"{arch} {norm}"


@pytest.mark.parametrize("arch", POST_NORM_ARCHS)
def test_post_norms_cancel_the_output_factor_as_documented(arch):
    """On gemma2/gemma3/olmo2 a post-sublayer norm renormalises the MLP's output: scaling mlp.down
    changes the MLP output alpha-fold and the block's output not at all (SCALING_EFFECTS says so)."""
    lm = any_tiny(arch)
    got = []
    h = lm.blocks.layers[1].register_forward_hook(lambda m, a, out: got.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            lm.model(IDS)
            with scaled_layers(lm, "1-1", 1.7, components=["mlp.down"]):
                lm.model(IDS)
    finally:
        h.remove()
    assert torch.allclose(got[0], got[1], atol=1e-4)
    assert "renormalise" in SCALING_EFFECTS[arch]


def test_every_supported_architecture_documents_what_scaling_does():
    assert set(SUPPORTED_MODEL_TYPES) <= set(SCALING_EFFECTS)


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
    band_ids = {id(w) for i in (1, 2) for w in lm.blocks.layer_parameters(i).values()}
    with scaled_layers(lm, "1-2", 1.3) as names:
        assert len(names) == 2 * len(lm.blocks.layer_parameters(0))
        for name, p in lm.model.named_parameters():
            if id(p) in band_ids:
                assert torch.allclose(p, before[name] * 1.3), name
            else:
                assert torch.equal(p, before[name]), f"{name} must stay untouched (block norms, embeddings)"
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
