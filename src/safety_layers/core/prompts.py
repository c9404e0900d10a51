"""Prompt templates: the model's chat template, the paper's Alpaca templates, a plain fallback.

The paper formats every query with the Alpaca template (docs/paper.md §1); our default is the
model's own chat template, which is how chat models are used in practice.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import SafetyLayersError

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
ALPACA_INPUT_PREAMBLE = ("Below is an instruction that describes a task, paired with an input that "
                         "provides further context. Write a response that appropriately completes the request.")
TEMPLATES = ("chat", "alpaca", "alpaca_short", "plain")


@dataclass(frozen=True)
class Rendered:
    """A prompt as text, and whether the tokenizer should add its special tokens.

    A chat template already writes BOS and role markers itself; adding special tokens on
    top would double the BOS, so ``add_special_tokens`` is False for it.
    """

    text: str
    add_special_tokens: bool


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_template(tokenizer, template: str) -> str:
    """The template actually used: ``chat`` falls back to ``plain`` without a chat template."""
    if template not in TEMPLATES:
        raise SafetyLayersError(f"unknown template {template!r}: choose one of {', '.join(TEMPLATES)}")
    if template == "chat" and not has_chat_template(tokenizer):
        return "plain"
    return template


def render(tokenizer, instruction: str, template: str = "chat", input: str | None = None,
           system: str | None = None, response: str | None = None) -> Rendered:
    """Format one instruction (and optionally its response, for training data)."""
    template = resolve_template(tokenizer, template)
    if template == "chat":
        user = instruction if not input else f"{instruction}\n\n{input}"
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        if response is not None:
            text += response + (tokenizer.eos_token or "")
        return Rendered(text, add_special_tokens=False)
    if template == "alpaca":
        if input:
            text = f"{ALPACA_INPUT_PREAMBLE}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        else:
            text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    elif template == "alpaca_short":
        text = f"### Instruction:\n{instruction}\n\n### Response:\n"
    else:
        user = instruction if not input else f"{instruction}\n\n{input}"
        text = f"User: {user}\nAssistant:"
        if response is not None:
            response = " " + response
    if response is not None:
        text += response + (tokenizer.eos_token or "")
    return Rendered(text, add_special_tokens=True)


def encode(tokenizer, prompts: list[str], template: str = "chat", system: str | None = None) -> list[list[int]]:
    """Token ids of each rendered prompt (no padding, no truncation)."""
    out = []
    for p in prompts:
        r = render(tokenizer, p, template, system=system)
        out.append(tokenizer(r.text, add_special_tokens=r.add_special_tokens)["input_ids"])
    return out
