"""The abuse detector's knobs (``CHATGATE_ANOMALY_*``), read once at start-up.

Each field's docstring names its variable and default; README's "Blocks and abuse
detection" section explains the rules they tune (limits/anomaly_rules.py applies them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

WINDOW = timedelta(hours=1)
"""Usage spikes and fan-out look at the last hour."""
BURST_WINDOW = timedelta(minutes=5)
"""Refusal bursts look at the last five minutes."""
ESCALATION_MEMORY = timedelta(hours=24)
"""With ``--escalate block``, a subject the detector already acted on within this long is
blocked; otherwise it is tightened first."""
MAX_FINDINGS_PER_RUN = 100
"""A storm (a bad deploy refusing every caller) is recorded in bounded runs."""


class AnomalySettingError(ValueError):
    """A ``CHATGATE_ANOMALY_*`` variable is malformed; the message names it."""


@dataclass(frozen=True, slots=True)
class DetectorSettings:
    enabled: bool = True
    """CHATGATE_ANOMALY_DETECTOR: run the abuse detector in this process (default true)."""
    interval_s: float = 60.0
    """CHATGATE_ANOMALY_INTERVAL_SECONDS: how often it looks (default 60); with several
    processes, one run per interval acts."""
    spike_factor: float = 10.0
    """CHATGATE_ANOMALY_SPIKE_FACTOR: a user's last hour is a spike above this many times
    their mean hourly tokens or spend over the baseline days (default 10)."""
    baseline_days: int = 7
    """CHATGATE_ANOMALY_BASELINE_DAYS: whole UTC days before today that make the baseline (default 7)."""
    token_floor: int = 200_000
    """CHATGATE_ANOMALY_TOKEN_FLOOR: tokens in an hour below which nothing is a spike (default 200000)."""
    spend_floor_micros: int = 5_000_000
    """CHATGATE_ANOMALY_SPEND_FLOOR_USD: spend in an hour below which nothing is a spike (default 5)."""
    refusal_burst: int = 300
    """CHATGATE_ANOMALY_REFUSAL_BURST: refused or invalid calls of one caller within five
    minutes that make a burst (default 300)."""
    new_users: int = 100
    """CHATGATE_ANOMALY_NEW_USERS: user ids new to the tenant that one caller brings in an
    hour that make a fan-out (default 100)."""
    cooldown_s: float = 3600.0
    """CHATGATE_ANOMALY_COOLDOWN_SECONDS: a subject found by a rule is not found by it again
    for this long (default 3600, the window: the next finding is about new usage)."""
    flush_s: float = 10.0
    """CHATGATE_ANOMALY_FLUSH_SECONDS: how often this process writes its counts of calls
    refused at the edge (default 10)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> DetectorSettings:
        d = cls()
        spend = _number(env, "CHATGATE_ANOMALY_SPEND_FLOOR_USD", d.spend_floor_micros / 1e6, minimum=0)
        return cls(
            enabled=_flag(env, "CHATGATE_ANOMALY_DETECTOR", d.enabled),
            interval_s=_number(env, "CHATGATE_ANOMALY_INTERVAL_SECONDS", d.interval_s, minimum=0.1),
            spike_factor=_number(env, "CHATGATE_ANOMALY_SPIKE_FACTOR", d.spike_factor, minimum=1),
            baseline_days=int(
                _number(env, "CHATGATE_ANOMALY_BASELINE_DAYS", d.baseline_days, minimum=1, whole=True)
            ),
            token_floor=int(
                _number(env, "CHATGATE_ANOMALY_TOKEN_FLOOR", d.token_floor, minimum=0, whole=True)
            ),
            spend_floor_micros=round(spend * 1_000_000),
            refusal_burst=int(
                _number(env, "CHATGATE_ANOMALY_REFUSAL_BURST", d.refusal_burst, minimum=1, whole=True)
            ),
            new_users=int(_number(env, "CHATGATE_ANOMALY_NEW_USERS", d.new_users, minimum=1, whole=True)),
            cooldown_s=_number(env, "CHATGATE_ANOMALY_COOLDOWN_SECONDS", d.cooldown_s, minimum=0),
            flush_s=_number(env, "CHATGATE_ANOMALY_FLUSH_SECONDS", d.flush_s, minimum=0.1),
        )


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise AnomalySettingError(f"{name}: {raw!r} is not true or false")


def _number(
    env: Mapping[str, str], name: str, default: float, *, minimum: float, whole: bool = False
) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        raise AnomalySettingError(
            f"{name}: {raw!r} is not {'a whole number' if whole else 'a number'}"
        ) from None
    if not math.isfinite(value) or value < minimum:
        raise AnomalySettingError(f"{name}: must be a number >= {minimum:g}")
    return value
