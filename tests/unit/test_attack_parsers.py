"""The operator commands' parsers fuzzed: any text for a subject, an amount, dollars or a
duration ends in a value within the tables' bounds or a ValueError / usage error (one
line), never another exception."""

from __future__ import annotations

import argparse

from hypothesis import given, settings
from hypothesis import strategies as st

from chatgate_server.auth.commands import MAX_DURATION, duration
from chatgate_server.limits import blocks_records
from chatgate_server.limits.commands import MAX_AMOUNT, _count, _dollars
from chatgate_server.limits.definitions import MAX_NAME, MAX_TENANT, Scope, Target

texts = st.one_of(
    st.text(max_size=400),
    st.from_regex(r"[0-9]{1,30}(\.[0-9]{0,8})?", fullmatch=True),
    st.from_regex(r"-?[0-9]{1,25}[smhdw]", fullmatch=True),
    st.sampled_from(["*", "a/*", "/", "a/", "/b", "a/b/c", "\u00fc/\U0001f98a", "t" * 129, "a/" + "u" * 257]),
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([s.value for s in Scope]), texts, st.text(max_size=300))
def test_limit_targets(scope: str, who: str, model: str) -> None:
    try:
        target = Target.parse(scope, who, model)
    except ValueError as exc:
        assert "\n" not in str(exc) or "\n" in who
        return
    assert (
        1 <= len(target.tenant) <= MAX_TENANT and len(target.subject) <= MAX_NAME and len(model) <= MAX_NAME
    )


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([s.value for s in blocks_records.Scope]), texts)
def test_block_subjects(scope: str, who: str) -> None:
    try:
        subject = blocks_records.Subject.parse(scope, who)
    except ValueError:
        return
    assert (
        1 <= len(subject.tenant) <= blocks_records.MAX_TENANT and len(subject.name) <= blocks_records.MAX_NAME
    )


@settings(max_examples=300, deadline=None)
@given(texts)
def test_amounts_dollars_and_durations(text: str) -> None:
    for parse, low, high in ((_count, 0, MAX_AMOUNT), (_dollars, 0, MAX_AMOUNT)):
        try:
            value = parse(text)
        except argparse.ArgumentTypeError:
            continue
        assert low <= value <= high
    try:
        length = duration(text)
    except argparse.ArgumentTypeError:
        return
    assert length <= MAX_DURATION
