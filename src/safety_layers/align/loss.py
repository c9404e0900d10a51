"""The alignment loss: the mean cross-entropy of the reply tokens, weighted per token, plus an
optional unlikelihood term, computed with the LM head only where a label is.

The loss covers the response tokens only, optionally weighted per kind (``benign_weight``)
and on each reply's first tokens (``opening_weight``), where a greedy reply is decided to
be a refusal or an answer; the weights arrive per token with the batch
(:class:`~safety_layers.finetune.data.PadCollator`). ``unlikelihood_weight`` adds, per
training prompt, the unlikelihood (Welleck et al. 2019) of an opening of the other kind:
-log(1 - P(opening)) for a refusal's opening after a benign prompt and a compliant one
after a malicious prompt.
"""

from __future__ import annotations

import torch

from ..engine.generation import cache_kwargs, output_cache
from ..finetune.data import IGNORE_INDEX, Encoded


def response_loss(model, batch: dict[str, torch.Tensor], prefix: torch.Tensor | None = None,
                  unlikelihood_weight: float = 1.0, *, wrapped: bool = False) -> torch.Tensor:
    """Mean cross-entropy over the labelled (response) tokens, as ``model(**batch).loss``.

    Rows flagged ``negative`` carry an opening to avoid instead: each adds
    ``unlikelihood_weight`` x -log(1 - P(opening | prompt)), averaged over those rows.

    The LM head runs only where a label is: on a small model with a large vocabulary
    (SmolLM2: 576 -> 49,152) the head over every position is a fifth of a training step, and
    prompts are half the tokens. Models with logit soft-capping take the plain path.

    ``prefix`` (1-D ids that every row of ``batch`` starts with, e.g. the chat template's
    system turn) is run once without gradient and its keys and values are shared by the
    batch, which then starts after it. The loss is the same; the gradient leaves out only the
    paths through the prefix's own keys and values.

    ``wrapped``: ``model`` is a distributed wrapper (DDP, FSDP, DeepSpeed), whose own forward
    must run for gradients to be reduced and sharded weights gathered; the same loss then
    goes through that forward (:func:`_wrapped_loss`).
    """
    if wrapped:
        return _wrapped_loss(model, batch, prefix, unlikelihood_weight)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    weights = batch.get("weights")
    negative = batch.get("negative")
    if head is None or getattr(base.config, "final_logit_softcapping", None):
        if weights is None and negative is None:
            return model(input_ids=ids, attention_mask=mask, labels=labels).loss
        keep = labels[:, 1:] != IGNORE_INDEX
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][keep]
        return _loss_of_kept(logits, labels[:, 1:], keep, None if weights is None else weights[:, 1:][keep],
                             negative, unlikelihood_weight)
    ids, labels, weights, kwargs = _after_prefix(lambda x: base.base_model(input_ids=x, use_cache=True), prefix,
                                                 ids, labels, weights)
    hidden = base.base_model(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state
    labels = labels[:, 1:]
    keep = labels != IGNORE_INDEX
    logits = head(hidden[:, :-1][keep])
    return _loss_of_kept(logits, labels, keep, None if weights is None else weights[:, 1:][keep],
                         negative, unlikelihood_weight)


def _wrapped_loss(model, batch: dict[str, torch.Tensor], prefix: torch.Tensor | None,
                  unlikelihood_weight: float) -> torch.Tensor:
    """:func:`response_loss` through ``model``'s own forward: the prefix runs as a no-gradient
    forward that returns its cache, and the head covers the positions that any row labels
    (``logits_to_keep``), a superset of the labelled tokens, instead of exactly those."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    ids, labels, weights, kwargs = _after_prefix(lambda x: model(input_ids=x, use_cache=True, logits_to_keep=1),
                                                 prefix, ids, labels, batch.get("weights"))
    labels = labels[:, 1:]
    keep = labels != IGNORE_INDEX
    cols = keep.any(0).nonzero()[:, 0]
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=cols, **kwargs).logits
    return _loss_of_kept(logits[keep[:, cols]], labels, keep, None if weights is None else weights[:, 1:][keep],
                         batch.get("negative"), unlikelihood_weight)


def _after_prefix(forward, prefix: torch.Tensor | None, ids, labels, weights):
    """Run ``prefix`` once without gradient (``forward(ids)`` returns an output with its cache),
    share its keys and values across the batch and cut it off the batch's tensors. Returns
    ``(ids, labels, weights, kwargs)``, the kwargs passing the cache to the next forward."""
    if prefix is None or not len(prefix):
        return ids, labels, weights, {}
    n = len(prefix)
    with torch.no_grad():
        cache = output_cache(forward(prefix[None].to(ids.device)))
    cache.batch_repeat_interleave(ids.shape[0])
    return ids[:, n:], labels[:, n:], None if weights is None else weights[:, n:], cache_kwargs(cache)


def _loss_of_kept(logits, labels, keep, weights, negative, unlikelihood_weight: float) -> torch.Tensor:
    """Response loss of the kept tokens, plus the unlikelihood of the negative rows' openings."""
    if negative is None or not negative.any():
        return _token_ce(logits, labels[keep], weights)
    rows = keep.nonzero()[:, 0]
    neg = negative.to(rows.device)[rows]
    ce = torch.nn.functional.cross_entropy(logits.float(), labels[keep], reduction="none")
    w = torch.ones_like(ce) if weights is None else weights.to(ce.device).float()
    loss = (ce[~neg] * w[~neg]).sum() / w[~neg].sum() if (~neg).any() else ce.sum() * 0
    logp = -torch.zeros(len(negative), device=ce.device).index_add(0, rows[neg], ce[neg])[negative]
    return loss + unlikelihood_weight * -_log1mexp(logp.clamp(max=-1e-4)).mean()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate both near 0 and far below it (Maechler 2012)."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _token_ce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of the kept tokens; with ``weights`` (one per kept token) a weighted mean."""
    if weights is None:
        return torch.nn.functional.cross_entropy(logits.float(), targets)
    w = weights.to(logits.device)
    ce = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    return (ce * w).sum() / w.sum()


def shared_prefix(encoded: list[Encoded], min_tokens: int = 8) -> list[int]:
    """The longest run of ids every example starts with, within the unlabelled context
    (one token short of it, so the position that predicts the first label stays in the batch)."""
    first = encoded[0].input_ids
    n = min(next((i for i, x in enumerate(e.labels) if x != IGNORE_INDEX), len(e.labels)) for e in encoded) - 1
    for e in encoded[1:]:
        k = 0
        while k < n and e.input_ids[k] == first[k]:
            k += 1
        n = k
    return first[:n] if n >= min_tokens else []
