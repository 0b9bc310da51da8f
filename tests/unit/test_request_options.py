"""Reasoning effort, verbosity, service tier, prompt cache key and logprobs: from the
proto to the domain (or to field violations), into the upstream body, into the request's
fingerprint, and log-probabilities back out in content deltas."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson
import pytest

from chatgate.v1 import chat_pb2 as pb
from chatgate_server.domain import (
    ANONYMOUS_CALLER,
    ChatMessage,
    CompletionRequest,
    ContentDelta,
    JsonSchemaFormat,
    SamplingOptions,
    TokenLogprob,
    ToolSpec,
    TopLogprob,
)
from chatgate_server.errors import InvalidRequest
from chatgate_server.rpc.convert import to_domain, to_proto
from chatgate_server.upstream.request_body import build_body
from chatgate_server.usage.admission import fingerprint


def message(**fields: Any) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model="gpt-5", user_id="u-1", messages=[pb.Message(role=pb.ROLE_USER, text="hi")], **fields
    )


def test_each_option_reaches_the_upstream_body_under_openais_name() -> None:
    request = to_domain(
        message(
            reasoning_effort=pb.REASONING_EFFORT_MINIMAL,
            verbosity=pb.VERBOSITY_LOW,
            service_tier=pb.SERVICE_TIER_FLEX,
            prompt_cache_key="tenant-7:summaries",
            logprobs=True,
            top_logprobs=3,
        ),
        ANONYMOUS_CALLER,
    )
    assert request.features == {
        "reasoning_effort",
        "verbosity",
        "service_tier",
        "prompt_cache_key",
        "logprobs",
    }
    body = orjson.loads(build_body(request))
    assert {k: body[k] for k in body if k not in ("model", "messages", "stream", "stream_options")} == {
        "reasoning_effort": "minimal",
        "verbosity": "low",
        "service_tier": "flex",
        "prompt_cache_key": "tenant-7:summaries",
        "logprobs": True,
        "top_logprobs": 3,
    }


def test_unset_options_leave_the_body_as_it_was_and_route_anywhere() -> None:
    request = to_domain(message(), ANONYMOUS_CALLER)
    assert request.features == frozenset()
    body = orjson.loads(build_body(request))
    assert set(body) == {"model", "messages", "stream", "stream_options"}


@pytest.mark.parametrize(
    ("effort", "sent"),
    [
        (pb.REASONING_EFFORT_NONE, "none"),
        (pb.REASONING_EFFORT_LOW, "low"),
        (pb.REASONING_EFFORT_MEDIUM, "medium"),
        (pb.REASONING_EFFORT_HIGH, "high"),
        (pb.REASONING_EFFORT_XHIGH, "xhigh"),
        (pb.REASONING_EFFORT_MAX, "max"),
    ],
)
def test_every_reasoning_effort_is_sent_as_openai_spells_it(effort: int, sent: str) -> None:
    request = to_domain(message(reasoning_effort=effort), ANONYMOUS_CALLER)
    assert orjson.loads(build_body(request))["reasoning_effort"] == sent


def test_top_logprobs_zero_is_sent_and_logprobs_alone_is_an_option() -> None:
    request = to_domain(message(logprobs=True, top_logprobs=0), ANONYMOUS_CALLER)
    body = orjson.loads(build_body(request))
    assert (body["logprobs"], body["top_logprobs"]) == (True, 0)
    assert to_domain(message(logprobs=True), ANONYMOUS_CALLER).features == {"logprobs"}


def test_bad_values_are_field_violations_all_at_once() -> None:
    bad = message(
        reasoning_effort=99,  # a value from a newer contract than this server's
        verbosity=7,
        service_tier=42,
        prompt_cache_key="k" * 65,
        top_logprobs=21,
        logprobs=True,
    )
    with pytest.raises(InvalidRequest) as refused:
        to_domain(bad, ANONYMOUS_CALLER)
    violations = {v.field: v.description for v in refused.value.violations}
    assert violations == {
        "reasoning_effort": "must be one of REASONING_EFFORT_NONE, REASONING_EFFORT_MINIMAL, "
        "REASONING_EFFORT_LOW, REASONING_EFFORT_MEDIUM, REASONING_EFFORT_HIGH, "
        "REASONING_EFFORT_XHIGH, REASONING_EFFORT_MAX",
        "verbosity": "must be one of VERBOSITY_LOW, VERBOSITY_MEDIUM, VERBOSITY_HIGH",
        "service_tier": "must be one of SERVICE_TIER_AUTO, SERVICE_TIER_DEFAULT, SERVICE_TIER_FLEX, "
        "SERVICE_TIER_SCALE, SERVICE_TIER_PRIORITY",
        "prompt_cache_key": "at most 64 printable characters",
        "top_logprobs": "must be between 0 and 20",
    }


@pytest.mark.parametrize(
    ("fields", "field", "description"),
    [
        ({"top_logprobs": 5}, "top_logprobs", "needs logprobs set to true"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs", "must be between 0 and 20"),
        ({"prompt_cache_key": "a\nb"}, "prompt_cache_key", "at most 64 printable characters"),
    ],
)
def test_each_bad_option_is_named(fields: dict[str, Any], field: str, description: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        to_domain(message(**fields), ANONYMOUS_CALLER)
    assert [(v.field, v.description) for v in refused.value.violations] == [(field, description)]


def test_a_64_character_cache_key_is_fine() -> None:
    assert to_domain(message(prompt_cache_key="k" * 64), ANONYMOUS_CALLER).prompt_cache_key == "k" * 64


# --- the fingerprint of a caller-supplied request id ---------------------------------------------


def request(**overrides: object) -> CompletionRequest:
    base = CompletionRequest(
        request_id="caller-id-1",
        model="gpt-4o-mini",
        messages=(ChatMessage(role="user", content="Hello"),),
        user_id="u-1",
        tags={"feature": "x"},
        sampling=SamplingOptions(temperature=0.5, stop=("x",)),
        tools=(ToolSpec("lookup", parameters={"type": "object"}),),
        response_format=JsonSchemaFormat("answer", {"type": "object"}),
        request_id_from_caller=True,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


def test_a_request_without_the_new_options_keeps_the_fingerprint_it_had_before_them() -> None:
    # Computed by the code before these options existed: an id reserved then and retried
    # after an upgrade is still the same request.
    assert fingerprint(request()) == "59f0c928d62833cbb50977bc51bc8b02"


@pytest.mark.parametrize(
    "change",
    [
        {"sampling": SamplingOptions(temperature=0.5, stop=("x",), reasoning_effort="low")},
        {"sampling": SamplingOptions(temperature=0.5, stop=("x",), verbosity="high")},
        {"sampling": SamplingOptions(temperature=0.5, stop=("x",), logprobs=True)},
        {"sampling": SamplingOptions(temperature=0.5, stop=("x",), logprobs=True, top_logprobs=0)},
        {"service_tier": "flex"},
        {"prompt_cache_key": "k"},
    ],
)
def test_each_new_option_changes_the_fingerprint(change: dict[str, object]) -> None:
    assert fingerprint(request(**change)) != fingerprint(request())


def test_top_logprobs_zero_and_unset_are_different_requests() -> None:
    with_logprobs = SamplingOptions(temperature=0.5, stop=("x",), logprobs=True)
    zero = replace(with_logprobs, top_logprobs=0)
    assert fingerprint(request(sampling=zero)) != fingerprint(request(sampling=with_logprobs))


# --- log-probabilities out -----------------------------------------------------------------------


def test_a_content_delta_carries_its_log_probabilities_to_the_caller() -> None:
    token = TokenLogprob(
        " caf", -0.25, b" caf", (TopLogprob(" caf", -0.25, b" caf"), TopLogprob(" tea", -2.0))
    )
    sent = to_proto(ContentDelta(" caf", (token, TokenLogprob("\u00e9", -0.5))))
    assert sent.content.text == " caf"
    first, second = sent.content.logprobs
    assert (first.token, first.logprob, first.token_bytes) == (" caf", -0.25, b" caf")
    assert [(a.token, a.logprob, a.token_bytes) for a in first.top_logprobs] == [
        (" caf", -0.25, b" caf"),
        (" tea", -2.0, b""),
    ]
    assert (second.token, second.token_bytes, list(second.top_logprobs)) == ("\u00e9", b"", [])
    assert not to_proto(ContentDelta("plain")).content.logprobs
