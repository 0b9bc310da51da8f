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

from chatgate_server.domain import ContentDelta, RefusalDelta, ToolCallDelta, UpstreamEvent

__all__ = ["coalesce"]


def coalesce(events: list[UpstreamEvent]) -> list[UpstreamEvent]:
    """``events`` in order, with each run of mergeable deltas joined into one."""
    if len(events) < 2:
        return events
    merged: list[UpstreamEvent] = []
    run: list[UpstreamEvent] = []  # the run of mergeable deltas being built
    for event in events:
        if run and _continues(run[0], event):
            run.append(event)
            continue
        if run:
            merged.append(_joined(run))
            run = []
        if type(event) in _MERGEABLE:
            run.append(event)
        else:
            merged.append(event)
    if run:
        merged.append(_joined(run))
    return merged


_MERGEABLE = (ContentDelta, RefusalDelta, ToolCallDelta)


def _continues(head: UpstreamEvent, event: UpstreamEvent) -> bool:
    if type(event) is not type(head):
        return False
    if isinstance(event, ToolCallDelta):
        assert isinstance(head, ToolCallDelta)
        return event.index == head.index and event.id is None and event.name is None
    return True


def _joined(run: list[UpstreamEvent]) -> UpstreamEvent:
    head = run[0]
    if len(run) == 1:
        return head
    if isinstance(head, ToolCallDelta):
        return ToolCallDelta(
            head.index, head.id, head.name, "".join(e.arguments for e in run if isinstance(e, ToolCallDelta))
        )
    if isinstance(head, RefusalDelta):
        return RefusalDelta("".join(e.text for e in run if isinstance(e, RefusalDelta)))
    deltas = [e for e in run if isinstance(e, ContentDelta)]
    # Log-probabilities (when asked for) stay with their text: one list, in order.
    logprobs = tuple(t for e in deltas for t in e.logprobs)
    return ContentDelta("".join(e.text for e in deltas), logprobs)
