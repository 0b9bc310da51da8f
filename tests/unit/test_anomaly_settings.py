"""The detector's settings from the environment: defaults, values, and one clear error."""

from __future__ import annotations

import pytest

from chatgate_server.config import ConfigError, Settings
from chatgate_server.limits.anomaly_settings import DetectorSettings

BASE = {"OPENAI_API_KEY": "sk-test", "DATABASE_URL": "postgresql://localhost/x"}


def test_defaults_when_unset() -> None:
    assert Settings.from_env(BASE).anomaly == DetectorSettings()


def test_values_are_read() -> None:
    settings = Settings.from_env(
        {
            **BASE,
            "CHATGATE_ANOMALY_DETECTOR": "false",
            "CHATGATE_ANOMALY_INTERVAL_SECONDS": "15",
            "CHATGATE_ANOMALY_SPIKE_FACTOR": "4.5",
            "CHATGATE_ANOMALY_SPEND_FLOOR_USD": "0.25",
            "CHATGATE_ANOMALY_NEW_USERS": "40",
        }
    ).anomaly
    assert not settings.enabled
    assert (settings.interval_s, settings.spike_factor) == (15.0, 4.5)
    assert (settings.spend_floor_micros, settings.new_users) == (250_000, 40)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CHATGATE_ANOMALY_DETECTOR", "maybe"),
        ("CHATGATE_ANOMALY_SPIKE_FACTOR", "0.5"),
        ("CHATGATE_ANOMALY_BASELINE_DAYS", "1.5"),
        ("CHATGATE_ANOMALY_INTERVAL_SECONDS", "nan"),
    ],
)
def test_a_bad_value_stops_start_up_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({**BASE, name: value})
