"""Batched generation engine: equality with one-at-a-time generate, pruning, cache, sampling."""

from __future__ import annotations

import types

import pytest
import torch

from helpers_models import ForwardCounter, tiny_model
from safety_layers.core.errors import SafetyLayersError
from safety_layers.engine.generation import (GenerationSettings, generate, generate_vllm, stop_token_ids)
from safety_layers.core.prompts import render

PROMPTS = [
    "How can I kill a Python process?",
    "Write a haiku about autumn.",
    "What is 2+2?",
    "Explain in detail how photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "Hi",
    "Give three tips for staying healthy.",
    "Translate 'good morning' into French, German and Spanish, and say which is most formal.",
    "Why is the sky blue?",
    "List the planets of the solar system in order from the sun.",
    "Summarize the plot of Hamlet in two sentences.",
    "How do I terminate a C program?",
    "Name a color.",
]


def reference(lm, prompts, max_new_tokens, template="chat"):
    """Greedy token ids from transformers' generate, one prompt at a time (no padding)."""
    stop = stop_token_ids(lm.model, lm.tokenizer)
    out = []
    for p in prompts:
        r = render(lm.tokenizer, p, template)
        ids = lm.tokenizer(r.text, add_special_tokens=r.add_special_tokens, return_tensors="pt")["input_ids"]
        g = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                              do_sample=False, eos_token_id=stop, pad_token_id=stop[0])
        out.append(g[0, ids.shape[1]:].tolist())
    return out


@pytest.mark.parametrize("arch,template", [("llama", "chat"), ("llama", "plain"), ("llama", "alpaca"),
                                           ("gpt2", "chat"), ("phi3", "chat")])
def test_batched_greedy_equals_one_at_a_time(arch, template):
    lm = tiny_model(arch, seed=1, initializer_range=0.5)  # sharp attention: position bugs show
    s = GenerationSettings(max_new_tokens=10, batch_size=5)
    got = generate(lm, PROMPTS, s, template=template, cache=False, progress=False)
    assert [c.prompt for c in got] == PROMPTS
    assert [c.token_ids for c in got] == reference(lm, PROMPTS, 10, template)
    for c in got:
        assert c.num_tokens == len(c.token_ids) and not c.finished  # random weights never say EOS


def _stop_after(lm, prompts, steps):
    """Token ids that make each prompt's greedy output end after ``steps[i] + 1`` tokens."""
    full = generate(lm, prompts, GenerationSettings(max_new_tokens=12), cache=False, progress=False)
    return [c.token_ids[k] for c, k in zip(full, steps)], full


def test_stop_tokens_from_generation_config_list_end_rows_and_shrink_batch():
    lm = tiny_model("llama", seed=2, initializer_range=0.5)  # sharp attention: position bugs show
    prompts = PROMPTS[:6]
    extra, full = _stop_after(lm, prompts[:1], [2])  # prompt 0 will stop at its 3rd token
    lm.model.generation_config.eos_token_id = [2, extra[0]]
    assert extra[0] in stop_token_ids(lm.model, lm.tokenizer)
    with ForwardCounter(lm.model) as fc:
        got = generate(lm, prompts, GenerationSettings(max_new_tokens=12, batch_size=6),
                       cache=False, progress=False)
    first = got[0]
    cut = full[0].token_ids.index(extra[0])
    assert first.finished and first.num_tokens == cut + 1
    assert first.token_ids == full[0].token_ids[:cut + 1]
    assert first.text == lm.tokenizer.decode(full[0].token_ids[:cut], skip_special_tokens=True)
    assert [c.token_ids for c in got] == reference(lm, prompts, 12)
    # decode steps run only the rows that have not ended yet
    decode_sizes = fc.decode_batch_sizes
    assert decode_sizes == sorted(decode_sizes, reverse=True)
    n_live = [sum(len(c.token_ids) > k for c in got) for k in range(1, 12)]
    assert decode_sizes == [n for n in n_live if n]


def test_generation_stops_when_every_row_has_ended():
    lm = tiny_model("llama", seed=3)
    prompts = PROMPTS[:4]
    extra, _ = _stop_after(lm, prompts, [1, 2, 0, 2])
    lm.model.generation_config.eos_token_id = [2, *extra]
    with ForwardCounter(lm.model) as fc:
        got = generate(lm, prompts, GenerationSettings(max_new_tokens=50), cache=False, progress=False)
    assert all(c.finished and c.num_tokens <= 3 for c in got)
    assert len(fc.decode_batch_sizes) <= 2  # at most two decode steps, not 49


def test_stop_token_ids_are_required():
    model = types.SimpleNamespace(generation_config=types.SimpleNamespace(eos_token_id=None),
                                  config=types.SimpleNamespace(eos_token_id=None))
    with pytest.raises(SafetyLayersError, match="no stop token"):
        stop_token_ids(model, types.SimpleNamespace(eos_token_id=None))
    model.generation_config.eos_token_id = [7, 9]
    assert stop_token_ids(model, types.SimpleNamespace(eos_token_id=9)) == [7, 9]


def test_stop_strings_cut_the_text():
    lm = tiny_model("llama", seed=4)
    full = generate(lm, PROMPTS[:1], GenerationSettings(max_new_tokens=12), cache=False, progress=False)[0]
    text = full.text
    start = len(text) // 2
    stop = text[start:start + 3]
    cut = text.find(stop)
    got = generate(lm, PROMPTS[:1], GenerationSettings(max_new_tokens=12, stop_strings=[stop]),
                   cache=False, progress=False)[0]
    assert got.finished and got.text == text[:cut]
    assert got.num_tokens < full.num_tokens


def test_cache_hit_costs_no_forward_and_partial_cache_resumes(tmp_path):
    lm = tiny_model("llama", seed=5)
    s = GenerationSettings(max_new_tokens=8, batch_size=4)
    fresh = generate(lm, PROMPTS, s, cache=False, progress=False)

    generate(lm, PROMPTS[:5], s, cache=tmp_path, progress=False)  # an "interrupted" run
    (files,) = list(tmp_path.rglob("*.jsonl"))
    with open(files, "a") as f:
        f.write('{"key": "cut short')  # a line torn by the interruption is ignored
    with ForwardCounter(lm.model) as fc:
        resumed = generate(lm, PROMPTS, s, cache=tmp_path, progress=False)
    assert [c.token_ids for c in resumed] == [c.token_ids for c in fresh]
    assert [c.cached for c in resumed] == [True] * 5 + [False] * (len(PROMPTS) - 5)
    assert fc.calls > 0 and max(fc.batch_sizes) <= len(PROMPTS) - 5

    with ForwardCounter(lm.model) as fc:
        again = generate(lm, PROMPTS, s, cache=tmp_path, progress=False)
    assert fc.calls == 0
    assert again == fresh and all(c.cached for c in again)

    with ForwardCounter(lm.model) as fc:  # other settings: other entries
        generate(lm, PROMPTS[:2], GenerationSettings(max_new_tokens=9), cache=tmp_path, progress=False)
    assert fc.calls > 0

    with torch.no_grad():  # a model changed in place gets a new fingerprint, so no stale hits
        lm.blocks.component(0, "mlp.down").weight.mul_(1.5)
    with ForwardCounter(lm.model) as fc:
        generate(lm, PROMPTS[:2], s, cache=tmp_path, progress=False)
    assert fc.calls > 0


def test_reply_start_is_continued_and_left_out_of_the_completion(tmp_path):
    lm = tiny_model("llama", seed=1, initializer_range=0.5)
    starts = ["Sure, here", "Step 1:"]
    s = GenerationSettings(max_new_tokens=6)
    got = generate(lm, PROMPTS[:2], s, cache=tmp_path, progress=False, reply_start=starts)
    stop = stop_token_ids(lm.model, lm.tokenizer)
    for c, p, start in zip(got, PROMPTS, starts):
        r = render(lm.tokenizer, p, "chat")
        ids = lm.tokenizer(r.text + start, add_special_tokens=False, return_tensors="pt")["input_ids"]
        g = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              eos_token_id=stop, pad_token_id=stop[0])
        assert c.token_ids == g[0, ids.shape[1]:].tolist()
    plain = generate(lm, PROMPTS[:2], s, cache=tmp_path, progress=False)  # same cache, other entries
    assert [c.token_ids for c in plain] == reference(lm, PROMPTS[:2], 6)
    with pytest.raises(SafetyLayersError, match="one string per prompt"):
        generate(lm, PROMPTS[:2], s, cache=False, progress=False, reply_start=["only one"])


def test_duplicate_prompts_are_generated_once():
    lm = tiny_model("llama", seed=6)
    with ForwardCounter(lm.model) as fc:
        got = generate(lm, ["Hi", "Hi", "Why?"], GenerationSettings(max_new_tokens=3), cache=False, progress=False)
    assert max(fc.batch_sizes) == 2
    assert got[0] == got[1]


def test_seeded_sampling_is_reproducible_and_independent_of_batching():
    lm = tiny_model("llama", seed=7)
    s = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=1.0, top_p=0.9, top_k=50, seed=11)
    a = generate(lm, PROMPTS, s, cache=False, progress=False)
    s.batch_size = 3
    b = generate(lm, PROMPTS, s, cache=False, progress=False)
    s.seed = 12
    c = generate(lm, PROMPTS, s, cache=False, progress=False)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    greedy = generate(lm, PROMPTS, GenerationSettings(max_new_tokens=8), cache=False, progress=False)
    assert [x.token_ids for x in a] != [x.token_ids for x in greedy]


def test_top_k_one_sampling_is_greedy():
    lm = tiny_model("gpt2", seed=8)
    greedy = generate(lm, PROMPTS[:4], GenerationSettings(max_new_tokens=6), cache=False, progress=False)
    k1 = generate(lm, PROMPTS[:4], GenerationSettings(max_new_tokens=6, do_sample=True, top_k=1, seed=3),
                  cache=False, progress=False)
    assert [x.token_ids for x in k1] == [x.token_ids for x in greedy]


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(do_sample=True, temperature=0), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(batch_size=0), "batch_size"),
    (dict(stop_strings="###"), "list of strings"),
])
def test_settings_are_checked(kwargs, match):
    with pytest.raises(SafetyLayersError, match=match):
        GenerationSettings(**kwargs)


def test_vllm_backend_reports_missing_install():
    try:
        import vllm  # noqa: F401
        pytest.skip("vllm is installed")
    except ImportError:
        pass
    lm = tiny_model("llama")
    with pytest.raises(SafetyLayersError, match="vLLM is not installed"):
        generate(lm, ["Hi"], GenerationSettings(max_new_tokens=2), cache=False, backend="vllm")
    with pytest.raises(SafetyLayersError, match="pip install vllm"):
        generate_vllm(lm, [[1, 2]], GenerationSettings(), [2])


def test_progress_bar_is_silent_when_off(capsys):
    lm = tiny_model("llama")
    generate(lm, PROMPTS[:3], GenerationSettings(max_new_tokens=2), cache=False, progress=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


@pytest.mark.slow
def test_real_model_batched_greedy_matches_generate():
    from safety_layers.core.models import load_model

    lm = load_model()
    prompts = PROMPTS[:3] + ["How do I best execute a risky plan?"]
    got = generate(lm, prompts, GenerationSettings(max_new_tokens=16), cache=False, progress=False)
    # fp32 batched and unbatched matmuls may differ in the last bits; on these prompts (and on
    # 128 in bench/bench_generation.py) no argmax flipped, so equality is exact.
    assert [c.token_ids for c in got] == reference(lm, prompts, 16)


def test_prefill_chunks_by_length_and_shares_the_prefix(monkeypatch):
    import safety_layers.engine.generation as gen

    lm = tiny_model("llama", seed=9, initializer_range=0.5)
    prompts = ["Hi", "Why?", PROMPTS[3], PROMPTS[6], "Name a color.", PROMPTS[8]]
    monkeypatch.setattr(gen, "CHUNK_MIN_TOKENS", 0)  # split even a batch this small
    with ForwardCounter(lm.model) as fc:
        chunked = generate(lm, prompts, GenerationSettings(max_new_tokens=6), cache=False, progress=False)
    prefill_calls = [s for s in fc.shapes if s[1] > 1]
    assert prefill_calls[0][0] == 1  # the chat template's system turn, run once
    assert len(prefill_calls) >= 3  # ... then the suffixes in more than one length chunk
    monkeypatch.setattr(gen, "CHUNK_PAD_SLACK", 1e9)
    monkeypatch.setattr(gen, "MIN_SHARED_PREFIX", 10**6)
    with ForwardCounter(lm.model) as fc:
        plain = generate(lm, prompts, GenerationSettings(max_new_tokens=6), cache=False, progress=False)
    assert [s[0] for s in fc.shapes if s[1] > 1] == [len(prompts)]  # one padded prefill
    assert [c.token_ids for c in chunked] == [c.token_ids for c in plain] == reference(lm, prompts, 6)


def test_training_mode_is_restored():
    lm = tiny_model("llama", seed=10)
    lm.model.train()
    generate(lm, ["Hi", "Why?"], GenerationSettings(max_new_tokens=2), cache=False, progress=False)
    assert lm.model.training
