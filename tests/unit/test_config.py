"""The OpenAI key from the environment: taken as given when sane, refused (without being
echoed) when it could not go into an HTTP header."""

from __future__ import annotations

import pytest

from chatgate_server.config import ConfigError, Settings

BASE = {"DATABASE_URL": "postgresql://127.0.0.1/x"}


def test_a_normal_key_is_taken_and_masked() -> None:
    settings = Settings.from_env({**BASE, "OPENAI_API_KEY": "sk-proj-AbC123_xyz"})
    assert settings.openai_api_key.value == "sk-proj-AbC123_xyz"
    assert "AbC123" not in repr(settings)


@pytest.mark.parametrize(
    "key",
    [
        "sk-has space-SECRETPART",
        "sk-tab\tSECRETPART",
        "sk-ctrl\x01SECRETPART",
        "sk-é-SECRETPART",
        "sk-\x7fSECRETPART",
    ],
)
def test_a_key_that_cannot_be_a_header_is_refused_without_echoing_it(key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**BASE, "OPENAI_API_KEY": key})
    assert "SECRETPART" not in str(caught.value)
    assert "OPENAI_API_KEY" in str(caught.value)


def test_the_request_bytes_budget_must_hold_one_largest_request() -> None:
    env = {**BASE, "OPENAI_API_KEY": "sk-x", "CHATGATE_MAX_REQUEST_BYTES": str(8 * 1024 * 1024)}
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**env, "CHATGATE_MAX_REQUEST_MB_IN_FLIGHT": "4"})
    assert "CHATGATE_MAX_REQUEST_MB_IN_FLIGHT" in str(caught.value)
    settings = Settings.from_env({**env, "CHATGATE_MAX_REQUEST_MB_IN_FLIGHT": "8"})
    assert settings.max_request_bytes_in_flight == 8 * 1024 * 1024


def test_breaker_window_and_rate() -> None:
    env = {**BASE, "OPENAI_API_KEY": "sk-x"}
    settings = Settings.from_env(env)
    assert (settings.breaker_window_s, settings.breaker_failure_rate) == (10.0, 0.5)
    tuned = Settings.from_env(
        {**env, "CHATGATE_BREAKER_WINDOW_SECONDS": "30", "CHATGATE_BREAKER_FAILURE_RATE": "0.25"}
    )
    assert (tuned.breaker_window_s, tuned.breaker_failure_rate) == (30.0, 0.25)
    for name, bad in (("CHATGATE_BREAKER_FAILURE_RATE", "1.5"), ("CHATGATE_BREAKER_WINDOW_SECONDS", "0")):
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({**env, name: bad})


def test_connection_age_defaults_outlast_the_deadline_cap() -> None:
    settings = Settings.from_env({**BASE, "OPENAI_API_KEY": "sk-x", "CHATGATE_DEADLINE_CAP_SECONDS": "30"})
    assert settings.max_connection_age_s == 300
    assert settings.max_connection_age_grace_s == 40  # the cap + 10 s: no stream is cut
    assert settings.health_listen is None


def test_connection_age_zero_means_never_and_a_short_grace_is_refused() -> None:
    env = {**BASE, "OPENAI_API_KEY": "sk-x"}
    assert Settings.from_env({**env, "CHATGATE_MAX_CONNECTION_AGE_SECONDS": "0"}).max_connection_age_s is None
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**env, "CHATGATE_MAX_CONNECTION_AGE_GRACE_SECONDS": "30"})
    assert "CHATGATE_MAX_CONNECTION_AGE_GRACE_SECONDS" in str(caught.value)


def test_health_listen_is_parsed_and_checked() -> None:
    env = {**BASE, "OPENAI_API_KEY": "sk-x"}
    settings = Settings.from_env({**env, "CHATGATE_HEALTH_LISTEN": "0.0.0.0:8081"})
    assert str(settings.health_listen) == "0.0.0.0:8081"
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**env, "CHATGATE_HEALTH_LISTEN": "8081"})
    assert "CHATGATE_HEALTH_LISTEN" in str(caught.value)
