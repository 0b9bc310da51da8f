"""A model outside CHATGATE_ALLOWED_MODELS is refused with the list the caller may use."""

from __future__ import annotations

import pytest

from chatgate.v1 import chat_pb2 as pb
from chatgate_server.domain import ANONYMOUS_CALLER
from chatgate_server.errors import InvalidRequest
from chatgate_server.rpc.convert import RequestLimits, to_domain


def test_the_refusal_names_the_allowed_models() -> None:
    request = pb.CompleteRequest(
        model="gpt-3.5-turbo", user_id="u1", messages=[pb.Message(role=pb.ROLE_USER, text="hi")]
    )
    with pytest.raises(InvalidRequest) as refused:
        to_domain(request, ANONYMOUS_CALLER, RequestLimits(allowed_models=("gpt-4o*", "o4-mini")))
    (violation,) = refused.value.violations
    assert violation.field == "model"
    assert violation.description.endswith("allows: gpt-4o*, o4-mini")
    assert "gpt-4o*, o4-mini" in refused.value.message  # the status message, too
