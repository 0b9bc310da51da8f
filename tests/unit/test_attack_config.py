"""chatgate.toml fuzzed: any document, any key shape, any value ends in a loaded config
or one printable ConfigError line naming the file — never a traceback, never a key's
value (what key_env names, what key_file holds), however the file is wrong."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatgate_server.config import ConfigError
from chatgate_server.deployments import load_config

ENV_SECRET = "sk-ENVSECRET-0123456789"
FILE_SECRET = "sk-FILESECRET-9876543210"
KEYS = [
    "name",
    "kind",
    "base_url",
    "resource",
    "api_version",
    "key_env",
    "key_file",
    "models",
    "weight",
    "max_concurrent_streams",
    "max_connections",
    "headers",
    "prices_file",
    "accepts",
    "api_key",
    "strategy",
    "fallback",
    "deployments",
    "model",
]
STRINGS = [
    "openai",
    "azure",
    "compatible",
    "a",
    "gpt-4o",
    "*",
    "http://127.0.0.1:1",
    "https://x.openai.azure.com",
    "http://[::1",
    "http://x:99999",
    "http://x:-1",
    "2024-10-21",
    "v1",
    "SECRET_ENV",
    "BAD_KEY_ENV",
    ENV_SECRET,
    "a\u0000b",
    "a\nb",
    "\u2028",
    "x" * 300,
    "ordered",
    "weighted",
    "",
    " ",
    "\u00e9\u4e2d",
]


def keys() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(KEYS), st.text(max_size=20))


def scalars() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from(STRINGS),
        st.text(max_size=30),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.floats(),
        st.booleans(),
    )


values = st.recursive(
    scalars(),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys(), inner, max_size=4)),
    max_leaves=12,
)
tables = st.dictionaries(keys(), values, max_size=8)
documents = st.fixed_dictionaries(
    {},
    optional={
        "deployments": st.one_of(st.lists(tables, max_size=3), values),
        "routes": st.one_of(
            st.lists(tables, max_size=2), st.dictionaries(keys(), tables, max_size=2), values
        ),
    },
).flatmap(lambda doc: st.dictionaries(keys(), values, max_size=2).map(lambda extra: {**extra, **doc}))


def toml_value(value: Any) -> str:
    """A TOML inline value (a basic string's escapes are JSON's, but for lone surrogates)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_document(doc: dict[str, Any]) -> str:
    return "\n".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in doc.items()) + "\n"


def check(path: Path, env: dict[str, str]) -> None:
    try:
        config = load_config(path, env)
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(f"{path}: "), message
        assert message.isprintable(), message  # one line: no newline, no control character
        assert len(message) <= 2000, len(message)
        assert ENV_SECRET not in message and FILE_SECRET not in message, message
    else:
        for spec in config.deployments:
            assert math.isfinite(spec.weight) and spec.weight > 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(documents)
def test_any_document_loads_or_is_one_clean_line(tmp_path: Path, doc: dict[str, Any]) -> None:
    path = tmp_path / "chatgate.toml"
    (tmp_path / "key").write_text(FILE_SECRET)
    path.write_text(toml_document(doc), encoding="utf-8", errors="surrogatepass")
    check(path, {"SECRET_ENV": ENV_SECRET, "BAD_KEY_ENV": "sk bad\n" + ENV_SECRET})


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_any_bytes_load_or_are_one_clean_line(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "chatgate.toml"
    path.write_bytes(raw)
    check(path, {})


OPENAI = '[[deployments]]\nname = "a"\nkind = "openai"\n'
DEPLOYMENT = '[[deployments]]\nname = "a"\nkind = "compatible"\nbase_url = "http://127.0.0.1:1"\n'
NASTY = {
    "key_file with a NUL": '[[deployments]]\nname = "a"\nkind = "openai"\nkey_file = "k\\u0000"\n',
    "prices_file with a NUL": DEPLOYMENT + 'prices_file = "p\\u0000"\n',
    "an unclosed IPv6 host": DEPLOYMENT.replace("127.0.0.1:1", "[::1"),
    "a port out of range": DEPLOYMENT.replace("127.0.0.1:1", "127.0.0.1:99999"),
    "an infinite weight": DEPLOYMENT + "weight = inf\n",
    "a header name with a newline": DEPLOYMENT + 'headers = { "a\\nb" = "x" }\n',
    "an unknown key with a newline": DEPLOYMENT + '"x\\ny" = 1\n',
    "a key name 10 KB long": DEPLOYMENT + '"' + "k" * 10_000 + '" = 1\n',
    "the key itself as key_env": f'{OPENAI}key_env = "{ENV_SECRET}"\n',
    "the key itself as key_file": f'{OPENAI}key_file = "{ENV_SECRET}"\n',
    "a key_env with a newline": '[[deployments]]\nname = "a"\nkind = "openai"\nkey_env = "A\\nB"\n',
}


def test_config_check_says_one_line_for_each_nasty_file(tmp_path: Path) -> None:
    for what, text in NASTY.items():
        path = tmp_path / "chatgate.toml"
        path.write_text(text)
        check(path, {})
        done = subprocess.run(
            [sys.executable, "-m", "chatgate_server", "config", "check", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            env={"PATH": "/usr/bin:/bin"},
        )
        assert done.returncode == 2 and done.stdout == "", (what, done)
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("chatgate: configuration error: "), (what, done.stderr)
        assert ENV_SECRET not in done.stderr, what
