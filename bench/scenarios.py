"""The benchmark's scenarios: what load, against which targets, for how long.

Targets: ``direct`` (the upstream itself, through the cheapest HTTP client: the floor
for time to first event), ``relay`` (the minimal grpc.aio → httpx relay),
``ceiling`` (grpc.aio writing the same messages with no upstream) and ``chatgate``.
Every scenario runs its targets one after another in the same invocation, against
the same upstream, so ratios between them hold on a noisy machine.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

# chatgate with one setting changed, measured beside the default configuration.
# chatgate-1msg relays one message per upstream chunk, as the minimal relay does: the
# like-for-like comparison of the hot path, with delta coalescing (which the default
# has on, and which writes fewer messages when chunks arrive together) taken out.
# chatgate (and chatgate-1msg) authenticate every call, as deployed: the load carries a
# caller's token on each call. chatgate-noauth (CHATGATE_AUTH=off) is the same server
# without it: the difference is what authentication costs per call.
VARIANTS: dict[str, dict[str, str]] = {
    "chatgate-1msg": {"CHATGATE_COALESCE_DELTAS": "false"},
    "chatgate-noauth": {"CHATGATE_AUTH": "off"},
    # chatgate-2dep routes every call by weight across two deployments (a chatgate.toml
    # written at start, both on the same simulator): what the router costs against one.
    "chatgate-2dep": {},
}
TWO_DEPLOYMENTS = "chatgate-2dep"
# Targets that are a chatgate server loaded differently: chatgate-ids sends a fresh
# caller-supplied request_id on every call (chatgate reserves each in Postgres before
# serving; with none it generates ids and skips that), against the same server.
CALLER_ID_TARGETS: dict[str, str] = {"chatgate-ids": "chatgate"}
# chatgate-limits calls the same server as a caller of another tenant with three limits,
# far above the load (so every call is admitted and pays for finding, reserving and
# settling them): the tenant's requests per minute, and each user's tokens per day and
# concurrent streams. chatgate-limits8 is held to eight: every kind that needs no price
# (requests and tokens per minute, tokens per day, streams) on the tenant and each user.
LIMITED_TARGETS: dict[str, str] = {"chatgate-limits": "chatgate", "chatgate-limits8": "chatgate"}


def server_of(target: str) -> str:
    """The server a target's load goes to."""
    return CALLER_ID_TARGETS.get(target) or LIMITED_TARGETS.get(target, target)


_WITH_1MSG = ("direct", "relay", "chatgate-1msg", "chatgate")
_IDLE = ("direct", "relay", "ceiling", "chatgate-1msg", "chatgate")


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    concurrency: int
    chunks: int
    delay_ms: int = 0
    targets: tuple[str, ...] = ("direct", "relay", "chatgate")
    duration_s: float = 6.0
    warmup_s: float = 2.0
    ramp_s: float = 0.0
    # Slow consumer: the caller sleeps this long after each message.
    read_delay_ms: float = 0.0
    # Extra simulator scenario keys appended to the model suffix.
    extra: str = ""
    # Restart the server before measuring it, so RSS per stream starts from a clean process.
    fresh: bool = False
    # Rounds for this scenario (None: the suite's --rounds).
    rounds: int | None = None

    @property
    def model(self) -> str:
        spec = f"chunks={self.chunks},delay_ms={self.delay_ms}"
        if self.extra:
            spec += "," + self.extra
        return f"gpt-4o-mini::{spec}"

    @property
    def slow_consumer(self) -> bool:
        return self.read_delay_ms > 0


FULL: tuple[Scenario, ...] = (
    Scenario(
        "short",
        "20 chunks per stream, concurrency 8",
        8,
        20,
        targets=(
            "direct",
            "relay",
            "ceiling",
            "chatgate-1msg",
            "chatgate-noauth",
            "chatgate-2dep",
            "chatgate",
        ),
    ),
    Scenario(
        "long",
        "200 chunks per stream, concurrency 8",
        8,
        200,
        targets=("direct", "relay", "ceiling", "chatgate-1msg", "chatgate"),
    ),
    Scenario("idle", "concurrency 1: latency added when idle", 1, 20, duration_s=10.0, targets=_IDLE),
    Scenario(
        "request-ids",
        "20 chunks per stream, concurrency 8: with and without caller-supplied request ids",
        8,
        20,
        targets=("relay", "chatgate", "chatgate-ids"),
    ),
    Scenario("saturation", "concurrency 32, 50 chunks", 32, 50, targets=_WITH_1MSG),
    Scenario(
        "limits",
        "concurrency 32, 20 chunks: one hot tenant and its users with limits on vs off",
        32,
        20,
        targets=("direct", "chatgate", "chatgate-limits", "chatgate-limits8"),
    ),
    Scenario(
        "limits-idle",
        "concurrency 1, 20 chunks: latency limits add when idle",
        1,
        20,
        duration_s=8.0,
        targets=("direct", "chatgate", "chatgate-limits"),
    ),
    Scenario(
        "paced",
        "50 open streams of 50 chunks, 20 ms apart (what one core holds in real time)",
        50,
        50,
        delay_ms=20,
        duration_s=8.0,
        warmup_s=3.0,
        fresh=True,
        targets=_WITH_1MSG,
    ),
    Scenario(
        "slow",
        "2,000 open streams of 50 chunks, 20 ms apart",
        2000,
        50,
        delay_ms=20,
        duration_s=10.0,
        warmup_s=6.0,
        ramp_s=2.0,
        fresh=True,
        rounds=1,
        targets=_WITH_1MSG,
    ),
    Scenario(
        "slow-consumer",
        "50 callers read one event per 50 ms of a 100,000-chunk stream sent as fast as TCP allows",
        50,
        100_000,
        targets=("relay", "chatgate"),
        read_delay_ms=50.0,
        fresh=True,
        rounds=1,
        duration_s=10.0,
        warmup_s=2.0,
        # headers_delay_ms makes the simulator send chunk by chunk, pausing when the
        # socket pushes back (its one-write fast path would hand the kernel everything).
        extra="headers_delay_ms=1",
    ),
)

# Seconds, not minutes: proves the suite works (the smoke test), measures nothing.
QUICK_OVERRIDES = {
    "short": {"duration_s": 1.0, "warmup_s": 0.3},
    "long": {"duration_s": 1.0, "warmup_s": 0.3},
    "idle": {"duration_s": 1.0, "warmup_s": 0.3},
    "request-ids": {"duration_s": 1.0, "warmup_s": 0.3},
    "saturation": {"duration_s": 1.0, "warmup_s": 0.3},
    "limits": {"duration_s": 1.0, "warmup_s": 0.3},
    "limits-idle": {"duration_s": 1.0, "warmup_s": 0.3},
    "paced": {"duration_s": 1.0, "warmup_s": 1.0},
    "slow": {"duration_s": 1.5, "warmup_s": 1.0, "concurrency": 100, "ramp_s": 0.0},
    "slow-consumer": {"duration_s": 1.5, "warmup_s": 0.5, "concurrency": 5, "chunks": 20_000},
}


def select(names: list[str] | None, *, quick: bool) -> list[Scenario]:
    """The scenarios to run, in the suite's order; unknown names are an error."""
    known = {s.name: s for s in FULL}
    unknown = [n for n in names or () if n not in known]
    if unknown:
        raise SystemExit(f"bench: unknown scenario(s) {', '.join(unknown)}; known: {', '.join(known)}")
    chosen = [s for s in FULL if names is None or s.name in names]
    if quick:
        chosen = [replace(s, **QUICK_OVERRIDES.get(s.name, {})) for s in chosen]  # type: ignore[arg-type]
    return chosen
