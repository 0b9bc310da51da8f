"""Token estimates against tiktoken's own counts (offline, from the seeded cache)."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiktoken

from chatgate_server.domain import ChatMessage, CompletionRequest, TextPart, ToolCall, ToolSpec
from chatgate_server.usage.tokens import (
    REPLY_PRIMING_TOKENS,
    TOKENS_PER_MESSAGE,
    TOKENS_PER_NAME,
    TOOLS_PREAMBLE_TOKENS,
    TiktokenEstimator,
    count_tokens,
    encoding_name_for,
    seed_tiktoken_cache,
)


def enc(name: str) -> tiktoken.Encoding:
    seed_tiktoken_cache()
    return tiktoken.get_encoding(name)


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o-mini", "o200k_base"),
        ("gpt-4o-2024-08-06", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4-mini", "o200k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("some-future-model", "o200k_base"),
    ],
)
def test_encoding_follows_the_model_family(model: str, encoding: str) -> None:
    assert encoding_name_for(model) == encoding


def test_known_counts() -> None:
    # Reference counts from tiktoken itself for fixed strings.
    o200k, cl100k = enc("o200k_base"), enc("cl100k_base")
    assert len(o200k.encode("hello world")) == 2
    assert len(cl100k.encode("tiktoken is great!")) == 6


def test_seeding_works_into_an_empty_cache(tmp_path: Path) -> None:
    seed_tiktoken_cache(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "9b5ad71b2ce5302211f9c61530b329a4922fc6a4",
        "fb374d419588a4632f3f557e76b4b70aebbca790",
    ]
    assert (tmp_path / "fb374d419588a4632f3f557e76b4b70aebbca790").stat().st_size > 1_000_000


def test_messages_are_counted_with_overhead() -> None:
    o200k = enc("o200k_base")
    request = CompletionRequest(
        request_id="r",
        model="gpt-4o",
        user_id="u",
        messages=(
            ChatMessage("system", "You are terse."),
            ChatMessage("user", (TextPart("What is 2+2?"), TextPart(" Answer briefly.")), name="alice"),
        ),
    )
    expected = (
        TOKENS_PER_MESSAGE
        + len(o200k.encode("system"))
        + len(o200k.encode("You are terse."))
        + TOKENS_PER_MESSAGE
        + len(o200k.encode("user"))
        + len(o200k.encode("What is 2+2?"))
        + len(o200k.encode(" Answer briefly."))
        + TOKENS_PER_NAME
        + len(o200k.encode("alice"))
        + REPLY_PRIMING_TOKENS
    )
    usage = TiktokenEstimator().estimate(request, ["Four", "."])
    assert usage.input_tokens == expected
    assert usage.output_tokens == len(o200k.encode("Four."))
    assert usage.source == "estimated"
    assert usage.estimate_encoding == "o200k_base"


def test_tool_definitions_and_tool_calls_count() -> None:
    base = CompletionRequest(
        request_id="r", model="gpt-4o", user_id="u", messages=(ChatMessage("user", "Weather?"),)
    )
    tool = ToolSpec(
        name="get_weather",
        description="Get the weather for a city",
        parameters={"type": "object", "properties": {"city": {"type": "string"}}},
    )
    with_tools = CompletionRequest(
        request_id="r",
        model="gpt-4o",
        user_id="u",
        messages=(
            ChatMessage("user", "Weather?"),
            ChatMessage("assistant", None, tool_calls=(ToolCall("c1", "get_weather", '{"city":"Paris"}'),)),
        ),
        tools=(tool,),
    )
    est = TiktokenEstimator()
    plain = est.estimate(base, []).input_tokens
    extra = est.estimate(with_tools, []).input_tokens - plain
    o200k = enc("o200k_base")
    assert extra > TOOLS_PREAMBLE_TOKENS + len(o200k.encode("get_weather"))
    # The tool call's arguments are part of the prompt.
    assert extra >= len(o200k.encode('{"city":"Paris"}'))


def test_special_token_text_in_user_content_does_not_crash() -> None:
    request = CompletionRequest(
        request_id="r", model="gpt-4o", user_id="u", messages=(ChatMessage("user", "<|endoftext|>"),)
    )
    assert TiktokenEstimator().estimate(request, ["<|endoftext|>"]).output_tokens > 1


def test_a_huge_prompt_is_sampled_and_extrapolated(monkeypatch: pytest.MonkeyPatch) -> None:
    # Issue 13 item 4: tokenizing megabytes blocked the event loop for seconds. The
    # work is bounded by characters tokenized, whatever the request's size.
    from chatgate_server.usage import tokens

    words = ("river", " stone", " lantern", " quietly", " 1987", ", ", " the", " fox")
    prose = "".join(words[i * 7 % len(words)] for i in range(400_000))  # ~2.6 MB
    request = CompletionRequest(
        request_id="r",
        model="gpt-4o-mini",
        user_id="u",
        messages=(ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content=prose)),
    )
    tokenized: list[int] = []
    real_count = tokens.count_tokens

    def spy(text: str, encoding: str) -> int:
        tokenized.append(len(text))
        return real_count(text, encoding)

    monkeypatch.setattr(tokens, "count_tokens", spy)
    usage = TiktokenEstimator().estimate(request, [prose[:100_000]])
    assert sum(tokenized) <= 2 * tokens.SAMPLE_CHARS  # input and output budgets
    truth_in = len(enc("o200k_base").encode(prose)) + 2 * TOKENS_PER_MESSAGE + REPLY_PRIMING_TOKENS
    truth_out = len(enc("o200k_base").encode(prose[:100_000]))
    assert usage.input_tokens == pytest.approx(truth_in, rel=0.02)
    assert usage.output_tokens == pytest.approx(truth_out, rel=0.02)
    assert usage.source == "estimated" and usage.estimate_encoding == "o200k_base"


def test_small_requests_are_still_counted_exactly() -> None:
    text = "hello world " * 1000  # 12,000 characters: under the sample budget
    request = CompletionRequest(
        request_id="r", model="gpt-4o-mini", user_id="u", messages=(ChatMessage(role="user", content=text),)
    )
    usage = TiktokenEstimator().estimate(request, [text])
    exact = len(enc("o200k_base").encode(text))
    assert usage.output_tokens == exact
    assert usage.input_tokens == exact + TOKENS_PER_MESSAGE + 1 + REPLY_PRIMING_TOKENS


class CountingEncoder:
    """tiktoken's o200k_base, noting the length of every text it tokenizes."""

    def __init__(self) -> None:
        self.encoding = enc("o200k_base")
        self.calls: list[int] = []

    def encode(self, text: str, disallowed_special: tuple[()] = ()) -> list[int]:
        self.calls.append(len(text))
        return list(self.encoding.encode(text, disallowed_special=disallowed_special))


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> CountingEncoder:
    from chatgate_server.usage import tokens

    encoder = CountingEncoder()
    monkeypatch.setattr(tokens, "_encoding", lambda name: encoder)
    monkeypatch.setattr(tokens, "_repeated_counts", {})
    return encoder


def test_a_long_text_that_comes_back_is_counted_once_and_right(counting: CountingEncoder) -> None:
    """A service's system prompt rides on every call: it is tokenized once, then its
    count is found by a keyed digest — the same count, whichever object holds the text;
    another text of the same length is counted on its own."""
    prompt = "You are ACME's support assistant; cite the policy section you rely on. " * 40
    other = prompt.replace("ACME", "EMCA")
    want = {t: len(counting.encoding.encode(t, disallowed_special=())) for t in (prompt, other)}
    for _ in range(3):
        assert count_tokens("".join(list(prompt)), "o200k_base") == want[prompt]  # a new str each time
    assert count_tokens(other, "o200k_base") == want[other]
    assert counting.calls == [len(prompt), len(other)]
    short = "Hello there, how are you?" * 10  # under the length worth keeping: counted each time
    count_tokens(short, "o200k_base")
    count_tokens(short, "o200k_base")
    assert counting.calls[2:] == [len(short), len(short)]


def test_the_long_texts_kept_are_bounded_least_recently_used_out(
    counting: CountingEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chatgate_server.usage import tokens

    monkeypatch.setattr(tokens, "_REPEATED_MAX", 3)
    a, b, c, d = (f"{name} " + "word " * 200 for name in "abcd")
    for text in (a, b, c, a, d):  # a is used again before d comes: b is the least recent
        count_tokens(text, "o200k_base")
    assert len(tokens._repeated_counts) == 3
    counting.calls.clear()
    for text in (a, c, d):
        count_tokens(text, "o200k_base")
    assert counting.calls == []  # kept
    count_tokens(b, "o200k_base")
    assert counting.calls == [len(b)]  # the one that went
