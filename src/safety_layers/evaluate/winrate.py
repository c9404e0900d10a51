"""An AlpacaEval-style win rate: how often an LLM judge prefers the fine-tuned model's answer to
the answer of the model before fine-tuning (the paper's Table 9 reports AlpacaEval 2.0, spec §4.8).

For each instruction the judge sees both answers, in an order drawn per instruction from
``seed`` (AlpacaEval randomises positions against the judge's position bias), and names the
better one. The win rate counts a tie or an unreadable verdict as half a win, as AlpacaEval
counts draws. The judge is any OpenAI-compatible ``/chat/completions`` endpoint, reached with
the LLM judge's client (:class:`~safety_layers.judges.llm.LLMJudge`: retries, key from the
environment). This is not AlpacaEval 2.0's length-controlled number: its reference answers are
GPT-4 Turbo's, ours the untuned model's.
"""

from __future__ import annotations

import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..core.errors import SafetyLayersError

PAIRWISE_TEMPLATE = (
    "You compare two AI assistants' answers to the same instruction. Judge which answer follows the "
    "instruction better: helpful, correct, complete and clear. Ignore the order the answers are shown in "
    "and their length as such.\n\n[Instruction]\n{instruction}\n\n[Answer A]\n{a}\n\n[Answer B]\n{b}\n\n"
    "Reply with one line: `Winner: A`, `Winner: B` or `Winner: tie`.")


@dataclass
class WinRateResult:
    """Wins of the fine-tuned model over the reference, ties and unreadable verdicts count half."""

    win_rate: float
    n: int
    wins: int
    losses: int
    ties: int
    unreadable: int
    judge: dict = field(default_factory=dict)


def parse_winner(text: str | None) -> str | None:
    """``"A"``, ``"B"``, ``"tie"`` or None from a judge's reply (the last ``Winner:`` line wins)."""
    found = re.findall(r"winner\s*[:\-]\s*\**\s*(A|B|tie)\b", text or "", flags=re.IGNORECASE)
    if not found:
        return None
    w = found[-1]
    return "tie" if w.lower() == "tie" else w.upper()


def win_rate(instructions: list[str], tuned: list[str], reference: list[str], *, judge_model: str | None,
             judge_url: str | None, key_env: str = "OPENAI_API_KEY", seed: int = 0,
             max_workers: int = 4) -> WinRateResult:
    """The fine-tuned answers' win rate over the reference answers, judged pairwise."""
    from ..judges.llm import LLMJudge

    if not judge_url or not judge_model:
        raise SafetyLayersError("the win rate needs an LLM judge: set evaluate.judge_url (an OpenAI-compatible /v1 "
                                "endpoint) and evaluate.judge_model")
    if not (len(instructions) == len(tuned) == len(reference)) or not instructions:
        raise SafetyLayersError(f"the win rate needs as many tuned and reference answers as instructions, got "
                                f"{len(instructions)}, {len(tuned)}, {len(reference)}")
    client = LLMJudge(judge_model, base_url=judge_url, api_key_env=key_env, max_workers=max_workers)
    rng = random.Random(f"{seed}-winrate")
    flips = [rng.random() < 0.5 for _ in instructions]        # True: the tuned answer is shown as B

    def one(i: int) -> str | None:
        a, b = (reference[i], tuned[i]) if flips[i] else (tuned[i], reference[i])
        text = PAIRWISE_TEMPLATE.format(instruction=instructions[i], a=a, b=b)
        reply = client._post({"model": judge_model, "messages": [{"role": "user", "content": text}],
                              "temperature": 0.0, "max_tokens": 64}, _headers(key_env))
        try:
            return parse_winner(reply["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            return None

    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        verdicts = list(pool.map(one, range(len(instructions))))
    tuned_pos = ["B" if f else "A" for f in flips]
    wins = sum(v == p for v, p in zip(verdicts, tuned_pos))
    ties = sum(v == "tie" for v in verdicts)
    unreadable = sum(v is None for v in verdicts)
    losses = len(verdicts) - wins - ties - unreadable
    rate = (wins + 0.5 * (ties + unreadable)) / len(verdicts)
    return WinRateResult(rate, len(verdicts), wins, losses, ties, unreadable,
                         {"model": judge_model, "base_url": judge_url, "api_key_env": key_env, "seed": seed})


def _headers(key_env: str) -> dict[str, str]:
    import os

    headers = {"Content-Type": "application/json"}
    key = os.environ.get(key_env, "") if key_env else ""
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers
