"""Tiny seeded random causal LMs with the real SmolLM2 tokenizer, for fast logic tests.

The tokenizer is the bundled model's (49,152 tokens, with a chat template), so prompts
tokenize as they do in real runs; the models have hidden size 32 and 2 layers, so a
forward pass takes milliseconds.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from safety_layers.core.models import DEFAULT_MODEL, LoadedModel, cache_dir, find_blocks

VOCAB = 49152


@lru_cache(maxsize=1)
def smollm2_tokenizer():
    """The bundled model's tokenizer (converted from its GGUF on first use)."""
    from transformers import AutoTokenizer

    folder = cache_dir() / "models" / DEFAULT_MODEL
    if not (folder / "tokenizer.json").is_file():
        from safety_layers.core.models import load_model
        return load_model().tokenizer
    tok = AutoTokenizer.from_pretrained(str(folder))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def tiny_config(arch: str = "llama", **overrides):
    """Config of a 2-layer, hidden-32 model of the given architecture with the SmolLM2 vocab."""
    from transformers import GPT2Config, LlamaConfig, Phi3Config

    if arch == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          bos_token_id=1, eos_token_id=2, pad_token_id=2)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    elif arch == "phi3":
        cfg = Phi3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    else:
        raise ValueError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(arch: str = "llama", seed: int = 0, **overrides) -> LoadedModel:
    """A seeded random model of ``arch`` wrapped as a LoadedModel with the SmolLM2 tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32)
    model.eval()
    return LoadedModel(model=model, tokenizer=smollm2_tokenizer(), name=f"tiny-{arch}-{seed}",
                       source="memory", blocks=find_blocks(model))


class ForwardCounter:
    """Counts forward calls of a model and records each call's input shape (a context manager)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.shapes: list[tuple[int, ...]] = []

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.shapes.append(tuple(ids.shape) if ids is not None else ())

    @property
    def batch_sizes(self) -> list[int]:
        return [s[0] if s else -1 for s in self.shapes]

    @property
    def decode_batch_sizes(self) -> list[int]:
        """Batch sizes of the one-token (decode step) calls."""
        return [s[0] for s in self.shapes if len(s) == 2 and s[1] == 1]

    def __enter__(self):
        self._handle = self.model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._handle.remove()

    @property
    def calls(self) -> int:
        return len(self.batch_sizes)


def tiny_lm_eval_task(folder, name: str = "tiny_mc", rows: int = 6) -> str:
    """A local lm-eval multiple-choice task (``name.yaml`` + its JSONL) in ``folder``, for offline tests."""
    import json
    from pathlib import Path

    folder = Path(folder)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} plus {i}?", "choices": [str(2 * i), str(2 * i + 1)],
                                        "label": 0}) + "\n" for i in range(rows)))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return name
