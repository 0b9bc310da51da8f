"""A whole completion, assembled from its events (what ``collect()`` returns)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from chatgate.client.events import (
    Allowance,
    ContentDelta,
    Cost,
    Event,
    Finished,
    FinishReason,
    Outcome,
    RefusalDelta,
    Started,
    TokenLogprob,
    ToolCallDelta,
    Usage,
)


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One tool call the model made, its argument fragments joined.

    ``parsed_arguments`` is ``arguments`` decoded as JSON when it is valid JSON
    (``arguments_valid`` is then True), else None: a model cut by the token limit or
    the deadline can leave the JSON unfinished, and the raw text is kept for that case.
    """

    index: int
    id: str
    name: str
    arguments: str
    parsed_arguments: Any = None
    arguments_valid: bool = False


@dataclass(frozen=True, slots=True)
class Completion:
    """Everything a stream delivered.

    ``finished`` is False when the stream broke before its final event (then
    ``finish_reason``/``outcome`` are UNSPECIFIED and ``usage``/``cost`` None); such a
    Completion is only ever seen as :attr:`ChatgateError.partial`.
    """

    request_id: str
    model: str
    upstream_response_id: str
    text: str
    refusal: str
    tool_calls: tuple[ToolCall, ...]
    finish_reason: FinishReason
    outcome: Outcome
    usage: Usage | None
    cost: Cost | None
    finished: bool
    allowances: tuple[Allowance, ...] = ()
    """What the limits that apply still allowed when the call started (Started): one
    per kind, the tightest when several of a kind apply."""
    logprobs: tuple[TokenLogprob, ...] = ()
    """Each token of ``text`` with its log-probability, when the request asked for them."""


@dataclass
class _PendingCall:
    id: str = ""
    name: str = ""
    fragments: list[str] = field(default_factory=list)


class Collector:
    """Folds events into a :class:`Completion`; shared by the sync and async clients."""

    def __init__(self) -> None:
        self.events = 0
        self._started: Started | None = None
        self._text: list[str] = []
        self._logprobs: list[TokenLogprob] = []
        self._refusal: list[str] = []
        self._calls: dict[int, _PendingCall] = {}
        self._finished: Finished | None = None

    def add(self, event: Event) -> None:
        """Take the next event of the stream."""
        self.events += 1
        if isinstance(event, ContentDelta):
            self._text.append(event.text)
            self._logprobs.extend(event.logprobs)
        elif isinstance(event, ToolCallDelta):
            call = self._calls.setdefault(event.index, _PendingCall())
            # id and name arrive on a call's first piece; later pieces leave them empty.
            call.id = call.id or event.id
            call.name = call.name or event.name
            call.fragments.append(event.arguments_fragment)
        elif isinstance(event, RefusalDelta):
            self._refusal.append(event.text)
        elif isinstance(event, Started):
            self._started = event
        else:
            self._finished = event

    def result(self) -> Completion:
        """The completion as received so far."""
        started, finished = self._started, self._finished
        return Completion(
            request_id=started.request_id if started else "",
            model=started.model if started else "",
            upstream_response_id=started.upstream_response_id if started else "",
            text="".join(self._text),
            refusal="".join(self._refusal),
            tool_calls=tuple(_tool_call(i, c) for i, c in sorted(self._calls.items())),
            finish_reason=finished.finish_reason if finished else FinishReason.UNSPECIFIED,
            outcome=finished.outcome if finished else Outcome.UNSPECIFIED,
            usage=finished.usage if finished else None,
            cost=finished.cost if finished else None,
            finished=finished is not None,
            allowances=started.allowances if started else (),
            logprobs=tuple(self._logprobs),
        )


def _tool_call(index: int, pending: _PendingCall) -> ToolCall:
    arguments = "".join(pending.fragments)
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return ToolCall(index, pending.id, pending.name, arguments)
    return ToolCall(index, pending.id, pending.name, arguments, parsed, arguments_valid=True)
