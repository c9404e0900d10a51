"""Shared fixtures: seeded tiny random models of every supported architecture.

A byte-level tokenizer (256 byte tokens plus a few specials, with a small chat template)
keeps these models self-contained: no files, no network, a few milliseconds to build.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer(chat: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


VOCAB = len(SPECIALS) + 256
ARCH_NAMES = ["llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox"]


def tiny_config(arch: str, layers: int = 4, hidden: int = 32):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "gemma":
        return tf.GemmaConfig(**common, head_dim=8)
    if arch == "gemma2":
        return tf.Gemma2Config(**common, head_dim=8, sliding_window=64)
    if arch == "gemma3_text":
        return tf.Gemma3TextConfig(**common, head_dim=8, sliding_window=64)
    if arch == "phi3":
        return tf.Phi3Config(**common)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256,
                             bos_token_id=1, eos_token_id=2)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 2,
                                num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=256,
                                bos_token_id=1, eos_token_id=2)
    raise ValueError(arch)


def tiny_model(arch: str = "llama", layers: int = 4, seed: int = 0, hidden: int = 32):
    """A seeded random causal LM of ``arch`` with the byte tokenizer, as a LoadedModel."""
    from transformers import AutoModelForCausalLM

    from safety_layers.core.models import LoadedModel, find_blocks

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, layers, hidden), dtype=torch.float32).eval()
    tok = byte_tokenizer()
    return LoadedModel(model, tok, f"tiny-{arch}", "memory", find_blocks(model))


@pytest.fixture
def tiny():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def real_model():
    """The bundled SmolLM2-135M-Instruct (converted once into the user cache)."""
    from safety_layers.core.models import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(autouse=True)
def demo_build_guard(monkeypatch, tmp_path_factory):
    """Tests name their model: reaching the 'demo' alias fails, unless the test pointed the
    cache at a temporary folder (then whatever it stubbed builds there, not in the user's cache)."""
    import importlib

    from safety_layers.core.models import cache_dir
    from safety_layers.core.registry import BUILT_MODELS

    entry = BUILT_MODELS._entries.get("demo")
    if entry is None:
        return
    base = tmp_path_factory.getbasetemp().resolve()

    def guarded():
        if base not in cache_dir().resolve().parents:
            raise AssertionError("a test reached the 'demo' model: pass a model explicitly "
                                 "(e.g. smollm2-135m-instruct or a tiny model)")
        if isinstance(entry, str):
            module, _, attr = entry.partition(":")
            return getattr(importlib.import_module(module), attr)()
        return entry()

    monkeypatch.setitem(BUILT_MODELS._entries, "demo", guarded)


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not beside the repository")
    return SHARED_DATA
