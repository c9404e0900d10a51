"""Batched generation: greedy by default, stop tokens from the model, cached on disk.

The released code generated one prompt at a time with a hard-coded ``<|eot_id|>`` EOS
(16 greedy tokens per prompt, paper §3.4.3). Here prompts are sorted by length and decoded in batches by our own
loop, which beat ``model.generate`` on the same batches (``bench/bench_generation.py``):

- prefill (:func:`prefill`): a prefix the whole batch shares (the chat template's system
  turn, the Alpaca preamble) runs once; the rest runs in chunks of similar length, and
  the LM head sees only each prompt's last position;
- decode: one forward per step on a KV cache with room for the whole generation (no
  per-step ``torch.cat`` of the cache), and a sequence that has stopped leaves the batch
  at once (its cache rows are dropped); a batch ends when its last row does.

Greedy outputs equal one-prompt-at-a-time ``model.generate(do_sample=False)`` up to fp32
rounding: batched and unbatched matmuls may differ in the last bits and could flip a
near-tie (none did on the 128 prompts of the bench).

Every finished batch is appended to a JSONL file under ``cache_dir()/generations/``, keyed
by the model's fingerprint, the template, the rendered prompt and the settings, so an
interrupted run resumes where it stopped and a rerun costs nothing.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from ..core.errors import SafetyLayersError
from ..core.models import LoadedModel, cache_dir, load_or_use
from ..core.prompts import Rendered, render, resolve_template
from .cache import cache_kwargs, can_share_prefix, is_buffered, new_cache, output_cache
from .distributed import map_sharded, world

Backend = Literal["hf", "vllm"]
#: Bumped when a change to the decode loop could change outputs, so old cache entries die.
CACHE_VERSION = 1


@dataclass
class GenerationSettings:
    """How to decode. Defaults are greedy: the paper counts refusals on greedy output."""

    max_new_tokens: int = field(default=64, metadata={"help": "most tokens generated per prompt"})
    do_sample: bool = field(default=False, metadata={"help": "sample instead of greedy decoding"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature (sampling only)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus mass kept (sampling only; 1 keeps all)"})
    top_k: int = field(default=0, metadata={"help": "most likely tokens kept (sampling only; 0 keeps all)"})
    seed: int = field(default=0, metadata={"help": "sampling seed; each prompt gets its own stream"})
    batch_size: int | None = field(default=None, metadata={"help": "prompts decoded together (None: 128)"})
    stop_strings: list[str] | None = field(default=None, metadata={"help": "text that ends a completion (excluded)"})

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise SafetyLayersError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise SafetyLayersError(f"temperature must be > 0 when sampling, got {self.temperature}; "
                                    "use do_sample=False for greedy decoding")
        if not 0 < self.top_p <= 1:
            raise SafetyLayersError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SafetyLayersError(f"top_k must be >= 0 (0 keeps all tokens), got {self.top_k}")
        if self.batch_size is not None and self.batch_size < 1:
            raise SafetyLayersError(f"batch_size must be >= 1 or None (auto), got {self.batch_size}")
        if isinstance(self.stop_strings, str):
            raise SafetyLayersError("stop_strings must be a list of strings, got one string; wrap it in a list")
        if self.stop_strings is not None and not all(self.stop_strings):
            raise SafetyLayersError("stop_strings must not contain an empty string")

    def key(self) -> dict:
        """The fields that change outputs (batch size does not; sampling knobs only when sampling)."""
        d = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
             "stop_strings": sorted(self.stop_strings or [])}
        if self.do_sample:
            d.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed)
        return d


@dataclass
class Completion:
    """One prompt's completion.

    ``text`` excludes the stop token or stop string. ``num_tokens`` counts the tokens the
    model generated, the stop token included. ``finished`` is True when the model stopped by
    itself (stop token or stop string), False when it hit ``max_new_tokens``.
    """

    prompt: str
    text: str
    num_tokens: int
    finished: bool
    token_ids: list[int] = field(default_factory=list, repr=False)
    cached: bool = field(default=False, compare=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("cached")
        return d


# --------------------------------------------------------------------------- stop tokens

def _as_ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def stop_token_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """Token ids that end a turn: ``generation_config.eos_token_id`` (int or list), the
    config's and the tokenizer's EOS. Chat models list their end-of-turn token (``<|im_end|>``,
    ``<|eot_id|>``, ``<end_of_turn>``) there; none is assumed.
    """
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        ids += _as_ids(getattr(source, "eos_token_id", None))
    ids += _as_ids(getattr(tokenizer, "eos_token_id", None))
    ids = list(dict.fromkeys(i for i in ids if i is not None and i >= 0))
    if not ids:
        raise SafetyLayersError(
            "the model has no stop token: set model.generation_config.eos_token_id (an id or a list of "
            "ids, e.g. the chat end-of-turn token) or the tokenizer's eos_token")
    return ids


# --------------------------------------------------------------------------- cache

def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class GenerationCache:
    """Append-only JSONL file of completions for one (model fingerprint, settings) pair.

    One line per prompt, written a batch at a time with one ``write``; a line cut short by an
    interrupted run fails to parse and is skipped, so the prompt is simply generated again.
    """

    def __init__(self, root: Path, fingerprint: str, settings_key: dict):
        self.path = Path(root) / fingerprint / f"{_hash(settings_key)[:16]}.jsonl"
        self.entries: dict[str, dict] = {}
        if self.path.is_file():
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                        self.entries[row["key"]] = row
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def _ends_torn(self) -> bool:
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return False
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"

    def add(self, rows: list[dict]) -> None:
        if not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        if self._ends_torn():  # start on a fresh line, or the first new entry is lost with the torn one
            blob = "\n" + blob
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        for r in rows:
            self.entries[r["key"]] = r


def _cache_root(cache: bool | str | Path) -> Path | None:
    if cache is False or cache is None:
        return None
    if cache is True:
        return cache_dir() / "generations"
    return Path(cache)


# --------------------------------------------------------------------------- decoding

def _accepts(model: torch.nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _row_seed(seed: int, key: str) -> int:
    """A sampling seed per prompt, so a prompt's sample does not depend on its batch."""
    return int(hashlib.sha256(f"{seed}\0{key}".encode()).hexdigest()[:15], 16)


def _sample(logits: torch.Tensor, s: GenerationSettings, gens: list[torch.Generator]) -> torch.Tensor:
    """One token per row from temperature / top-k / top-p filtered logits [rows, vocab]."""
    logits = logits.float() / s.temperature
    if s.top_k and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= s.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.cat([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(gens)])


@dataclass
class _Row:
    key: str
    ids: list[int]
    out: list[int] = field(default_factory=list)
    finished: bool = False
    cut: int | None = None  # character offset of a stop string in the decoded text


def _stop_string_hit(tokenizer, row: _Row, stops: list[str]) -> bool:
    text = tokenizer.decode(row.out, skip_special_tokens=True)
    hits = [text.find(s) for s in stops if s in text]
    if hits:
        row.cut = min(hits)
        return True
    return False


#: A common prefix shorter than this is not worth a separate forward pass.
MIN_SHARED_PREFIX = 8


def _common_prefix_len(seqs: list[list[int]]) -> int:
    first, n = seqs[0], min(len(x) for x in seqs)
    for i in range(n):
        t = first[i]
        if any(x[i] != t for x in seqs):
            return i
    return n


def _left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, x in enumerate(seqs):  # left padding: every row's next token lands in the last column
        ids[i, width - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[i, width - len(x):] = 1
    return ids.to(device), mask.to(device)


@dataclass
class Prefill:
    """A batch after its prompts ran: KV cache, next-token logits [batch, vocab], the
    attention mask the cache was built with, and each row's last position id."""

    cache: object
    logits: torch.Tensor
    mask: torch.Tensor
    last_pos: torch.Tensor


#: A prompt joins a prefill chunk while the chunk's padded size stays within this factor of
#: its real token count (so one long prompt does not pad a whole batch to its length).
CHUNK_PAD_SLACK = 1.25
#: A chunk this small is never split for padding: tiny matmuls cost more than the pads.
CHUNK_MIN_TOKENS = 256
#: Most padded tokens in one prefill chunk (bounds activation memory; compute is saturated long before).
CHUNK_MAX_TOKENS = 8192


def _length_chunks(lengths: list[int]) -> list[list[int]]:
    """Row indices grouped, longest first, so each group wastes at most ~25% on padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    chunks, cur, real = [], [], 0
    for i in order:
        padded = (len(cur) + 1) * (lengths[cur[0]] if cur else 0)
        wasteful = padded > CHUNK_PAD_SLACK * (real + lengths[i]) and padded > CHUNK_MIN_TOKENS
        if cur and (wasteful or padded > CHUNK_MAX_TOKENS):
            chunks.append(cur)
            cur, real = [], 0
        cur.append(i)
        real += lengths[i]
    chunks.append(cur)
    return chunks


def prefill(model, seqs: list[list[int]], pad_id: int, *, share_prefix: bool = True,
            use_logits_to_keep: bool | None = None, room: int = 0, keep_cache: bool = True) -> Prefill:
    """Run a batch of token-id prompts and return the logits at each one's next position.

    The LM head is applied to the last position only: through ``logits_to_keep=1`` where the
    model takes it (which keeps any final soft-capping), else by running the base model and
    projecting the last hidden state (``use_logits_to_keep=False`` forces this path).

    Two savings, both exact up to fp32 rounding. Prompts rendered with one template share a
    long prefix (the chat template's system turn, the Alpaca preamble): when the batch
    shares at least ``MIN_SHARED_PREFIX`` tokens, the prefix runs once and its KV cache is
    copied to every row, and the rest of each prompt follows it, left-padded, as
    ``[prefix][pad...][suffix]``; position ids skip the pads, so each row sees the positions
    it would see alone. And the suffixes run in chunks of similar length
    (:func:`_length_chunks`) whose caches are then laid side by side in one left-padded
    cache, so decoding still runs the whole batch at once. ``room``: decode steps to
    preallocate in the cache; ``keep_cache=False`` returns logits only (``cache`` is None).
    """
    device = next(model.parameters()).device
    pass_positions = _accepts(model, "position_ids")
    if use_logits_to_keep is None:
        use_logits_to_keep = _accepts(model, "logits_to_keep")
    n = len(seqs)
    cache = new_cache(model, capacity=max(map(len, seqs)) + room)
    shared = 0
    if share_prefix and n > 1 and pass_positions and can_share_prefix(cache):
        shared = min(_common_prefix_len(seqs), min(len(x) for x in seqs) - 1)  # each row keeps >= 1 token
        if shared < MIN_SHARED_PREFIX:
            shared = 0
    if shared:
        prefix = torch.tensor([seqs[0][:shared]], dtype=torch.long, device=device)
        _forward(model, prefix, torch.ones_like(prefix), torch.arange(shared, device=device)[None], cache,
                 use_logits_to_keep)
    suffixes = [x[shared:] for x in seqs]
    chunks = _length_chunks([len(x) for x in suffixes]) if pass_positions and is_buffered(cache) else [list(range(n))]
    if len(chunks) == 1:
        if shared:
            cache.batch_repeat_interleave(n)
        ids, mask = _left_pad(suffixes, pad_id, device)
        positions = shared + (mask.cumsum(-1) - 1).clamp(min=0)  # real tokens count on from the prefix
        if shared:
            mask = torch.cat([mask.new_ones((n, shared)), mask], dim=-1)
        cache, logits = _forward(model, ids, mask, positions if pass_positions else None, cache, use_logits_to_keep)
        return Prefill(cache if keep_cache else None, logits, mask, positions[:, -1])

    lengths = torch.tensor([len(x) for x in suffixes], device=device)
    total = shared + int(lengths.max())
    logits: list[torch.Tensor | None] = [None] * n
    full = None  # per layer: keys and values of the whole batch [n, heads, total + room, head_dim]
    for idx in chunks:
        sub = new_cache(model, capacity=shared + max(len(suffixes[i]) for i in idx))
        if shared:
            for ls, lp in zip(sub.layers, cache.layers):
                ls.update(lp.keys.expand(len(idx), -1, -1, -1), lp.values.expand(len(idx), -1, -1, -1))
        ids, mask = _left_pad([suffixes[i] for i in idx], pad_id, device)
        positions = shared + (mask.cumsum(-1) - 1).clamp(min=0)
        if shared:
            mask = torch.cat([mask.new_ones((len(idx), shared)), mask], dim=-1)
        sub, lg = _forward(model, ids, mask, positions, sub, use_logits_to_keep)
        for j, i in enumerate(idx):
            logits[i] = lg[j]
        if not keep_cache:
            continue
        if full is None:
            full = [tuple(t.new_zeros((n, t.shape[1], total + room, t.shape[3])) for t in (l.keys, l.values))
                    for l in sub.layers]
        rows, width = torch.tensor(idx, device=device), ids.shape[1]
        for (fk, fv), l in zip(full, sub.layers):  # each chunk's suffix ends at the batch's last column
            fk[rows, :, total - width:total] = l.keys[:, :, shared:]
            fv[rows, :, total - width:total] = l.values[:, :, shared:]
    cols = torch.arange(total, device=device)[None, :]
    mask = ((cols < shared) | (cols >= total - lengths[:, None])).long()
    if keep_cache:
        for l, (fk, fv), lp in zip(cache.layers, full, cache.layers):
            if shared:
                fk[:, :, :shared], fv[:, :, :shared] = lp.keys, lp.values
            l.load(fk, fv, total)
    return Prefill(cache if keep_cache else None, torch.stack(logits), mask, shared + lengths - 1)


def _forward(model, ids, mask, positions, cache, use_logits_to_keep: bool):
    """One forward on the cache; returns (cache, logits of the last column [batch, vocab])."""
    kwargs = dict(attention_mask=mask, **cache_kwargs(cache))
    if positions is not None:
        kwargs["position_ids"] = positions
    if use_logits_to_keep:
        out = model(input_ids=ids, logits_to_keep=1, **kwargs)
        return output_cache(out), out.logits[:, -1, :]
    out = model.base_model(input_ids=ids, **kwargs)
    return output_cache(out), model.get_output_embeddings()(out.last_hidden_state[:, -1, :])


@torch.inference_mode()
def _decode_batch(model, tokenizer, rows: list[_Row], s: GenerationSettings, stop_ids: list[int],
                  pad_id: int, pass_positions: bool) -> None:
    """Generate for one batch of rows in place: prefill once, then one token per step."""
    device = next(model.parameters()).device
    gens = None
    if s.do_sample:
        gens = [torch.Generator(device=device).manual_seed(_row_seed(s.seed, r.key)) for r in rows]
    stop = torch.tensor(stop_ids, device=device)
    pre = prefill(model, [r.ids for r in rows], pad_id, room=s.max_new_tokens)
    cache, logits, mask, last_pos = pre.cache, pre.logits, pre.mask, pre.last_pos
    prunable = hasattr(cache, "batch_select_indices")
    active = list(rows)
    for step in range(s.max_new_tokens):
        nxt = _sample(logits, s, gens) if s.do_sample else logits.argmax(-1)
        is_stop = torch.isin(nxt, stop).tolist()
        keep = []
        for i, (r, t, hit) in enumerate(zip(active, nxt.tolist(), is_stop)):
            if r.finished:  # only when the cache cannot drop rows: its outputs are ignored
                continue
            r.out.append(t)
            if hit or (s.stop_strings and _stop_string_hit(tokenizer, r, s.stop_strings)):
                r.finished = True
            else:
                keep.append(i)
        if not keep or step == s.max_new_tokens - 1:
            return
        if prunable and len(keep) < len(active):  # drop finished rows from the batch and the KV cache
            idx = torch.tensor(keep, device=device)
            cache.batch_select_indices(idx)
            mask, last_pos, nxt = mask[idx], last_pos[idx], nxt[idx]
            active = [active[i] for i in keep]
            if gens is not None:
                gens = [gens[i] for i in keep]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=-1)
        last_pos = last_pos + 1
        kwargs = dict(attention_mask=mask, **cache_kwargs(cache))
        if pass_positions:
            kwargs["position_ids"] = last_pos[:, None]
        out = model(input_ids=nxt[:, None], **kwargs)
        cache, logits = output_cache(out), out.logits[:, -1, :]


def _finish(tokenizer, r: _Row, prompt: str, stop_ids: list[int]) -> Completion:
    toks = r.out
    body = toks[:-1] if toks and toks[-1] in stop_ids else toks
    text = tokenizer.decode(body, skip_special_tokens=True)
    if r.cut is not None:
        text = text[:r.cut]
    return Completion(prompt=prompt, text=text, num_tokens=len(toks), finished=r.finished, token_ids=list(toks))


def default_batch_size(model: torch.nn.Module) -> int:
    """Rows decoded together. 128: on SmolLM2-135M (2 CPU cores, 128 prompts x 32 tokens)
    it ran at 163-174 tok/s against 144-157 at 64 and 113 at 32; the prefill is chunked by
    length, so a large batch costs no extra padding, and on a GPU larger is only faster."""
    return 128


# --------------------------------------------------------------------------- public API

def generate(model, prompts: list[str], settings: GenerationSettings | None = None, *,
             template: str = "chat", cache: bool | str | Path = True, progress: bool = True,
             backend: Backend = "hf", system: str | None = None,
             reply_start: str | list[str] | None = None) -> list[Completion]:
    """Complete every prompt; returns one :class:`Completion` per prompt, in input order.

    ``model`` is a :class:`LoadedModel` (or anything ``load_or_use`` accepts). ``cache``:
    True stores completions under ``cache_dir()/generations``, a path stores them there,
    False turns caching off. Duplicate prompts are generated once. Sampling
    (``do_sample=True``) gives each prompt its own random stream seeded from ``seed`` and
    the prompt, so results do not depend on batch size or order. ``reply_start`` (one string,
    or one per prompt) begins the reply: the model continues it, and the completion's text is
    the continuation only.
    """
    lm: LoadedModel = load_or_use(model)
    s = settings or GenerationSettings()
    if isinstance(prompts, str):
        raise SafetyLayersError("prompts must be a list of strings, got one string; wrap it in a list")
    if backend not in ("hf", "vllm"):
        raise SafetyLayersError(f"unknown backend {backend!r}: use 'hf' or 'vllm'")
    if not prompts:
        return []
    tok = lm.tokenizer
    template = resolve_template(tok, template)
    stop_ids = stop_token_ids(lm.model, tok)

    rendered = [render(tok, p, template, system=system) for p in prompts]
    if reply_start is not None:
        fills = [reply_start] * len(prompts) if isinstance(reply_start, str) else list(reply_start)
        if len(fills) != len(prompts):
            raise SafetyLayersError(f"reply_start needs one string per prompt, got {len(fills)} for {len(prompts)}")
        rendered = [Rendered(r.text + f, r.add_special_tokens) for r, f in zip(rendered, fills)]
    ids = [tok(r.text, add_special_tokens=r.add_special_tokens)["input_ids"] for r in rendered]
    keys = [_hash(CACHE_VERSION, template, r.text, i) for r, i in zip(rendered, ids)]

    root = _cache_root(cache)
    store = None
    if root is not None:
        store = GenerationCache(root, lm.fingerprint(), {**s.key(), "stop_ids": stop_ids, "backend": backend})
    done: dict[str, Completion] = {}
    todo: dict[str, _Row] = {}
    for k, p, i in zip(keys, prompts, ids):
        hit = store.get(k) if store else None
        if hit is not None:
            done[k] = Completion(prompt=p, text=hit["text"], num_tokens=hit["num_tokens"],
                                 finished=hit["finished"], token_ids=hit["token_ids"], cached=True)
        elif k not in todo:
            todo[k] = _Row(key=k, ids=i)
    first_prompt = dict(zip(keys, prompts))

    comps = generate_vllm(lm, [r.ids for r in todo.values()], s, stop_ids) if todo and backend == "vllm" else None
    if comps is not None:
        rows = list(todo.values())
        for r, c in zip(rows, comps):
            c.prompt = first_prompt[r.key]
            done[r.key] = c
        if store:
            store.add([{"key": r.key, **done[r.key].to_dict()} for r in rows])
    elif todo:
        _run_hf(lm, list(todo.values()), s, stop_ids, first_prompt, done, store, progress, len(done))

    return [_with_prompt(done[k], p) for k, p in zip(keys, prompts)]


def generate_all(model: LoadedModel, prompts: list[str], settings: GenerationSettings, *, template: str = "chat",
                 cache: bool = True, progress: bool = True, backend: Backend = "hf") -> list[Completion]:
    """:func:`generate` on this process's shard of ``prompts``, gathered in input order on every rank."""
    w = world()
    return map_sharded(lambda shard: generate(model, shard, settings, template=template, cache=cache,
                                              progress=progress and w.is_main, backend=backend), prompts, w)


def _with_prompt(c: Completion, prompt: str) -> Completion:
    if c.prompt == prompt:
        return c
    return Completion(prompt, c.text, c.num_tokens, c.finished, c.token_ids, c.cached)


def _run_hf(lm: LoadedModel, rows: list[_Row], s: GenerationSettings, stop_ids: list[int],
            first_prompt: dict, done: dict, store: GenerationCache | None, progress: bool, n_cached: int):
    from tqdm.auto import tqdm

    model, tok = lm.model, lm.tokenizer
    was_training = model.training
    model.eval()  # no dropout while generating; the caller's mode is restored below
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else stop_ids[0]
    pass_positions = _accepts(model, "position_ids")
    bs = s.batch_size or default_batch_size(model)
    # Longest first: similar lengths share a batch (little padding), and memory peaks early.
    order = sorted(rows, key=lambda r: -len(r.ids))
    bar = tqdm(total=n_cached + len(rows), initial=n_cached, desc="generating", unit="prompt",
               disable=not progress, leave=False, dynamic_ncols=True)
    try:
        for start in range(0, len(order), bs):
            batch = order[start:start + bs]
            _decode_batch(model, tok, batch, s, stop_ids, pad_id, pass_positions)
            finished = []
            for r in batch:
                done[r.key] = _finish(tok, r, first_prompt[r.key], stop_ids)
                finished.append({"key": r.key, **done[r.key].to_dict()})
            if store:
                store.add(finished)
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)


def generate_vllm(lm: LoadedModel, prompt_ids: list[list[int]], s: GenerationSettings,
                  stop_ids: list[int]) -> list[Completion] | None:
    """Tokenized prompts through vLLM (:mod:`.vllm_backend`: one engine per model, reused; an
    adapter folder served through vLLM's LoRA support); None, with the reason printed, when vLLM
    cannot serve this model and the caller falls back to HF."""
    from .vllm_backend import vllm_outputs

    outs = vllm_outputs(lm, prompt_ids, s, stop_ids)
    if outs is None:
        return None
    return [Completion(prompt="", text=c.text, num_tokens=len(c.token_ids), finished=c.finish_reason == "stop",
                       token_ids=list(c.token_ids)) for c in outs]
