"""The vLLM backend builds one engine per model and reuses it; adapter folders go through vLLM's
LoRA support or fall back to HF with the reason printed. vLLM is not installable here: a fake
``vllm`` module in sys.modules stands in and records what the package asks of it."""

from __future__ import annotations

import json
import sys
import types
from types import SimpleNamespace

import pytest

from conftest import tiny_model
from safety_layers.core.models import LoadedModel
from safety_layers.engine import vllm_backend
from safety_layers.engine.generation import GenerationSettings, generate


def fake_vllm(monkeypatch, lora: bool = True) -> SimpleNamespace:
    log = SimpleNamespace(engines=[], calls=[])

    class LLM:
        def __init__(self, **kwargs):
            log.engines.append(kwargs)

        def generate(self, prompts, params, use_tqdm=False, lora_request=None):
            log.calls.append({"engine": len(log.engines), "n": len(prompts), "lora": lora_request})
            out = SimpleNamespace(text="ok", token_ids=[5, 6], finish_reason="stop")
            return [SimpleNamespace(outputs=[out]) for _ in prompts]

    mod = types.ModuleType("vllm")
    mod.LLM = LLM
    mod.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", mod)
    if lora:
        req = types.ModuleType("vllm.lora.request")
        req.LoRARequest = lambda name, i, path: SimpleNamespace(name=name, id=i, path=path)
        monkeypatch.setitem(sys.modules, "vllm.lora", types.ModuleType("vllm.lora"))
        monkeypatch.setitem(sys.modules, "vllm.lora.request", req)
    else:
        monkeypatch.setitem(sys.modules, "vllm.lora", None)         # import fails
        monkeypatch.setitem(sys.modules, "vllm.lora.request", None)
    monkeypatch.setattr(vllm_backend, "_ENGINES", {})
    return log


def saved(tmp_path, name="m", seed=0) -> LoadedModel:
    lm = tiny_model("llama", seed=seed)
    folder = tmp_path / name
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return LoadedModel(lm.model, lm.tokenizer, name, str(folder), lm.blocks)


def test_one_engine_per_model_reused_across_calls(monkeypatch, tmp_path):
    log = fake_vllm(monkeypatch)
    a, b = saved(tmp_path, "a"), saved(tmp_path, "b", seed=1)
    s = GenerationSettings(max_new_tokens=2)
    for prompts in (["Hi"], ["Hello", "How are you"], ["Third set"]):
        comps = generate(a, prompts, s, cache=False, backend="vllm", progress=False)
        assert [c.text for c in comps] == ["ok"] * len(prompts)
    assert len(log.engines) == 1 and [c["engine"] for c in log.calls] == [1, 1, 1]
    assert log.engines[0]["model"] == a.source and log.engines[0]["dtype"] == "float32"
    assert "enable_lora" not in log.engines[0]
    generate(b, ["Hi"], s, cache=False, backend="vllm", progress=False)   # another model: its own engine
    assert len(log.engines) == 2 and len(vllm_backend._ENGINES) == 1       # the first one was released
    generate(b, ["Again"], s, cache=False, backend="vllm", progress=False)
    assert len(log.engines) == 2


def _adapter(tmp_path, base: str):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base, "r": 8}))
    return folder


def test_an_adapter_goes_through_vllm_lora(monkeypatch, tmp_path):
    log = fake_vllm(monkeypatch)
    base = saved(tmp_path, "base")
    tuned = LoadedModel(base.model, base.tokenizer, "base+adapter", str(_adapter(tmp_path, base.source)), base.blocks)
    s = GenerationSettings(max_new_tokens=2)
    generate(tuned, ["Hi"], s, cache=False, backend="vllm", progress=False)
    generate(tuned, ["Hi there"], s, cache=False, backend="vllm", progress=False)
    assert len(log.engines) == 1
    assert log.engines[0]["model"] == base.source and log.engines[0]["enable_lora"] and log.engines[0]["max_lora_rank"] == 8
    assert all(c["lora"].path == tuned.source for c in log.calls) and log.calls[0]["lora"].id == log.calls[1]["lora"].id


def test_without_vllm_lora_an_adapter_falls_back_to_hf(monkeypatch, tmp_path, capsys):
    log = fake_vllm(monkeypatch, lora=False)
    base = saved(tmp_path, "base")
    tuned = LoadedModel(base.model, base.tokenizer, "base+adapter", str(_adapter(tmp_path, base.source)), base.blocks)
    comps = generate(tuned, ["Hi"], GenerationSettings(max_new_tokens=3), cache=False, backend="vllm", progress=False)
    assert log.engines == [] and len(comps) == 1 and comps[0].num_tokens >= 1      # HF generated it
    assert "generates with HF instead of vLLM" in capsys.readouterr().out


def test_on_a_gpu_vllm_takes_only_the_free_share(monkeypatch, tmp_path):
    import torch

    log = fake_vllm(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (60 * 2**30, 140 * 2**30))
    vllm_backend.vllm_engine(saved(tmp_path).source, "bfloat16")
    assert log.engines[0]["gpu_memory_utilization"] == pytest.approx(60 / 140 - 0.05, abs=1e-3)
