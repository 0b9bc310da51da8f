"""The suite: start the upstream, the baselines and chatgate, run every scenario, report.

``python -m bench`` (or ``./bench/run``, which also sets up .venv and Postgres). It
prints a table and writes ``bench/results/<time>.json`` and ``bench/results/latest.json``.
Needs ``DATABASE_URL`` (a Postgres where it may create and drop a scratch database).
See docs/PERFORMANCE.md for what each figure means and the latest results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from bench import procstat, report
from bench.procs import ROOT, Pinning, Proc, child_env, free_port, plan_pinning, start
from bench.scenarios import (
    CALLER_ID_TARGETS,
    LIMITED_TARGETS,
    TWO_DEPLOYMENTS,
    VARIANTS,
    Scenario,
    select,
    server_of,
)

API_KEY = "sk-bench-not-a-real-key"


class Suite:
    """Owns the processes of one run."""

    def __init__(self, args: argparse.Namespace, stack: ExitStack, log_dir: Path) -> None:
        self.args = args
        self.stack = stack
        self.log_dir = log_dir
        self.pinning: Pinning = plan_pinning(not args.no_pin)
        self.env = child_env(pythonpath=args.chatgate_pythonpath)
        self.database_url = ""
        self.simulator: Proc | None = None
        self.upstream_url = ""
        self.otlp_url = ""
        self.servers: dict[str, tuple[Proc, str]] = {}
        self.token = ""  # the bench caller's; every call to chatgate carries it
        self.limited_tokens: dict[str, str] = {}  # callers of tenants with limits (LIMITED_TARGETS)

    # --- processes ------------------------------------------------------------------

    def start_simulator(self) -> None:
        proc = self._start(
            "simulator",
            ["-m", "chatgate_server.simulator", "--port", "0", "--record-limit", "2000"],
            cores=self.pinning.load,
        )
        self.simulator = proc
        self.upstream_url = proc.first_line.split()[-1]

    def start_otlp_sink(self) -> None:
        proc = self._start("otlp-sink", ["-m", "bench.otlp_sink", "--port", "0"], cores=self.pinning.load)
        self.otlp_url = proc.first_line.split()[-1]

    def tracing_env(self) -> dict[str, str]:
        """Tracing on and sampled, exported to the sink, as in production (empty: tracing off)."""
        if not self.otlp_url:
            return {}
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.otlp_url,
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": str(self.args.trace_sample),
        }

    def start_baseline(self, mode: str) -> None:
        proc = self._start(
            mode,
            ["-m", "bench.relay", "--mode", mode, "--port", "0", "--upstream", self.upstream_url],
            cores=self.pinning.server,
        )
        self.servers[mode] = (proc, proc.first_line.split()[-1])

    def start_chatgate(self, name: str, *, workers: int | None, pinned: bool) -> None:
        """``name`` is ``chatgate`` (as configured by default), a key of VARIANTS, or
        ``chatgate-<n>w``."""
        port = free_port()
        env = {
            "OPENAI_API_KEY": API_KEY,
            "OPENAI_BASE_URL": self.upstream_url,
            "DATABASE_URL": self.database_url,
            "CHATGATE_LISTEN": f"127.0.0.1:{port}",
            # INFO, as in production: one access-log line per call (to a file here).
            "CHATGATE_LOG_LEVEL": "INFO",
            "CHATGATE_SHUTDOWN_GRACE_SECONDS": "2",
            "CHATGATE_MAX_CONCURRENT_STREAMS": "10000",
            "CHATGATE_UPSTREAM_MAX_CONNECTIONS": "4096",
            **self.tracing_env(),
            **VARIANTS.get(name, {}),
        }
        if name == TWO_DEPLOYMENTS:
            env["CHATGATE_CONFIG"] = str(self._two_deployments())
        args = ["-m", "chatgate_server", "serve"]
        if workers is not None:
            args += ["--workers", str(workers)]
        proc = self._start(
            name,
            args,
            cores=self.pinning.server if pinned else None,
            env={**self.env, **env},
            wait_for_line=False,
        )
        target = f"127.0.0.1:{port}"
        _wait_healthy(proc, target)
        self.servers[name] = (proc, target)

    def _two_deployments(self) -> Path:
        path = self.log_dir / "chatgate-2dep.toml"
        entry = '[[deployments]]\nname = "{}"\nkind = "openai"\nbase_url = "{}"\nkey_env = "OPENAI_API_KEY"\n'
        path.write_text(entry.format("one", self.upstream_url) + entry.format("two", self.upstream_url))
        return path

    def restart(self, name: str) -> None:
        """A fresh server process: memory per stream is then measured from a clean start."""
        self.stop_server(name)
        if name in ("relay", "ceiling"):
            self.start_baseline(name)
        else:
            self.start_chatgate(name, workers=None, pinned=True)  # chatgate or a variant

    def stop_server(self, name: str) -> int | None:
        proc, _ = self.servers.pop(name)
        return proc.stop()

    def _start(
        self,
        name: str,
        args: list[str],
        *,
        cores: str | None,
        env: dict[str, str] | None = None,
        wait_for_line: bool = True,
    ) -> Proc:
        proc = start(
            name,
            args,
            cores=cores,
            pinning=self.pinning,
            env=env or self.env,
            log_dir=self.log_dir,
            wait_for_line=wait_for_line,
        )
        self.stack.callback(proc.stop)
        return proc

    # --- the database -----------------------------------------------------------------

    def create_database(self) -> None:
        admin = self.args.database_url
        name = f"chatgate_bench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.stack.callback(_drop_database, admin, name)
        params = conninfo_to_dict(admin)
        params["dbname"] = name
        self.database_url = make_conninfo(**params)  # type: ignore[arg-type]
        subprocess.run(
            [sys.executable, "-m", "chatgate_server", "migrate"],
            env={**self.env, "DATABASE_URL": self.database_url},
            check=True,
            capture_output=True,
        )
        # Before any chatgate starts, so every one has the caller in its table.
        self.token = subprocess.run(
            [
                sys.executable,
                "-m",
                "chatgate_server",
                "callers",
                "create",
                "--tenant",
                "bench",
                "--name",
                "loadgen",
            ],
            env={**self.env, "DATABASE_URL": self.database_url},
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    def limited_callers(self) -> dict[str, str]:
        """A caller per LIMITED_TARGETS target, each in a tenant of its own whose limits
        are far above any load; their tokens by target."""
        env = {**self.env, "DATABASE_URL": self.database_url}
        chatgate = [sys.executable, "-m", "chatgate_server"]
        huge = "1000000000000"
        three = {
            "tenant": ["--requests-per-minute", huge],
            "user": ["--tokens-per-day", huge, "--concurrent-streams", "1000000"],
        }
        every = ["--requests-per-minute", huge, "--tokens-per-minute", huge, "--tokens-per-day", huge,
                 "--concurrent-streams", "1000000"]  # fmt: skip
        limits = {"chatgate-limits": three, "chatgate-limits8": {"tenant": every, "user": every}}
        tokens = {}
        for target, sets in limits.items():
            tenant = f"bench-{target}"
            tokens[target] = subprocess.run(
                [*chatgate, "callers", "create", "--tenant", tenant, "--name", "loadgen"],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
            for scope, who in (("tenant", tenant), ("user", f"{tenant}/*")):
                cmd = [*chatgate, "limits", "set", scope, who, *sets[scope]]
                subprocess.run(cmd, env=env, check=True, capture_output=True)
        # Postgres counts calls of the lease functions: statements per admitted call.
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            name = conninfo_to_dict(self.database_url)["dbname"]
            conn.execute(f"ALTER DATABASE \"{name}\" SET track_functions = 'pl'")
        return tokens

    def limit_statements(self) -> int:
        """Calls of the limits' lease functions so far (pg_stat_user_functions)."""
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute("SELECT pg_stat_clear_snapshot()")
            row = conn.execute(
                "SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions WHERE funcname LIKE 'limit\\_%'"
            ).fetchone()
        return int(row[0]) if row else 0

    def pin_database_backends(self) -> int:
        """Move the Postgres backends serving the scratch database to the load core(s).

        Postgres is unpinned and would otherwise run the ledger's inserts on the
        server's core, taking its CPU away mid-measurement (in production it runs
        elsewhere). Only this run's backends are moved; the server is left alone.
        """
        if self.pinning.load is None:
            return 0
        cores = {int(c) for c in self.pinning.load.split(",")}
        name = conninfo_to_dict(self.database_url)["dbname"]
        with psycopg.connect(self.args.database_url, autocommit=True) as conn:
            rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (name,))
            pids = [r[0] for r in rows]
        moved = 0
        for pid in pids:
            try:
                os.sched_setaffinity(pid, cores)
                moved += 1
            except OSError:  # gone, or not ours to move
                pass
        return moved

    # --- load ---------------------------------------------------------------------------

    def load(
        self, scenario: Scenario, target: str, server: Proc | None, *, client: str = "raw"
    ) -> dict[str, Any]:
        assert self.simulator is not None
        url = self.upstream_url if target == "direct" else "grpc://" + self.servers[server_of(target)][1]
        cmd = [
            *self.pinning.prefix(self.pinning.load),
            sys.executable,
            "-m",
            "bench.loadgen",
            "--target",
            url,
            "--concurrency",
            str(scenario.concurrency),
            "--duration",
            str(scenario.duration_s),
            "--warmup",
            str(scenario.warmup_s),
            "--ramp",
            str(scenario.ramp_s),
            "--model",
            scenario.model,
            "--client",
            client,
            "--watch-upstream",
            str(self.simulator.pid),
        ]
        if server is not None:
            cmd += ["--watch", str(server.pid)]
        if scenario.slow_consumer:
            cmd += ["--read-delay-ms", str(scenario.read_delay_ms), "--cancel-at-end"]
        if target in CALLER_ID_TARGETS:
            cmd.append("--caller-request-ids")
        token = self.limited_tokens.get(target, self.token)
        if target != "direct" and token:
            cmd += ["--token", token]  # the baselines ignore it; chatgate verifies it
        self.pin_database_backends()
        timeout = scenario.warmup_s + scenario.duration_s + scenario.ramp_s + 120
        before = self.limit_statements() if target in LIMITED_TARGETS else 0
        result = subprocess.run(
            cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"load generator failed against {target}:\n{result.stderr[-3000:]}")
        report: dict[str, Any] = json.loads(result.stdout)
        if target in LIMITED_TARGETS:
            # Over warm-up, window and drain: per call of all of them, a ceiling.
            report["limit_statements"] = self.limit_statements() - before
        return report

    def simulator_stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.upstream_url.removesuffix("/v1") + "/_simulator/stats") as r:
            return json.loads(r.read())  # type: ignore[no-any-return]

    def simulator_reset(self) -> None:
        req = urllib.request.Request(
            self.upstream_url.removesuffix("/v1") + "/_simulator/reset", method="POST"
        )
        with urllib.request.urlopen(req) as r:
            r.read()


def _wait_healthy(proc: Proc, target: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if not proc.alive() or time.monotonic() > deadline:
                log = proc.log.read_text()[-3000:] if proc.log else ""
                raise RuntimeError(f"{proc.name} did not become healthy:\n{log}")
            time.sleep(0.1)


def _drop_database(admin: str, name: str) -> None:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- scenarios -------------------------------------------------------------------------


def run_scenario(suite: Suite, scenario: Scenario, rounds: int) -> dict[str, Any]:
    """Each target ``rounds`` times, interleaved; per target, the round with the median figure.

    Interleaving spreads a noisy neighbour's bursts over all targets; the median
    round (by CPU per stream, or time to first event for ``direct``) drops outliers
    while keeping one round's figures together. Every round is kept in the JSON.
    """
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in scenario.targets}
    for i in range(rounds):
        for target in scenario.targets:
            if scenario.fresh and target != "direct":
                suite.restart(server_of(target))
            server = None if target == "direct" else suite.servers[server_of(target)][0]
            idle_rss = procstat.sample([server.pid]).rss_kb if server else None
            if scenario.slow_consumer:
                suite.simulator_reset()
            print(f"  {scenario.name}: {target} (round {i + 1}/{rounds}) …", file=sys.stderr, flush=True)
            result = suite.load(scenario, target, server)
            if idle_rss is not None:
                result["server"]["rss_kb_idle"] = idle_rss
            if scenario.slow_consumer:
                result["upstream_records"] = _sent_per_stream(suite.simulator_stats())
            runs[target].append(result)
    results = {}
    for target, rs in runs.items():
        chosen = sorted(rs, key=_round_key)[len(rs) // 2]
        results[target] = {**chosen, "rounds": rs if len(rs) > 1 else []}
    return results


def _round_key(r: dict[str, Any]) -> float:
    server = r.get("server") or {}
    value = server.get("cpu_ms_per_stream") or server.get("cpu_ms_per_1k_chunks") or r["ttfe_ms"]["p50"]
    return float(value or 0.0)


def _sent_per_stream(stats: dict[str, Any]) -> dict[str, Any]:
    sent = [r["content_chunks_sent"] for r in stats["requests"] if r.get("stream")]
    return {
        "streams": len(sent),
        "content_chunks_sent_max": max(sent, default=0),
        "content_chunks_sent_mean": sum(sent) / len(sent) if sent else 0,
    }


def run_workers(suite: Suite, quick: bool, rounds: int) -> dict[str, Any]:
    """Saturation against 1 and 2 workers, nothing pinned (2 workers need both cores).

    Both servers run side by side (the idle one costs nothing) and are measured in
    alternating rounds, like the scenarios' targets.
    """
    scenario = Scenario(
        "workers",
        "concurrency 32, 50 chunks; 1 vs 2 worker processes, nothing pinned",
        32,
        50,
        targets=("chatgate-1w", "chatgate-2w"),
        duration_s=1.0 if quick else 6.0,
        warmup_s=0.5 if quick else 2.0,
    )
    saved = suite.pinning
    suite.pinning = Pinning(None, None, saved.note)
    try:
        for workers in (1, 2):
            print(f"  workers: starting {workers} …", file=sys.stderr, flush=True)
            suite.start_chatgate(f"chatgate-{workers}w", workers=workers, pinned=False)
        out = run_scenario(suite, scenario, rounds)
        for name in scenario.targets:
            out[name]["exit_code"] = suite.stop_server(name)
    finally:
        suite.pinning = saved
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="seconds-long smoke run: proves it works, measures nothing"
    )
    p.add_argument(
        "--scenarios",
        help="subset of short,long,idle,request-ids,saturation,paced,slow,slow-consumer,workers",
    )
    p.add_argument("--no-workers", action="store_true", help="skip the 1-vs-2 workers comparison")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--rounds", type=int, default=None, help="rounds per target (default 3; 1 with --quick)")
    p.add_argument(
        "--trace-sample",
        type=float,
        default=0.1,
        help="fraction of traces chatgate samples, exported to a local sink (0: tracing off)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="where JSON results go")
    p.add_argument(
        "--database-url", default=os.environ.get("DATABASE_URL", ""), help="default: $DATABASE_URL"
    )
    p.add_argument(
        "--chatgate-pythonpath",
        help="import chatgate_server from this directory instead (A/B-test a change outside the tree)",
    )
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if not args.database_url:
        p.error("DATABASE_URL is not set (a Postgres where a scratch database may be created)")
    names = args.scenarios.split(",") if args.scenarios else None
    want_workers = not args.no_workers and (names is None or "workers" in names)
    if names is not None:
        names = [n for n in names if n != "workers"]
    scenarios = select(names, quick=args.quick)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    results: dict[str, Any] = {
        "started": started,
        "quick": args.quick,
        "machine": _machine(),
        "command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
        "rounds": args.rounds,
        "trace_sample": args.trace_sample,
        "scenarios": {},
    }
    with tempfile.TemporaryDirectory(prefix="chatgate-bench-") as tmp, ExitStack() as stack:
        suite = Suite(args, stack, Path(tmp))
        results["pinning"] = suite.pinning.note
        suite.create_database()
        if {t for s in scenarios for t in s.targets} & set(LIMITED_TARGETS):
            suite.limited_tokens = suite.limited_callers()  # before any chatgate starts
        suite.start_simulator()
        if args.trace_sample > 0:
            suite.start_otlp_sink()
        needed = {server_of(t) for s in scenarios for t in s.targets}
        for mode in ("relay", "ceiling"):
            if mode in needed:
                suite.start_baseline(mode)
        for name in ("chatgate", *VARIANTS):
            if name in needed:
                suite.start_chatgate(name, workers=None, pinned=True)
        for scenario in scenarios:
            print(f"scenario {scenario.name}: {scenario.description}", file=sys.stderr, flush=True)
            results["scenarios"][scenario.name] = {
                "scenario": asdict(scenario),
                "results": run_scenario(suite, scenario, scenario.rounds or args.rounds),
            }
        for name in ("chatgate", *VARIANTS):
            if name in suite.servers:
                results[f"{name}_exit_code"] = suite.stop_server(name)
        if want_workers:
            results["workers"] = run_workers(suite, args.quick, args.rounds)
    results["summary"] = report.summarize(results)
    print(report.table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = started.replace(":", "")
    for name in (f"{stamp}.json", "latest.json"):
        (args.out / name).write_text(json.dumps(results, indent=1))
    print(f"\nresults: {args.out / (stamp + '.json')}")
    return 0


def _machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
    }


if __name__ == "__main__":
    sys.exit(main())
