"""Every ErrorInfo reason the server can send is documented and typed in both clients.

The set is derived from the code: each ChatgateError subclass that the service
constructs or raises somewhere (errors.py gives its reason — or, for a class whose
instances carry one of several, its ``reasons``, as QuotaExceeded has one per limit
kind; rpc/status.py puts it in the ErrorInfo), and INTERNAL, which rpc/status.py sends
for anything else. A new error the server starts sending then fails this test until
docs/CALLING.md's table, the README's table, the Python client's ``ErrorReason`` and the
Node client's ``ErrorReason`` name it.

The clients may name a reason errors.py declares before the service raises it (so a
client shipped ahead of a feature already knows its reasons), but nothing errors.py
does not declare.
"""

from __future__ import annotations

import ast
import re
from typing import get_args

import grpc
import pytest

from chatgate.client import KNOWN_REASONS, ErrorReason
from chatgate_server import errors
from chatgate_server.domain import LimitKind
from chatgate_server.limits.definitions import REASONS as LIMIT_REASONS
from tests.conftest import REPO_ROOT

SERVICE = REPO_ROOT / "service" / "chatgate_server"
# The simulator stands in for OpenAI: its errors are OpenAI's, not chatgate's.
NOT_THE_SERVER = {SERVICE / "simulator", SERVICE / "errors.py"}
# Made by the clients themselves (a stream that ended OK without its final event).
CLIENT_REASONS = {"INCOMPLETE_STREAM"}
REASON = re.compile(r"`([A-Z][A-Z_]+[A-Z])`")


def error_classes() -> dict[str, type[errors.ChatgateError]]:
    found: dict[str, type[errors.ChatgateError]] = {"ChatgateError": errors.ChatgateError}
    pending = [errors.ChatgateError]
    while pending:
        for sub in pending.pop().__subclasses__():
            if sub.__module__ == errors.__name__:
                found[sub.__name__] = sub
                pending.append(sub)
    return found


def names_used(tree: ast.AST) -> set[str]:
    """Names called (``X(...)``) or raised (``raise X``) in a module."""
    used = set()
    for node in ast.walk(tree):
        target = (
            node.func if isinstance(node, ast.Call) else node.exc if isinstance(node, ast.Raise) else None
        )
        if isinstance(target, ast.Name):
            used.add(target.id)
        elif isinstance(target, ast.Attribute):
            used.add(target.attr)
    return used


def reasons_of(cls: type[errors.ChatgateError]) -> set[str]:
    """The reasons an instance of ``cls`` may carry: its declared ``reasons`` when its
    instances choose one (QuotaExceeded), else its one ``reason``."""
    return set(getattr(cls, "reasons", None) or {cls.reason})


def reasons_declared() -> set[str]:
    """Every reason errors.py defines, sent yet or not."""
    return {r for cls in error_classes().values() for r in reasons_of(cls)}


def reasons_the_server_sends() -> set[str]:
    classes = error_classes()
    used: set[str] = set()
    for path in SERVICE.rglob("*.py"):
        if not any(path == skip or skip in path.parents for skip in NOT_THE_SERVER):
            used |= names_used(ast.parse(path.read_text(), str(path)))
    sent = {errors.ChatgateError.reason}
    for name, cls in classes.items():
        if name in used:
            sent |= reasons_of(cls)
    return sent


def table_reasons(markdown: str, heading: str) -> set[str]:
    """The backticked reasons in the second column of the first table after ``heading``."""
    section = markdown[markdown.index(heading) :]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    reasons: set[str] = set()
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = line.split("|")
        reasons |= set(REASON.findall(cells[2]))
    return reasons


def node_reasons() -> set[str]:
    declarations = (REPO_ROOT / "clients" / "node" / "src" / "index.d.ts").read_text()
    match = re.search(r"export type ErrorReason =([^;]*);", declarations)
    assert match, "index.d.ts declares ErrorReason"
    return set(re.findall(r'"([A-Z_]+)"', match[1]))


def test_the_derived_set_is_plausible() -> None:
    sent = reasons_the_server_sends()
    assert {
        "INVALID_REQUEST",
        "SHUTTING_DOWN",
        "USAGE_LEDGER_FULL",
        "DUPLICATE_REQUEST_ID",
        "INTERNAL",
    } <= sent
    # Limits send one reason per kind of limit, never QuotaExceeded's class default.
    assert set(LIMIT_REASONS.values()) <= sent
    assert "QUOTA_EXCEEDED" not in sent


def test_instance_reasons_are_seen_one_per_limit_kind() -> None:
    limit_reasons = {f"{kind.value.upper()}_EXCEEDED" for kind in LimitKind}
    assert errors.QuotaExceeded.reasons == limit_reasons
    assert reasons_of(errors.QuotaExceeded) == limit_reasons
    assert limit_reasons | {"BLOCKED"} <= reasons_declared()


def test_a_limit_refusal_must_name_a_declared_reason() -> None:
    with pytest.raises(ValueError, match="not a limit reason"):
        errors.QuotaExceeded("over", reason="TOKENS_PER_HOUR_EXCEEDED", violations=())


def test_every_reason_is_in_the_callers_guide() -> None:
    text = (REPO_ROOT / "docs" / "CALLING.md").read_text()
    assert reasons_the_server_sends() - table_reasons(text, "## Status codes, and when to retry") == set()


def test_every_reason_is_in_the_readme() -> None:
    text = (REPO_ROOT / "README.md").read_text()
    assert reasons_the_server_sends() - table_reasons(text, "## Errors, retries and the breaker") == set()


def test_every_reason_is_typed_in_the_python_client() -> None:
    typed = set(get_args(ErrorReason))
    assert typed == KNOWN_REASONS
    assert reasons_the_server_sends() - typed == set()
    assert typed - reasons_declared() - CLIENT_REASONS == set(), "the client names a reason errors.py lacks"


def test_every_reason_is_typed_in_the_node_client() -> None:
    typed = node_reasons()
    assert reasons_the_server_sends() - typed == set()
    assert typed - reasons_declared() - CLIENT_REASONS == set(), "the client names a reason errors.py lacks"


def test_the_clients_know_every_limit_reason_before_the_server_sends_one() -> None:
    """So the limits and blocks work passes this file the day it starts raising them."""
    ahead = errors.QuotaExceeded.reasons | {errors.Blocked.reason}
    assert ahead <= set(get_args(ErrorReason))
    assert ahead <= node_reasons()
    for path, heading in (
        ("docs/CALLING.md", "## Status codes, and when to retry"),
        ("README.md", "## Errors, retries and the breaker"),
    ):
        assert ahead - table_reasons((REPO_ROOT / path).read_text(), heading) == set(), path


def test_known_reason_narrows_what_the_client_knows() -> None:
    from chatgate.client import ChatgateError

    unavailable = grpc.StatusCode.UNAVAILABLE
    assert ChatgateError(unavailable, "draining", reason="SHUTTING_DOWN").known_reason == "SHUTTING_DOWN"
    assert ChatgateError(unavailable, "newer server", reason="SOMETHING_NEW").known_reason is None
    assert ChatgateError(unavailable, "no details").known_reason is None
