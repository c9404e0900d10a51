"""Training sequences for every trainer of the package: token ids, response-only labels and
per-token loss weights, and the collator that pads them into batches.

Fine-tuning (instruction rows) and alignment (prompt / reply examples) each turn their data
into token ids their own way, then share :func:`encode_ids` (the label mask, truncation and
the too-long rule), :class:`Encoded` and :class:`PadCollator`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.errors import SafetyLayersError

IGNORE_INDEX = -100   # label value the loss skips


@dataclass
class Encoded:
    """One training sequence. ``labels`` is -100 where no loss is taken (prompt, context)."""

    input_ids: list[int]
    labels: list[int]
    weight: float = 1.0           # loss weight of each of its labelled tokens
    negative: bool = False        # the labels are an opening to make unlikely, not a reply to learn
    extra: list["Encoded"] = field(default_factory=list)   # rows batched with it (its negative openings)


def encode_ids(prompt_ids: list[int], response_ids: list[int], max_length: int, *, min_room: int = 1,
               train_on_inputs: bool = False) -> Encoded | None:
    """Prompt then response, cut to ``max_length`` tokens by shortening the response.

    None when the prompt leaves fewer than ``min(min_room, len(response_ids))`` tokens for
    the response: nothing (or too little) would be left to learn. Labels cover the response,
    or everything with ``train_on_inputs``.
    """
    room = max_length - len(prompt_ids)
    if room < min(min_room, len(response_ids)):
        return None
    response_ids = response_ids[:room]
    ids = prompt_ids + response_ids
    labels = list(ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids) + response_ids
    return Encoded(ids, labels)


@dataclass
class TokenizedData:
    examples: list[Encoded]
    rows: int
    dropped_too_long: int          # prompt alone fills max_length: no response token left to learn
    truncated: int
    tokens: int
    template: str


def tokenize_rows(rows: list[dict], tokenizer, template: str = "chat", max_length: int = 256,
                  train_on_inputs: bool = False) -> TokenizedData:
    """Token ids and labels of each instruction row; the prompt's labels are -100 unless ``train_on_inputs``.

    Prompt and response are tokenized apart and joined, so the mask boundary is exact,
    and every example ends with the tokenizer's own EOS id.
    """
    from ..core.prompts import render, resolve_template

    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise SafetyLayersError("the tokenizer has no EOS token: set tokenizer.eos_token before fine-tuning")
    eos = tokenizer.eos_token or ""
    template = resolve_template(tokenizer, template)
    out, too_long, truncated, tokens = [], 0, 0, 0
    for r in rows:
        prompt = render(tokenizer, r["instruction"], template, input=r.get("input") or None)
        full = render(tokenizer, r["instruction"], template, input=r.get("input") or None, response=r["output"])
        response = full.text[len(prompt.text):] if full.text.startswith(prompt.text) else r["output"] + eos
        if eos and response.endswith(eos):
            response = response[:-len(eos)]
        p_ids = tokenizer(prompt.text, add_special_tokens=prompt.add_special_tokens)["input_ids"]
        if prompt.add_special_tokens and p_ids and p_ids[-1] == eos_id:
            p_ids = p_ids[:-1]        # a tokenizer configured to append EOS must not end the prompt with it
        r_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos_id]
        truncated += len(p_ids) + len(r_ids) > max_length
        enc = encode_ids(p_ids, r_ids, max_length, train_on_inputs=train_on_inputs)
        if enc is None:
            too_long += 1
            continue
        tokens += len(enc.input_ids)
        out.append(enc)
    return TokenizedData(out, len(rows), too_long, truncated, tokens, template)


class PadCollator:
    """Right-pads a batch of :class:`Encoded` rows (and the extra rows each carries) into tensors.

    ``multiple`` rounds the width up (8, as the paper's DataCollatorForSeq2Seq; 1 pads to the
    longest row). The batch gets per-token loss ``weights`` [batch, width] when a row is
    weighted or ``opening = (k, w)`` weighs each reply's first k labels by w, and a
    ``negative`` row flag when a row is an opening to make unlikely.
    """

    def __init__(self, pad_id: int, multiple: int = 8, opening: tuple[int, float] = (0, 1.0)):
        self.pad_id, self.multiple, self.opening = pad_id, multiple, opening

    def __call__(self, batch: list[Encoded]) -> dict[str, torch.Tensor]:
        rows = list(batch) + [x for b in batch for x in b.extra]
        width = max(len(e.input_ids) for e in rows)
        width = -(-width // self.multiple) * self.multiple
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, e in enumerate(rows):
            n = len(e.input_ids)
            ids[i, :n] = torch.tensor(e.input_ids)
            labels[i, :n] = torch.tensor(e.labels)
            mask[i, :n] = 1
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if any(e.negative for e in rows):
            out["negative"] = torch.tensor([e.negative for e in rows])
        k, w = self.opening
        opening_on = k > 0 and w != 1.0
        if opening_on or any(e.weight != 1.0 for e in rows):
            weights = torch.tensor([e.weight for e in rows], dtype=torch.float32)[:, None].expand(-1, width)
            if opening_on:
                labelled = labels != IGNORE_INDEX
                weights = weights * torch.where(labelled & (labelled.cumsum(1) <= k), w, 1.0)
            out["weights"] = weights
        return out
