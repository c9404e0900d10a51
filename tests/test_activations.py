"""Last-token hidden states: equal to transformers' hidden_states, batched, cached, cut short."""

import pytest
import torch

from conftest import ARCH_NAMES, tiny_model
from safety_layers.engine.activations import _batches, _forward_last, _prefix_cache, last_token_states
from safety_layers.core.errors import SafetyLayersError
from safety_layers.core.prompts import render

PROMPTS = ["How do I bake bread?", "Hi", "Write a limerick about a cat who learns to code in Rust.",
           "What is 2+2?", "Explain photosynthesis to a ten year old in three sentences please."]


def reference_states(lm, prompts, template="chat"):
    """The released code's way: one prompt at a time, output_hidden_states, embeddings skipped."""
    out = []
    for p in prompts:
        r = render(lm.tokenizer, p, template)
        ids = lm.tokenizer(r.text, return_tensors="pt", add_special_tokens=r.add_special_tokens)
        with torch.no_grad():
            hs = lm.model(**ids, output_hidden_states=True).hidden_states
        out.append(torch.stack([h[0, -1] for h in hs[1:]]))
    return torch.stack(out)


@pytest.mark.parametrize("exact", [True, False], ids=["equal-lengths", "padded"])
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_matches_output_hidden_states_for_every_architecture(arch, exact):
    lm = tiny_model(arch, layers=3)
    ours = last_token_states(lm, PROMPTS, cache=False, progress=False, max_batch_tokens=200, exact=exact)
    ref = reference_states(lm, PROMPTS)
    assert ours.shape == (len(PROMPTS), 3, 32)
    assert (ours - ref).abs().max() < 1e-4


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_shared_prefix_runs_once_with_the_same_vectors(arch):
    lm = tiny_model(arch, layers=3)
    widths = []

    def spy(_m, _i, out):
        widths.append(tuple((out[0] if isinstance(out, tuple) else out).shape[:2]))

    h = lm.blocks.layers[0].register_forward_hook(spy)
    ours = last_token_states(lm, PROMPTS, "alpaca", cache=False, progress=False, max_batch_tokens=400)
    h.remove()
    plain = last_token_states(lm, PROMPTS, "alpaca", cache=False, progress=False, share_prefix=False)
    ref = reference_states(lm, PROMPTS, "alpaca")
    assert (ours - ref).abs().max() < 1e-4 and (plain - ref).abs().max() < 1e-4
    rendered = [render(lm.tokenizer, p, "alpaca") for p in PROMPTS]
    lengths = [len(lm.tokenizer(r.text, add_special_tokens=r.add_special_tokens)["input_ids"]) for r in rendered]
    rows, n = widths[0]
    assert rows == 1 and n > 100, "the shared instruction header runs once, as one row"
    assert sum(r for r, _ in widths[1:]) == len(PROMPTS)
    assert max(w for _, w in widths[1:]) == max(lengths) - n


def test_shared_prefix_cache_is_read_not_grown():
    lm = tiny_model("llama", layers=3)
    prefix = _prefix_cache(lm, list(range(5, 25)), 2)
    assert prefix.frozen  # plain layers: read in place, not copied per batch
    before = [layer.keys.clone() for layer in prefix.layers]
    out = _forward_last(lm, [[30, 31, 32], [33, 34, 35]], 2, True, prefix)
    again = _forward_last(lm, [[30, 31, 32]], 2, True, prefix)
    whole = _forward_last(lm, [list(range(5, 25)) + [30, 31, 32]], 2, True)
    # batch sizes 2 and 1 may take different GEMM kernels: equal up to fp32 rounding
    torch.testing.assert_close(out[0], again[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(again[0], whole[0], rtol=0, atol=1e-5)
    assert [layer.keys.shape for layer in prefix.layers] == [b.shape for b in before]
    assert all(torch.equal(layer.keys, b) for layer, b in zip(prefix.layers, before))
    assert before[0].shape[0] == 1 and before[0].shape[-2] == 20


def test_alpaca_template_and_layer_subset():
    lm = tiny_model("llama", layers=4)
    ref = reference_states(lm, PROMPTS, "alpaca")
    sub = last_token_states(lm, PROMPTS, "alpaca", layers=[1, 2], cache=False, progress=False)
    assert (sub - ref[:, [1, 2]]).abs().max() < 1e-4


def test_forward_stops_after_last_requested_layer():
    lm = tiny_model("llama", layers=4)
    ran = []
    hooks = [blk.register_forward_hook(lambda m, i, o, k=k: ran.append(k)) for k, blk in enumerate(lm.blocks.layers)]
    head_calls = []
    hooks.append(lm.model.lm_head.register_forward_hook(lambda *a: head_calls.append(1)))
    last_token_states(lm, PROMPTS[:2], layers=[0, 1], cache=False, progress=False)
    for h in hooks:
        h.remove()
    assert set(ran) == {0, 1} and not head_calls


def test_cache_hit_runs_no_forward_and_is_per_fingerprint(tmp_path):
    lm = tiny_model("llama", layers=3)
    first = last_token_states(lm, PROMPTS, cache=tmp_path, progress=False)
    calls = []
    h = lm.blocks.layers[0].register_forward_hook(lambda *a: calls.append(1))
    second = last_token_states(lm, PROMPTS, cache=tmp_path, progress=False)
    assert torch.equal(first, second) and not calls
    with torch.no_grad():
        lm.blocks.component(0, "attn.q").weight.mul_(2.0)
    last_token_states(lm, PROMPTS[:1], cache=tmp_path, progress=False)
    h.remove()
    assert calls, "a changed model must not reuse the old model's cache"


def test_batches_are_length_sorted_and_within_budget():
    lengths = [5, 50, 7, 48, 6, 49]
    batches = list(_batches(lengths, max_batch_tokens=100, max_batch_size=8))
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 100 or len(b) == 1
    assert [lengths[i] for i in batches[0]] == [50, 49]
    equal = list(_batches([5, 9, 5, 9, 9, 5, 7], max_batch_tokens=20, max_batch_size=8, equal=True))
    assert [[[5, 9, 5, 9, 9, 5, 7][i] for i in b] for b in equal] == [[9, 9], [9], [7], [5, 5, 5]]


def test_bad_input():
    lm = tiny_model("llama", layers=3)
    with pytest.raises(SafetyLayersError, match="out of range.*0-2"):
        last_token_states(lm, PROMPTS, layers=[3], cache=False, progress=False)
    with pytest.raises(SafetyLayersError, match="no prompts"):
        last_token_states(lm, [], cache=False, progress=False)
