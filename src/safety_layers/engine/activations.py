"""Last-token hidden states of every decoder block in the prefill pass.

For prompt ``p`` and block ``i`` (0-based) we keep the block's output at the last prompt
token, ``blocks.{i}.resid_post[-1]``: the vector the paper compares (paper §3.2). The
embedding output is not a layer. With ``final_norm=True`` (the default, as in the paper's
code, which reads ``output_hidden_states``) the last block's vector has the model's final
norm applied, because that is what transformers returns as the last hidden state.

Why it is fast: the token prefix every prompt shares (the chat template's system turn, about
half of a short prompt's tokens) runs once and its keys and values are reused by every batch,
so only the tokens that differ are computed (the prefix's keys and values are read in place,
broadcast to each batch, never copied per row); prompts are grouped by length into batches
within a token budget (by default one length per batch: no padding, so attention sums in
the order a one-prompt forward does; mixed lengths get pads on the right, where causal
attention keeps every real token from seeing them, so no mask or position shift is
needed); a hook on each block
keeps only the last real position (memory per prompt is O(layers x hidden), not
O(sequence)); the forward pass is cut off after the last block asked for, so the LM head
and later blocks never run.

Exactness (``bench/bench_activations.py``, SmolLM2, fp32 CPU): with every token computed the
vectors are bitwise those of one prompt at a time. With the prefix shared they differ in the
last bits (2.4e-4 at most on values up to 606), because the fused SDPA attention kernel
blocks queries and keys by length, so the prefix alone gives slightly different keys than the
prefix inside a whole prompt; under eager attention both paths agree bitwise, and the
one-prompt forward itself moves by as much between the two kernels.
Results are cached on disk per (model fingerprint, rendered prompt, norm choice).
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..core.errors import SafetyLayersError
from ..core.models import LoadedModel, cache_dir
from ..core.prompts import render
from .cache import cache_kwargs, freeze_prefix, new_cache


class _Stop(Exception):
    """Raised by the hook on the last wanted block to cut the forward pass short."""


def _cache_path(root: Path, fp: str, text: str, final_norm: bool) -> Path:
    key = hashlib.sha256(f"{fp}\0{int(final_norm)}\0{text}".encode()).hexdigest()
    return root / fp / key[:2] / f"{key}.safetensors"


def _batches(lengths: list[int], max_batch_tokens: int, max_batch_size: int, equal: bool = False):
    """Index lists, longest prompts first, each batch's padded size within the budget;
    with ``equal`` a batch holds prompts of one length only (no padding)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    for i in order:
        width = lengths[batch[0]] if batch else lengths[i]
        if batch and ((len(batch) + 1) * width > max_batch_tokens or len(batch) >= max_batch_size
                      or (equal and lengths[i] != width)):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def common_prefix(ids: list[list[int]], min_tokens: int = 8) -> int:
    """Length of the token run every prompt starts with, leaving each at least one token of
    its own (the last token's states are the result). 0 when shorter than ``min_tokens``."""
    n = min(len(x) for x in ids) - 1
    first = ids[0]
    for x in ids[1:]:
        k = 0
        while k < n and x[k] == first[k]:
            k += 1
        n = k
    return n if n >= min_tokens else 0


def _run_until(lm: LoadedModel, input_ids: torch.Tensor, upto: int, hook_for=None, **kwargs) -> None:
    """Run the model on ``input_ids`` and stop right after block ``upto``."""
    def stop(_module, _inputs, _output):
        raise _Stop

    blocks = lm.blocks.layers
    handles = [blocks[i].register_forward_hook(hook_for(i)) for i in range(upto + 1)] if hook_for else []
    handles.append(blocks[upto].register_forward_hook(stop))
    try:
        lm.model(input_ids=input_ids, **kwargs)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def _prefix_cache(lm: LoadedModel, prefix: list[int], upto: int):
    """Keys and values of blocks 0..upto for ``prefix`` (one row), or None if the model has no cache."""
    cache = new_cache(lm.model)
    if cache is None:
        return None
    device = next(lm.model.parameters()).device
    _run_until(lm, torch.tensor([prefix], device=device), upto, **cache_kwargs(cache))
    freeze_prefix(cache, upto)  # else (e.g. sliding-window layers) each batch gets a grown copy
    return cache


@torch.inference_mode()
def _forward_last(lm: LoadedModel, ids: list[list[int]], upto: int, final_norm: bool,
                  prefix=None) -> torch.Tensor:
    """[batch, upto+1, hidden] float32: last-real-token outputs of blocks 0..upto.

    With ``prefix`` (a cache from :func:`_prefix_cache`) ``ids`` are the tokens after it."""
    blocks = lm.blocks
    device = next(lm.model.parameters()).device
    lengths = torch.tensor([len(x) for x in ids], device=device)
    width = int(lengths.max())
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long, device=device)
    for r, x in enumerate(ids):
        input_ids[r, : len(x)] = torch.tensor(x, device=device)
    rows, last = torch.arange(len(ids), device=device), lengths - 1
    captured: list[torch.Tensor | None] = [None] * (upto + 1)

    def hook_for(i):
        def hook(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            # fp32 copies on one device (blocks may sit on several GPUs under a device map)
            captured[i] = hidden[rows, last].to(device=device, dtype=torch.float32)
        return hook

    kwargs = {"use_cache": False}
    if prefix is not None:
        cache = prefix
        if not getattr(prefix, "frozen", False):     # e.g. sliding-window layers: a grown copy per batch
            cache = copy.deepcopy(prefix)
            cache.batch_repeat_interleave(len(ids))
        kwargs = cache_kwargs(cache)
    # Right padding + causal attention: real tokens never see the pads, so no mask.
    _run_until(lm, input_ids, upto, hook_for, **kwargs)
    out = torch.stack(captured, dim=1)
    if final_norm and upto == len(blocks) - 1 and blocks.final_norm is not None:
        norm = next(blocks.final_norm.parameters())
        out[:, -1] = blocks.final_norm(out[:, -1].to(norm.device, norm.dtype)).to(device, torch.float32)
    return out


def last_token_states(model: LoadedModel, prompts: list[str], template: str = "chat", *,
                      layers: list[int] | None = None, final_norm: bool = True,
                      max_batch_tokens: int = 4096, max_batch_size: int = 64,
                      cache: bool | str | Path = True, progress: bool = True,
                      desc: str = "hidden states", share_prefix: bool = True,
                      exact: bool = True) -> torch.Tensor:
    """Hidden states ``[prompt, layer, hidden]`` (float32) of the last prompt token.

    ``layers`` (0-based) selects blocks; default all. Only blocks up to the highest one
    asked for are run. ``cache`` may be False, True (user cache folder) or a folder.
    ``share_prefix`` computes the token prefix all prompts share once (same vectors up to
    float rounding; off, every prompt runs from its first token as the released code does).
    ``exact`` batches only prompts of one token length, so no padding changes the order in
    which attention sums (with ``share_prefix=False`` on SmolLM2: bitwise the vectors of one
    prompt at a time, at the same speed). False packs mixed lengths with right padding:
    fewer, larger batches, differences in the last bits.
    """
    if not prompts:
        raise SafetyLayersError("no prompts given: a prompt set needs at least one prompt")
    n_layers = len(model.blocks)
    layers = list(range(n_layers)) if layers is None else list(layers)
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise SafetyLayersError(
            f"layer {bad[0]} is out of range: the model has {n_layers} decoder layers, numbered 0-{n_layers - 1}")
    upto = max(layers)
    tok = model.tokenizer
    rendered = [render(tok, p, template) for p in prompts]
    root = None
    if cache:
        root = Path(cache) if not isinstance(cache, bool) else cache_dir() / "activations"
        fp = model.fingerprint()
    hidden = model.model.config.hidden_size if hasattr(model.model.config, "hidden_size") else None
    result: list[torch.Tensor | None] = [None] * len(prompts)
    todo = []
    for i, r in enumerate(rendered):
        if root is not None:
            path = _cache_path(root, fp, r.text, final_norm)
            if path.is_file():
                h = load_file(str(path))["h"]
                if h.shape[0] > upto:
                    result[i] = h
                    continue
        todo.append(i)
    if todo:
        ids = [tok(rendered[i].text, add_special_tokens=rendered[i].add_special_tokens)["input_ids"] for i in todo]
        # Cache entries always hold every block, so any later subset is a hit.
        run_upto = n_layers - 1 if root is not None else upto
        n_prefix = common_prefix(ids) if share_prefix else 0
        prefix = _prefix_cache(model, ids[0][:n_prefix], run_upto) if n_prefix else None
        if prefix is None:
            n_prefix = 0
        ids = [x[n_prefix:] for x in ids]
        bar = tqdm(total=len(todo), desc=desc, unit="prompt", disable=not progress, leave=False)
        for batch in _batches([len(x) for x in ids], max_batch_tokens, max_batch_size, exact):
            out = _forward_last(model, [ids[j] for j in batch], run_upto, final_norm, prefix).cpu()
            for row, j in enumerate(batch):
                i = todo[j]
                result[i] = out[row].clone()
                if root is not None:
                    path = _cache_path(root, fp, rendered[i].text, final_norm)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(f".tmp{os.getpid()}")
                    save_file({"h": result[i]}, str(tmp))
                    os.replace(tmp, path)
            bar.update(len(batch))
        bar.close()
    stacked = torch.stack([r[: upto + 1] for r in result])
    if hidden is not None and stacked.shape[-1] != hidden:
        raise SafetyLayersError(f"cached hidden states have size {stacked.shape[-1]}, the model {hidden}: clear {root}")
    return stacked[:, layers]
