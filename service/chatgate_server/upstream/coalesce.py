"""Merge the text deltas that arrived together into one, before they are relayed.

Each upstream chunk normally arrives on its own (tokens come milliseconds apart) and
is relayed as its own message. When several are already in hand at once — one socket
read that holds a burst, or a busy process that finds many chunks waiting — relaying
them one message each costs a gRPC write per chunk (the most expensive step on the
hot path) and gives the caller nothing: they are all there now. Merging them costs no
latency, since nothing is ever held back to wait for more, and it makes a loaded
server cheaper per token exactly when it is loaded, instead of falling further behind.

Only what a caller assembles by concatenation is merged: adjacent content deltas,
adjacent refusal deltas, and adjacent argument fragments of the same tool call (a
later fragment that starts a call, i.e. carries an id or a name, is never folded
into an earlier one). Everything else keeps its place and order; the log-probabilities
of merged content deltas are joined in order with their text.
"""

from __future__ import annotations

from chatgate_server.domain import ContentDelta, RefusalDelta, TokenLogprob, ToolCallDelta, UpstreamEvent

__all__ = ["coalesce"]


def coalesce(events: list[UpstreamEvent]) -> list[UpstreamEvent]:
    """``events`` in order, with each run of mergeable deltas joined into one."""
    if len(events) < 2:
        return events
    merged: list[UpstreamEvent] = []
    head: UpstreamEvent | None = None  # the first event of the run being built
    run: list[str] = []  # its texts (or argument fragments)
    # A content run's log-probabilities: asked for, they come with every token's text.
    logprobs: list[TokenLogprob] | None = None
    for event in events:
        if head is not None and _continues(head, event):
            run.append(_text(event))
            if logprobs is not None:
                logprobs.extend(event.logprobs)  # type: ignore[union-attr]
            continue
        if head is not None:
            merged.append(_joined(head, run, logprobs))
            head = None
        if type(event) in _MERGEABLE:
            head, run = event, [_text(event)]
            logprobs = list(event.logprobs) if type(event) is ContentDelta and event.logprobs else None
        else:
            merged.append(event)
    if head is not None:
        merged.append(_joined(head, run, logprobs))
    return merged


_MERGEABLE = (ContentDelta, RefusalDelta, ToolCallDelta)


def _continues(head: UpstreamEvent, event: UpstreamEvent) -> bool:
    if type(event) is not type(head):
        return False
    if isinstance(event, ToolCallDelta):
        assert isinstance(head, ToolCallDelta)
        return event.index == head.index and event.id is None and event.name is None
    return True


def _text(event: UpstreamEvent) -> str:
    if isinstance(event, ToolCallDelta):
        return event.arguments
    assert isinstance(event, ContentDelta | RefusalDelta)
    return event.text


def _joined(head: UpstreamEvent, run: list[str], logprobs: list[TokenLogprob] | None) -> UpstreamEvent:
    if len(run) == 1:
        return head
    if isinstance(head, ToolCallDelta):
        return ToolCallDelta(head.index, head.id, head.name, "".join(run))
    if isinstance(head, RefusalDelta):
        return RefusalDelta("".join(run))
    return ContentDelta("".join(run), tuple(logprobs) if logprobs else ())
