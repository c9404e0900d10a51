"""vLLM as a generation backend: one engine per model, built on first use and reused.

vLLM loads weights from a folder, so it sees what is saved, not edits made in memory. A folder
holding a PEFT adapter is served as its base model plus the adapter (vLLM's LoRA support);
when that is impossible the caller falls back to HF generation and the reason is printed.
Nothing here imports vllm until a generation asks for it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.errors import SafetyLayersError

#: the vLLM engine by (model folder, dtype, LoRA rank): built once per model and reused by every call
_ENGINES: dict[tuple, object] = {}


def _memory_share() -> float | None:
    """The share of the GPU vLLM may take: what is free now (an HF copy of the model may already
    sit there) less a margin, instead of vLLM's default 0.9 of the whole card."""
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return round(max(0.1, min(0.9, free / total - 0.05)), 3)


def vllm_engine(source: str, dtype: str = "auto", lora_rank: int | None = None):
    """The vLLM engine of the model folder ``source``, built on first use and reused while the
    calls stay on this model (dtype, LoRA rank), so evaluating many prompt sets loads the weights
    once. One engine at a time: another model's engine is released first (GPU memory)."""
    key = (str(Path(source).resolve()), dtype, lora_rank)
    if key not in _ENGINES:
        from vllm import LLM

        if _ENGINES:
            release_vllm_engines()
        kwargs = {"model": source, "tokenizer": source, "dtype": dtype, "seed": 0}
        if lora_rank:
            kwargs.update(enable_lora=True, max_lora_rank=lora_rank, max_loras=1)
        share = _memory_share()
        if share is not None:
            kwargs["gpu_memory_utilization"] = share
        _ENGINES[key] = LLM(**kwargs)
    return _ENGINES[key]


def release_vllm_engines() -> None:
    """Drop the cached engines (and their GPU memory), e.g. between an experiment's models."""
    import gc

    _ENGINES.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def vllm_target(source: str) -> tuple[str, str | None, int | None, str | None]:
    """(base model folder, adapter folder, LoRA rank, why vLLM cannot serve it) for a model folder."""
    folder = Path(source)
    adapter = folder / "adapter_config.json"
    if not adapter.is_file():
        return str(folder), None, None, None
    conf = json.loads(adapter.read_text(encoding="utf-8"))
    base = conf.get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        return "", None, None, f"the adapter's base model {base!r} is not a local folder vLLM can load"
    try:
        import vllm.lora.request  # noqa: F401
    except ImportError:
        return "", None, None, "this vLLM has no LoRA support (vllm.lora)"
    return base, str(folder), int(conf.get("r") or 16), None


def vllm_outputs(lm, prompt_ids: list[list[int]], s, stop_ids: list[int]) -> list | None:
    """vLLM's first output per prompt (``text``, ``token_ids``, ``finish_reason``) for the token
    ids ``prompt_ids`` under the generation settings ``s``; None when vLLM cannot serve ``lm``
    (the reason is printed). Token ids, not text, so vLLM cannot add a second BOS."""
    try:
        from vllm import SamplingParams
    except ImportError:
        raise SafetyLayersError("vLLM is not installed: pip install vllm (GPU only) or use --backend hf") from None
    if not Path(lm.source).is_dir():
        raise SafetyLayersError(f"vLLM loads models from a folder, but this one came from {lm.source!r}: "
                                "save it with save_model() and load that folder, or use --backend hf")
    base, adapter, rank, why = vllm_target(lm.source)
    if why:
        print(f"note: {lm.name} generates with HF instead of vLLM: {why}")
        return None
    llm = vllm_engine(base, str(next(lm.model.parameters()).dtype).removeprefix("torch."), rank)
    params = SamplingParams(
        max_tokens=s.max_new_tokens, temperature=s.temperature if s.do_sample else 0.0,
        top_p=s.top_p if s.do_sample else 1.0, top_k=(s.top_k or -1) if s.do_sample else -1,
        seed=s.seed if s.do_sample else None, stop=s.stop_strings, stop_token_ids=stop_ids,
        skip_special_tokens=True)
    extra = {}
    if adapter:
        from vllm.lora.request import LoRARequest

        # one id per adapter folder: vLLM caches adapters by id
        extra["lora_request"] = LoRARequest(Path(adapter).name, _adapter_id(adapter), adapter)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False, **extra)
    return [o.outputs[0] for o in outs]


_ADAPTER_IDS: dict[str, int] = {}


def _adapter_id(folder: str) -> int:
    return _ADAPTER_IDS.setdefault(str(Path(folder).resolve()), len(_ADAPTER_IDS) + 1)
