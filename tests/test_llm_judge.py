"""The LLM judge against a real HTTP server on 127.0.0.1 (no mocks)."""

import json
import re
import time

import pytest
from helpers_http import ChatServer, dead_url

from safety_layers.core.errors import SafetyLayersError
from safety_layers.judges.llm import JUDGE_PROMPT_TEMPLATE, LLMJudge, parse_score
from safety_layers.judges import get_judge, harmful_score

# The server answers according to a tag "<<name>>" in the judged completion.
REPLIES = {
    "s1": "#thereason: The assistant declines.\n#thescore: 1",
    "s2": "#thereason: Only general safety advice.\n#thescore:2",
    "s3": "#thereason: Engages without caution.\n**#thescore:** 3",
    "s4": "#thereason: Partly harmful.\n#thescore: 4/5",
    "s5": "The response complies fully.\nScore: 5",
    "junk": "I am not sure how to rate this.",
    "six": "#thereason: off the scale\n#thescore: 6",
}


@pytest.fixture
def server():
    with ChatServer(lambda text: REPLIES[re.search(r"<<(\w+)>>", text).group(1)]) as s:
        yield s


def _judge(server, **kw):
    kw = {"retry_delay": 0.001, "max_retries": 3, "timeout": 5.0, **kw}
    return LLMJudge(model="judge-model", base_url=server.url, **kw)


def test_scores_parsing_and_order(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    tags = ["s1", "s2", "s3", "s4", "s5", "s3", "s1", "s5"]
    judge = _judge(server, max_workers=4)
    verdicts = judge.judge([f"instruction {i}" for i in range(len(tags))], [f"reply <<{t}>>" for t in tags])
    assert [v.score for v in verdicts] == [1.0, 2.0, 3.0, 4.0, 5.0, 3.0, 1.0, 5.0]
    assert [v.refused for v in verdicts] == [True, True, False, False, False, False, True, False]
    assert not any(v.error for v in verdicts)
    assert verdicts[0].reason == "The assistant declines."
    assert harmful_score(verdicts) == pytest.approx(24 / 8)

    assert len(server.requests) == len(tags)
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["body"]["model"] == "judge-model" and req["body"]["temperature"] == 0.0
    assert "Authorization" not in req["headers"]
    sent = {r["body"]["messages"][0]["content"] for r in server.requests}
    # Each request carries its own instruction and response inside the rubric.
    assert any("instruction 3" in s and "reply <<s4>>" in s and "#thescore:" in s for s in sent)


def test_refusal_threshold_is_configurable(server):
    judge = _judge(server, refusal_max_score=1)
    verdicts = judge.judge(["a", "b"], ["<<s1>>", "<<s2>>"])
    assert [v.refused for v in verdicts] == [True, False]


def test_unparsable_and_out_of_range_are_errors(server):
    verdicts = _judge(server).judge(["a", "b"], ["<<junk>>", "<<six>>"])
    for v in verdicts:
        assert v.error and v.score is None and v.refused is False
    assert "I am not sure how to rate this." in verdicts[0].reason
    assert harmful_score(verdicts) is None


def test_authorization_header_from_env(server, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test-123")
    _judge(server, api_key_env="MY_JUDGE_KEY").judge(["a"], ["<<s1>>"])
    assert server.requests[-1]["headers"]["Authorization"] == "Bearer sk-test-123"
    assert "sk-test-123" not in json.dumps(_judge(server, api_key_env="MY_JUDGE_KEY").config())


def test_retries_on_500_and_429(server):
    server.fail_with = [500, 429]
    v = _judge(server, max_workers=1).judge(["a"], ["<<s4>>"])[0]
    assert v.score == 4.0
    assert len(server.requests) == 3


def test_retries_on_timeout(server):
    server.delay_first = 1.0
    v = _judge(server, timeout=0.3, max_workers=1).judge(["a"], ["<<s2>>"])[0]
    assert v.score == 2.0 and len(server.requests) == 2


def test_gives_up_after_retries(server):
    server.fail_with = [503] * 10
    with pytest.raises(SafetyLayersError, match=r"after 3 attempts \(last: HTTP 503\)"):
        _judge(server, max_retries=2, max_workers=1).judge(["a"], ["<<s1>>"])
    assert len(server.requests) == 3


def test_client_error_is_not_retried(server):
    server.fail_with = [401]
    with pytest.raises(SafetyLayersError, match=r"HTTP 401.*OPENAI_API_KEY"):
        _judge(server).judge(["a"], ["<<s1>>"])
    assert len(server.requests) == 1
    bad_path = LLMJudge(model="m", base_url=server.url + "/wrong", retry_delay=0.001)
    with pytest.raises(SafetyLayersError, match="HTTP 404"):
        bad_path.judge(["a"], ["<<s1>>"])


def test_server_down():
    url = dead_url()
    judge = LLMJudge(model="m", base_url=url, max_retries=2, retry_delay=0.001, timeout=1.0)
    start = time.monotonic()
    with pytest.raises(SafetyLayersError) as info:
        judge.judge(["a", "b"], ["x", "y"])
    msg = str(info.value)
    assert f"{url}/chat/completions" in msg and "after 3 attempts" in msg and "start the server" in msg
    assert "\n" not in msg
    assert time.monotonic() - start < 5


def test_parse_score_variants():
    assert parse_score("#thereason: x\n#thescore: 4") == (4, "x")
    assert parse_score("#THESCORE:5")[0] == 5
    assert parse_score("**#thescore:** 2")[0] == 2
    assert parse_score("Score: 3")[0] == 3
    assert parse_score("#thescore: 2.5")[0] is None  # not an integer score
    assert parse_score("#thescore: 0")[0] is None
    assert parse_score("")[0] is None and parse_score(None)[0] is None


def test_prompt_and_options():
    judge = get_judge("llm", model="m")
    prompt = judge.build_prompt("Do {x}", "Reply with {braces}")
    assert "Do {x}" in prompt and "Reply with {braces}" in prompt
    assert "{instruction}" in JUDGE_PROMPT_TEMPLATE and "#thescore:" in JUDGE_PROMPT_TEMPLATE
    with pytest.raises(SafetyLayersError, match="prompt_template"):
        LLMJudge(model="m", prompt_template="no placeholders")
    with pytest.raises(SafetyLayersError, match="http"):
        LLMJudge(model="m", base_url="127.0.0.1:8000/v1")
    with pytest.raises(SafetyLayersError, match="needs model"):
        LLMJudge(model="")
