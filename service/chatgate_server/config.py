"""Settings, read once from the environment and validated at start-up.

Conventional names where they exist (``OPENAI_API_KEY``, ``OPENAI_BASE_URL``,
``DATABASE_URL``, ``OTEL_*``), ``CHATGATE_*`` for the rest. A missing or malformed
value raises :class:`ConfigError` naming the variable; the CLI prints that one line
and exits non-zero.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from chatgate_server.limits.anomaly_settings import AnomalySettingError, DetectorSettings

DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"


class ConfigError(Exception):
    """A setting is missing or malformed. The message names the variable."""


@dataclass(frozen=True, slots=True)
class Secret:
    """A string that never prints itself: repr/str show only that it is set."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the service reads from its environment."""

    openai_api_key: Secret
    """OPENAI_API_KEY, or the contents of the file named by OPENAI_API_KEY_FILE; required
    unless CHATGATE_CONFIG names the deployments (then unused, and empty when unset)."""
    openai_base_url: str
    """OPENAI_BASE_URL: the API root including /v1 (the OpenAI SDK's convention)."""
    database_url: str
    """DATABASE_URL: a libpq URL or conninfo for the usage ledger."""
    listen: ListenAddress
    """CHATGATE_LISTEN: host:port to serve gRPC on (default 0.0.0.0:50051)."""
    deadline_cap_s: float
    """CHATGATE_DEADLINE_CAP_SECONDS: the longest any call may take (default 60)."""
    shutdown_grace_s: float
    """CHATGATE_SHUTDOWN_GRACE_SECONDS: how long running streams may finish after SIGTERM."""
    migrate_on_start: bool
    """CHATGATE_MIGRATE_ON_START: apply pending migrations when serve starts (default false)."""
    max_concurrent_streams: int
    """CHATGATE_MAX_CONCURRENT_STREAMS: Complete calls beyond this get RESOURCE_EXHAUSTED
    (CONCURRENCY_LIMIT, with RetryInfo); health, reflection and UsageService do not count."""
    max_health_watches: int
    """CHATGATE_MAX_HEALTH_WATCHES: open health Watch streams on this process (default 1024)."""
    max_health_watches_per_connection: int
    """CHATGATE_MAX_HEALTH_WATCHES_PER_CONNECTION: open health Watch streams per connection (default 16)."""
    max_request_bytes_in_flight: int
    """CHATGATE_MAX_REQUEST_MB_IN_FLIGHT: request bytes held by running calls (default 64 MB); a
    call that would go over gets RESOURCE_EXHAUSTED (REQUEST_BYTES_LIMIT, with RetryInfo)."""
    upstream_connect_timeout_s: float
    """CHATGATE_UPSTREAM_CONNECT_TIMEOUT_SECONDS: TCP+TLS connect limit per attempt."""
    upstream_max_connections: int
    """CHATGATE_UPSTREAM_MAX_CONNECTIONS: size of the upstream HTTP connection pool (default 4096).

    HTTP/1.1 holds one connection per stream, so a pool smaller than
    CHATGATE_MAX_CONCURRENT_STREAMS makes the calls beyond it wait for a connection."""
    upstream_first_byte_timeout_s: float
    """CHATGATE_UPSTREAM_FIRST_BYTE_TIMEOUT_SECONDS: an attempt with no first event by then is retried."""
    coalesce_deltas: bool
    """CHATGATE_COALESCE_DELTAS: relay the text deltas already in hand together as one
    message (default true); false relays one message per upstream chunk."""
    retry_max_attempts: int
    """CHATGATE_RETRY_MAX_ATTEMPTS: upstream attempts per call, the first included (default 3)."""
    retry_base_s: float
    """CHATGATE_RETRY_BASE_SECONDS: first backoff ceiling; doubles per attempt (default 0.5)."""
    retry_cap_s: float
    """CHATGATE_RETRY_CAP_SECONDS: largest backoff ceiling (default 8)."""
    breaker_failure_threshold: int
    """CHATGATE_BREAKER_FAILURE_THRESHOLD: failed calls within the window that open the breaker,
    when they are also CHATGATE_BREAKER_FAILURE_RATE of the calls seen (default 5)."""
    breaker_window_s: float
    """CHATGATE_BREAKER_WINDOW_SECONDS: the sliding window the breaker counts calls over (default 10)."""
    breaker_failure_rate: float
    """CHATGATE_BREAKER_FAILURE_RATE: the share of calls (ended in the window or running) that
    must have failed to open the breaker, from 0 to 1 (default 0.5)."""
    breaker_cooldown_s: float
    """CHATGATE_BREAKER_COOLDOWN_SECONDS: first open period; doubles on each reopen (default 30)."""
    breaker_max_cooldown_s: float
    """CHATGATE_BREAKER_MAX_COOLDOWN_SECONDS: longest open period (default 300)."""
    ledger_queue_size: int
    """CHATGATE_LEDGER_QUEUE_SIZE: usage rows held in memory awaiting the writer."""
    ledger_batch_size: int
    """CHATGATE_LEDGER_BATCH_SIZE: most rows written in one insert."""
    ledger_write_timeout_s: float
    """CHATGATE_LEDGER_WRITE_TIMEOUT_SECONDS: longest one insert or probe may take, connection
    included, before it counts as failed (default 5); its rows are spooled sooner, see below."""
    ledger_spool_after_s: float
    """CHATGATE_LEDGER_SPOOL_AFTER_SECONDS: how long Postgres may leave a write unanswered before
    its rows go to the spool while it goes on (default 0.2): with the 50 ms batch linger, the
    longest a finished call's row is only in memory, i.e. what a kill -9 can lose."""
    ledger_retry_cap_s: float
    """CHATGATE_LEDGER_RETRY_CAP_SECONDS: longest pause between probes of an absent Postgres (default 30)."""
    spool_dir: Path
    """CHATGATE_SPOOL_DIR: where usage rows wait while Postgres is away (each process takes a
    slot in it); keep it on a persistent volume (default .chatgate/spool in the working directory)."""
    spool_max_bytes: int
    """CHATGATE_SPOOL_MAX_MB: the spool's size limit (default 1024 MB); queue and spool both
    full means new calls are refused."""
    request_id_window_h: float
    """CHATGATE_REQUEST_ID_WINDOW_HOURS: how long a caller-supplied request_id stays taken (default 24)."""
    log_level: str
    """CHATGATE_LOG_LEVEL: DEBUG, INFO, WARNING or ERROR (default INFO)."""
    log_format: str
    """CHATGATE_LOG_FORMAT: json (one object per line, with trace ids; default) or text."""
    max_request_bytes: int
    """CHATGATE_MAX_REQUEST_BYTES: largest CompleteRequest accepted (default 4 MiB)."""
    allowed_models: tuple[str, ...] | None
    """CHATGATE_ALLOWED_MODELS: comma-separated model names or globs (gpt-4o*); unset allows all."""
    auth: str = "tokens"
    """CHATGATE_AUTH: ``tokens`` (default) authenticates every ChatService and UsageService call
    by a bearer token, or by a client certificate when CHATGATE_TLS_CLIENT_CA_FILE is set;
    ``off`` lets anyone call as the anonymous caller (local work only: logged as a warning)."""
    tls_cert_file: Path | None = None
    """CHATGATE_TLS_CERT_FILE: the server's certificate chain (PEM); with the key, serve TLS."""
    tls_key_file: Path | None = None
    """CHATGATE_TLS_KEY_FILE: the server's private key (PEM)."""
    tls_client_ca_file: Path | None = None
    """CHATGATE_TLS_CLIENT_CA_FILE: CA bundle for client certificates: set, every connection
    must present a certificate it signed (mTLS). Requires CHATGATE_TLS_CERT_FILE."""
    reflection: bool = True
    """CHATGATE_REFLECTION: serve gRPC reflection (default true; false: not registered)."""
    config_file: Path | None = None
    """CHATGATE_CONFIG: a TOML file (chatgate.toml) listing upstream deployments and routes
    (deployments.py); unset, one deployment from OPENAI_BASE_URL and OPENAI_API_KEY."""
    config_poll_s: float = 2.0
    """CHATGATE_CONFIG_POLL_SECONDS: how often CHATGATE_CONFIG is checked for a change, which
    reloads it as SIGHUP does (default 2; 0: only on SIGHUP)."""
    prices_file: Path | None = None
    """CHATGATE_PRICES_FILE: the operator's price table (the shipped usage/prices.csv's format);
    its rows replace the shipped rows of every model it names. Unset: the shipped table alone."""
    health_listen: ListenAddress | None = None
    """CHATGATE_HEALTH_LISTEN: host:port of a second, plaintext listener serving only
    grpc.health.v1 (the same statuses as the main port), for probes that cannot present a
    client certificate (kubelet's gRPC probes under mTLS). Unset: no second listener."""
    max_connection_age_s: float | None = 300.0
    """CHATGATE_MAX_CONNECTION_AGE_SECONDS: after about this long (gRPC adds ±10 % jitter) a
    client connection gets a GOAWAY, so HTTP/2 clients reconnect and rebalance over the
    replicas (default 300; 0: never)."""
    max_connection_age_grace_s: float = 70.0
    """CHATGATE_MAX_CONNECTION_AGE_GRACE_SECONDS: how long the streams running on a connection
    past its age may still finish (default: the deadline cap + 10 s, so none is cut)."""
    database_transaction_pooling: bool = False
    """CHATGATE_DATABASE_TRANSACTION_POOLING: DATABASE_URL points at a transaction-mode pooler
    (PgBouncer ``pool_mode=transaction``): no server-side prepared statements and no session
    settings on any connection (default false)."""
    anomaly: DetectorSettings = field(default_factory=DetectorSettings)
    """CHATGATE_ANOMALY_*: the abuse detector's knobs (limits/anomaly_settings.py)."""
    limits_max_completion_tokens: int = 4096
    """CHATGATE_LIMITS_MAX_COMPLETION_TOKENS: when a token or spend limit applies to a call that
    set no max_completion_tokens, chatgate reserves this many output tokens and sends it upstream
    as the call's cap (default 4096), so a reservation is never unbounded."""
    limits_lease_ttl_s: float = 10.0
    """CHATGATE_LIMITS_LEASE_TTL_SECONDS: how long a process's slice of a shared budget or
    concurrency limit lasts unrenewed (default 10): a killed process's slice returns to the
    pool this long after its last renewal (docs/LIMITS.md)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        e = os.environ if env is None else env
        cert, key, client_ca = _tls(e)
        config_file = config_file_from_env(e)
        return cls(
            openai_api_key=_api_key(e, required=config_file is None),
            openai_base_url=_base_url(e),
            database_url=_required(e, "DATABASE_URL"),
            listen=_listen(e, "CHATGATE_LISTEN", "0.0.0.0:50051"),
            deadline_cap_s=float_setting(e, "CHATGATE_DEADLINE_CAP_SECONDS", 60.0, minimum=0.001),
            shutdown_grace_s=float_setting(e, "CHATGATE_SHUTDOWN_GRACE_SECONDS", 10.0, minimum=0),
            migrate_on_start=_flag(e, "CHATGATE_MIGRATE_ON_START", False),
            max_concurrent_streams=_int(e, "CHATGATE_MAX_CONCURRENT_STREAMS", 4096, minimum=1),
            max_health_watches=_int(e, "CHATGATE_MAX_HEALTH_WATCHES", 1024, minimum=1),
            max_health_watches_per_connection=_int(
                e, "CHATGATE_MAX_HEALTH_WATCHES_PER_CONNECTION", 16, minimum=1
            ),
            max_request_bytes_in_flight=_in_flight_budget(e),
            upstream_connect_timeout_s=float_setting(
                e, "CHATGATE_UPSTREAM_CONNECT_TIMEOUT_SECONDS", 5.0, minimum=0.001
            ),
            upstream_max_connections=_int(e, "CHATGATE_UPSTREAM_MAX_CONNECTIONS", 4096, minimum=1),
            upstream_first_byte_timeout_s=float_setting(
                e, "CHATGATE_UPSTREAM_FIRST_BYTE_TIMEOUT_SECONDS", 30.0, minimum=0.001
            ),
            coalesce_deltas=_flag(e, "CHATGATE_COALESCE_DELTAS", True),
            retry_max_attempts=_int(e, "CHATGATE_RETRY_MAX_ATTEMPTS", 3, minimum=1),
            retry_base_s=float_setting(e, "CHATGATE_RETRY_BASE_SECONDS", 0.5, minimum=0),
            retry_cap_s=float_setting(e, "CHATGATE_RETRY_CAP_SECONDS", 8.0, minimum=0),
            breaker_failure_threshold=_int(e, "CHATGATE_BREAKER_FAILURE_THRESHOLD", 5, minimum=1),
            breaker_window_s=float_setting(e, "CHATGATE_BREAKER_WINDOW_SECONDS", 10.0, minimum=0.001),
            breaker_failure_rate=_fraction(e, "CHATGATE_BREAKER_FAILURE_RATE", 0.5),
            breaker_cooldown_s=float_setting(e, "CHATGATE_BREAKER_COOLDOWN_SECONDS", 30.0, minimum=0),
            breaker_max_cooldown_s=float_setting(
                e, "CHATGATE_BREAKER_MAX_COOLDOWN_SECONDS", 300.0, minimum=0
            ),
            ledger_queue_size=_int(e, "CHATGATE_LEDGER_QUEUE_SIZE", 10000, minimum=1),
            ledger_batch_size=_int(e, "CHATGATE_LEDGER_BATCH_SIZE", 500, minimum=1),
            ledger_write_timeout_s=float_setting(
                e, "CHATGATE_LEDGER_WRITE_TIMEOUT_SECONDS", 5.0, minimum=0.01
            ),
            ledger_spool_after_s=float_setting(e, "CHATGATE_LEDGER_SPOOL_AFTER_SECONDS", 0.2, minimum=0.01),
            ledger_retry_cap_s=float_setting(e, "CHATGATE_LEDGER_RETRY_CAP_SECONDS", 30.0, minimum=0.01),
            spool_dir=spool_dir_from_env(e),
            spool_max_bytes=_int(e, "CHATGATE_SPOOL_MAX_MB", 1024, minimum=1) * 1024 * 1024,
            request_id_window_h=request_id_window_from_env(e),
            log_level=_choice(e, "CHATGATE_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
            log_format=_choice(e, "CHATGATE_LOG_FORMAT", "JSON", ("JSON", "TEXT")).lower(),
            max_request_bytes=_int(e, "CHATGATE_MAX_REQUEST_BYTES", 4 * 1024 * 1024, minimum=1024),
            allowed_models=_list(e, "CHATGATE_ALLOWED_MODELS"),
            config_file=config_file,
            config_poll_s=float_setting(e, "CHATGATE_CONFIG_POLL_SECONDS", 2.0, minimum=0),
            prices_file=prices_file_from_env(e),
            auth=_choice(e, "CHATGATE_AUTH", "TOKENS", ("TOKENS", "OFF")).lower(),
            tls_cert_file=cert,
            tls_key_file=key,
            tls_client_ca_file=client_ca,
            reflection=_flag(e, "CHATGATE_REFLECTION", True),
            health_listen=_optional_listen(e, "CHATGATE_HEALTH_LISTEN"),
            max_connection_age_s=_connection_age(e),
            max_connection_age_grace_s=_connection_age_grace(e),
            database_transaction_pooling=_flag(e, "CHATGATE_DATABASE_TRANSACTION_POOLING", False),
            anomaly=_anomaly(e),
            limits_max_completion_tokens=_int(e, "CHATGATE_LIMITS_MAX_COMPLETION_TOKENS", 4096, minimum=1),
            limits_lease_ttl_s=float_setting(e, "CHATGATE_LIMITS_LEASE_TTL_SECONDS", 10.0, minimum=1.0),
        )

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None


def _anomaly(env: Mapping[str, str]) -> DetectorSettings:
    try:
        return DetectorSettings.from_env(env)
    except AnomalySettingError as exc:
        raise ConfigError(str(exc)) from None


def prices_file_from_env(env: Mapping[str, str] | None = None) -> Path | None:
    """CHATGATE_PRICES_FILE, checked by reading it: a bad file stops start-up (and
    ``usage-reprice``) with the line at fault, rather than pricing calls wrongly."""
    from chatgate_server.usage.pricing import PriceFileError, read_operator_file

    raw = (os.environ if env is None else env).get("CHATGATE_PRICES_FILE", "").strip()
    if not raw:
        return None
    try:
        read_operator_file(Path(raw))
    except PriceFileError as exc:
        raise ConfigError(f"CHATGATE_PRICES_FILE: {exc}") from None
    return Path(raw)


def config_file_from_env(env: Mapping[str, str] | None = None) -> Path | None:
    """CHATGATE_CONFIG, checked by loading it: a bad file stops start-up with one line
    naming the file, the key and the problem."""
    from chatgate_server.deployments import load_config

    e = os.environ if env is None else env
    raw = e.get("CHATGATE_CONFIG", "").strip()
    if not raw:
        return None
    load_config(Path(raw), e)
    return Path(raw)


def retention_months_from_env(env: Mapping[str, str] | None = None) -> int:
    """CHATGATE_USAGE_RETENTION_MONTHS: whole months of usage rows kept before the current
    one by ``chatgate usage-retention`` (default 13: a year plus the month it started)."""
    return _int(os.environ if env is None else env, "CHATGATE_USAGE_RETENTION_MONTHS", 13, minimum=1)


def request_id_window_from_env(env: Mapping[str, str] | None = None) -> float:
    """CHATGATE_REQUEST_ID_WINDOW_HOURS alone, for ``chatgate usage-retention`` (which
    deletes request-id reservations older than it)."""
    return float_setting(
        os.environ if env is None else env, "CHATGATE_REQUEST_ID_WINDOW_HOURS", 24.0, minimum=0.001
    )


def database_url_from_env(env: Mapping[str, str] | None = None) -> str:
    """DATABASE_URL alone, for commands (migrate, usage) that need nothing else."""
    return _required(os.environ if env is None else env, "DATABASE_URL")


def _tls(env: Mapping[str, str]) -> tuple[Path | None, Path | None, Path | None]:
    """The three TLS files: cert and key together, the client CA only with them; each
    must be readable now (a typo should stop start-up, not every handshake)."""
    names = ("CHATGATE_TLS_CERT_FILE", "CHATGATE_TLS_KEY_FILE", "CHATGATE_TLS_CLIENT_CA_FILE")
    cert, key, ca = (env.get(name, "").strip() or None for name in names)
    if (cert is None) != (key is None):
        raise ConfigError("CHATGATE_TLS_CERT_FILE and CHATGATE_TLS_KEY_FILE must be set together")
    if ca is not None and cert is None:
        raise ConfigError(
            "CHATGATE_TLS_CLIENT_CA_FILE requires CHATGATE_TLS_CERT_FILE and CHATGATE_TLS_KEY_FILE"
        )
    for name, value in zip(names, (cert, key, ca), strict=True):
        if value is None:
            continue
        try:
            with Path(value).open("rb") as f:
                if not f.read(1):
                    raise ConfigError(f"{name} names an empty file")
        except OSError as exc:
            raise ConfigError(f"{name} cannot be read: {exc.strerror}") from None
    return (Path(cert) if cert else None, Path(key) if key else None, Path(ca) if ca else None)


def _in_flight_budget(env: Mapping[str, str]) -> int:
    budget = _int(env, "CHATGATE_MAX_REQUEST_MB_IN_FLIGHT", 64, minimum=1) * 1024 * 1024
    if budget < _int(env, "CHATGATE_MAX_REQUEST_BYTES", 4 * 1024 * 1024, minimum=1024):
        # A request that is allowed must be able to run alone.
        raise ConfigError("CHATGATE_MAX_REQUEST_MB_IN_FLIGHT must hold at least CHATGATE_MAX_REQUEST_BYTES")
    return budget


def spool_dir_from_env(env: Mapping[str, str] | None = None) -> Path:
    """CHATGATE_SPOOL_DIR alone, for ``chatgate usage-dead-letters``."""
    e = os.environ if env is None else env
    return Path(e.get("CHATGATE_SPOOL_DIR", "").strip() or ".chatgate/spool")


def _optional_listen(env: Mapping[str, str], name: str) -> ListenAddress | None:
    return _listen(env, name, "") if env.get(name, "").strip() else None


def _connection_age(env: Mapping[str, str]) -> float | None:
    age = float_setting(env, "CHATGATE_MAX_CONNECTION_AGE_SECONDS", 300.0, minimum=0)
    return age or None


def _connection_age_grace(env: Mapping[str, str]) -> float:
    """The grace must outlast the longest stream: a shorter one would cut streams that
    are still within their deadline, which connection recycling must never do."""
    cap = float_setting(env, "CHATGATE_DEADLINE_CAP_SECONDS", 60.0, minimum=0.001)
    grace = float_setting(env, "CHATGATE_MAX_CONNECTION_AGE_GRACE_SECONDS", cap + 10.0, minimum=0)
    if grace < cap:
        raise ConfigError(
            "CHATGATE_MAX_CONNECTION_AGE_GRACE_SECONDS must be at least CHATGATE_DEADLINE_CAP_SECONDS "
            f"({cap:g}), or streams still within their deadline would be cut; got {grace:g}"
        )
    return grace


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise ConfigError(f"{name} is not set")
    return value


def _api_key(env: Mapping[str, str], *, required: bool = True) -> Secret:
    key = env.get("OPENAI_API_KEY", "").strip()
    key_file = env.get("OPENAI_API_KEY_FILE", "").strip()
    if key and key_file:
        raise ConfigError("OPENAI_API_KEY and OPENAI_API_KEY_FILE are both set; set one")
    if key_file:
        try:
            key = Path(key_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"OPENAI_API_KEY_FILE cannot be read: {exc.strerror}") from None
        if not key:
            raise ConfigError("OPENAI_API_KEY_FILE names an empty file")
    if not key:
        if not required:
            return Secret("")
        raise ConfigError("OPENAI_API_KEY is not set (or set OPENAI_API_KEY_FILE, or CHATGATE_CONFIG)")
    if not (key.isascii() and key.isprintable()) or any(c.isspace() for c in key):
        # It goes into an HTTP header verbatim: anything else would fail every call, in
        # an HTTP library error that may quote the header. Never echo the value: it is a
        # secret even when malformed.
        raise ConfigError("OPENAI_API_KEY must be printable ASCII with no whitespace")
    return Secret(key)


def _base_url(env: Mapping[str, str]) -> str:
    raw = env.get("OPENAI_BASE_URL", "").strip() or DEFAULT_OPENAI_BASE_URL
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"OPENAI_BASE_URL must be an http(s) URL such as {DEFAULT_OPENAI_BASE_URL}")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigError("OPENAI_BASE_URL must not carry credentials, a query or a fragment")
    return raw.rstrip("/")


def _listen(env: Mapping[str, str], name: str, default: str) -> ListenAddress:
    raw = env.get(name, "").strip() or default
    host, sep, port_text = raw.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{name} must be host:port (e.g. 0.0.0.0:50051), got {raw!r}")
    return ListenAddress(host, int(port_text))


def float_setting(
    env: Mapping[str, str], name: str, default: float, *, minimum: float, maximum: float = math.inf
) -> float:
    """The number in ``env[name]`` (``default`` when unset or blank), or ConfigError
    naming the variable when it is not a number within [minimum, maximum]."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not value >= minimum:  # also rejects NaN
        raise ConfigError(f"{name} must be at least {minimum:g}, got {raw!r}")
    if value > maximum:
        raise ConfigError(f"{name} must be at most {maximum:g}, got {raw!r}")
    return value


def _fraction(env: Mapping[str, str], name: str, default: float) -> float:
    value = float_setting(env, name, default, minimum=0)
    if value > 1:
        raise ConfigError(f"{name} must be between 0 and 1, got {value:g}")
    return value


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {raw!r}")
    return value


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...] | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    items = tuple(item.strip() for item in raw.split(",") if item.strip())
    if not items:
        raise ConfigError(f"{name} must list at least one model (or be unset)")
    return items


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = env.get(name, "").strip().upper() or default
    if raw not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {raw!r}")
    return raw
