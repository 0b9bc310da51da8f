"""Turns raw load-generator reports into the figures the issue asks for, and a table.

Added time to first event is a target's percentile minus the direct-to-upstream
percentile of the same scenario. Efficiency is chatgate's CPU over the minimal
relay's for the same work, measured minutes apart in the same run, so the ratio
holds when the machine's absolute speed drifts.
"""

from __future__ import annotations

from typing import Any

TARGETS = {
    "cpu_per_1k_chunks_ratio": 1.25,
    "idle_added_ttfe_p50_ms": 1.0,
    "idle_added_ttfe_p99_ms": 2.0,
    "slow_open_streams": 2000,
    "slow_added_ttfe_p99_ms": 50.0,
    "slow_rss_kb_per_stream": 50.0,
    "workers_speedup": 1.7,
    "limits_cpu_per_stream_ratio": 1.05,
    "limits_added_ttfe_p50_ms": 0.1,
}


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Derived figures per scenario, the per-stream/per-chunk fit, and the targets."""
    out: dict[str, Any] = {"scenarios": {}}
    scen = results.get("scenarios", {})
    for name, data in scen.items():
        res = data["results"]
        direct = res.get("direct")
        relay = res.get("relay")
        rows = {}
        for target, r in res.items():
            server = r.get("server") or {}
            row = {
                "streams_per_s": r["streams_per_s"],
                "chunks_per_s": r["chunks_per_s"],
                "messages_per_stream": _div(r.get("messages"), r["streams"]),
                "errors": r["errors_total"],
                "ttfe_p50_ms": r["ttfe_ms"]["p50"],
                "ttfe_p99_ms": r["ttfe_ms"]["p99"],
                "added_ttfe_p50_ms": _sub(r["ttfe_ms"]["p50"], direct and direct["ttfe_ms"]["p50"]),
                "added_ttfe_p99_ms": _sub(r["ttfe_ms"]["p99"], direct and direct["ttfe_ms"]["p99"]),
                "cpu_ms_per_stream": server.get("cpu_ms_per_stream"),
                "cpu_ms_per_1k_chunks": server.get("cpu_ms_per_1k_chunks"),
                "server_cpu_util": server.get("cpu_util"),
                "client_cpu_util": r["client_cpu_util"],
                "upstream_cpu_util": r["upstream_cpu_util"],
                "other_cpu_util": r.get("other_cpu_util"),
                "rss_kb_peak": server.get("rss_kb_peak"),
                "open_streams_mean": r["open_streams"]["mean"],
                "stream_ms_p50": r["stream_ms"]["p50"],
            }
            if relay and target != "relay" and server:
                rel = relay.get("server") or {}
                row["cpu_per_1k_chunks_vs_relay"] = _div(
                    server.get("cpu_ms_per_1k_chunks"), rel.get("cpu_ms_per_1k_chunks")
                )
                row["cpu_per_stream_vs_relay"] = _div(
                    server.get("cpu_ms_per_stream"), rel.get("cpu_ms_per_stream")
                )
            if server.get("rss_kb_idle") is not None and r["open_streams"]["mean"]:
                row["rss_kb_per_open_stream"] = (server["rss_kb_peak"] - server["rss_kb_idle"]) / r[
                    "open_streams"
                ]["mean"]
            if "limit_statements" in r:
                row["limit_statements_per_call"] = _div(r["limit_statements"], r["streams"])
            if "upstream_records" in r:
                row["upstream"] = r["upstream_records"]
                row["events_per_stream"] = (r["chunks"] + 2 * r["streams"]) / max(
                    r["open_streams"]["mean"], 1
                )
            rows[target] = row
        out["scenarios"][name] = rows
    out["fit"] = _fit(scen)
    if "workers" in results:
        w = results["workers"]
        one, two = w.get("chatgate-1w"), w.get("chatgate-2w")
        if one and two:
            out["workers"] = {
                "streams_per_s_1": one["streams_per_s"],
                "streams_per_s_2": two["streams_per_s"],
                "speedup": _div(two["streams_per_s"], one["streams_per_s"]),
                "client_cpu_util_2": two["client_cpu_util"],
                "upstream_cpu_util_2": two["upstream_cpu_util"],
                "server_cpu_util_1": one["server"]["cpu_util"],
                "server_cpu_util_2": two["server"]["cpu_util"],
                "errors": one["errors_total"] + two["errors_total"],
            }
    # A --quick run is a smoke test: its seconds-long scenarios measure no target.
    out["targets"] = _targets(out, measured=not results.get("quick"))
    return out


def _fit(scen: dict[str, Any]) -> dict[str, Any]:
    """CPU = fixed per stream + marginal per chunk, solved from the short and long scenarios."""
    if "short" not in scen or "long" not in scen:
        return {}
    n1, n2 = scen["short"]["scenario"]["chunks"], scen["long"]["scenario"]["chunks"]
    fit = {}
    for target in ("relay", "ceiling", "chatgate-1msg", "chatgate"):
        a = (scen["short"]["results"].get(target) or {}).get("server") or {}
        b = (scen["long"]["results"].get(target) or {}).get("server") or {}
        if a.get("cpu_ms_per_stream") is None or b.get("cpu_ms_per_stream") is None:
            continue
        per_chunk = (b["cpu_ms_per_stream"] - a["cpu_ms_per_stream"]) / (n2 - n1)
        fit[target] = {
            "ms_per_stream": a["cpu_ms_per_stream"] - n1 * per_chunk,
            "us_per_chunk": per_chunk * 1000,
        }
    return fit


def _targets(summary: dict[str, Any], *, measured: bool = True) -> list[dict[str, Any]]:
    """Each target with its value and whether it was met; ``met`` is None where it was
    not measured (the scenario did not run, or ``measured`` is false: a --quick run)."""
    s = summary["scenarios"]
    checks: list[tuple[str, float | None, float, bool]] = []  # name, value, limit, higher is better

    def get(scenario: str, target: str, key: str) -> float | None:
        value = s.get(scenario, {}).get(target, {}).get(key)
        return None if value is None else float(value)

    for name in ("short", "long"):
        for target in ("chatgate-1msg", "chatgate"):
            if target in s.get(name, {}):
                value = get(name, target, "cpu_per_1k_chunks_vs_relay")
                checks.append(
                    (
                        f"{name}: {target} CPU per 1k chunks vs relay",
                        value,
                        TARGETS["cpu_per_1k_chunks_ratio"],
                        False,
                    )
                )
    if "idle" in s:
        checks.append(("idle: added TTFE p50 ms", get("idle", "chatgate", "added_ttfe_p50_ms"), 1.0, False))
        checks.append(("idle: added TTFE p99 ms", get("idle", "chatgate", "added_ttfe_p99_ms"), 2.0, False))
    if "slow" in s:
        checks.append(("slow: open streams (mean)", get("slow", "chatgate", "open_streams_mean"), 2000, True))
        checks.append(("slow: errors", get("slow", "chatgate", "errors"), 0, False))
        checks.append(("slow: added TTFE p99 ms", get("slow", "chatgate", "added_ttfe_p99_ms"), 50.0, False))
        checks.append(
            ("slow: RSS KiB per open stream", get("slow", "chatgate", "rss_kb_per_open_stream"), 50.0, False)
        )
    if "workers" in summary:
        checks.append(("workers: 2 vs 1 streams/s", summary["workers"]["speedup"], 1.7, True))
    if "limits" in s:
        off = s["limits"].get("chatgate", {})
        for target in ("chatgate-limits", "chatgate-limits8"):
            on = s["limits"].get(target, {})
            checks.append(
                (
                    f"limits: CPU per call, {target} vs chatgate",
                    _div(on.get("cpu_ms_per_stream"), off.get("cpu_ms_per_stream")),
                    TARGETS["limits_cpu_per_stream_ratio"],
                    False,
                )
            )
    if "limits-idle" in s:
        on, off = s["limits-idle"].get("chatgate-limits", {}), s["limits-idle"].get("chatgate", {})
        checks.append(
            (
                "limits-idle: added TTFE p50 ms, limits on vs off",
                _sub(on.get("ttfe_p50_ms"), off.get("ttfe_p50_ms")),
                TARGETS["limits_added_ttfe_p50_ms"],
                False,
            )
        )
    out = []
    for name, value, limit, higher in checks:
        ok = None if value is None or not measured else (value >= limit if higher else value <= limit)
        out.append({"target": name, "value": value, "limit": limit, "met": ok})
    return out


# --- the table ---------------------------------------------------------------------------


def _f(value: Any, fmt: str = "{:.2f}") -> str:
    if value is None:
        return "-"
    return fmt.format(value)


def table(results: dict[str, Any]) -> str:
    summary = results["summary"]
    lines = [
        f"machine: {results['machine']['cpu']}, {results['machine']['cores']} cores; {results['pinning']}",
        "",
        f"{'scenario':<14}{'target':<14}{'streams/s':>10}{'chunks/s':>10}{'msg/str':>8}"
        f"{'TTFE p50':>9}{'p99':>8}{'+p50':>8}{'+p99':>8}{'CPU ms/str':>11}{'ms/1k ch':>9}"
        f"{'vs relay':>9}{'srv':>6}{'cli':>6}"
        f"{'ups':>6}{'oth':>6}{'err':>5}",
    ]
    for name, rows in summary["scenarios"].items():
        for target, r in rows.items():
            lines.append(
                f"{name:<14}{target:<14}"
                f"{_f(r['streams_per_s'], '{:.0f}'):>10}{_f(r['chunks_per_s'], '{:.0f}'):>10}"
                f"{_f(r['messages_per_stream'], '{:.1f}'):>8}"
                f"{_f(r['ttfe_p50_ms']):>9}{_f(r['ttfe_p99_ms']):>8}"
                f"{_f(r['added_ttfe_p50_ms']):>8}{_f(r['added_ttfe_p99_ms']):>8}"
                f"{_f(r['cpu_ms_per_stream']):>11}{_f(r['cpu_ms_per_1k_chunks'], '{:.1f}'):>9}"
                f"{_f(r.get('cpu_per_1k_chunks_vs_relay'), '{:.2f}x'):>9}"
                f"{_f(r['server_cpu_util']):>6}{_f(r['client_cpu_util']):>6}{_f(r['upstream_cpu_util']):>6}"
                f"{_f(r.get('other_cpu_util')):>6}"
                f"{r['errors']:>5}"
            )
    lines.append("")
    lines.append("TTFE = time to first event (ms); +p50/+p99 = added over direct-to-upstream;")
    lines.append(
        "CPU from /proc over the server's process tree; srv/cli/ups/oth = CPU use (cores) of the server,"
    )
    lines.append("load generator, upstream, and everything else (Postgres, neighbours) during the window.")
    lines.append(
        "msg/str = content messages per stream (chatgate merges deltas that arrive together;"
        " chatgate-1msg does not)."
    )
    if summary.get("fit"):
        lines.append("")
        lines.append(
            "CPU fit from short+long:  "
            + "; ".join(
                f"{t} {f['ms_per_stream']:.2f} ms/stream + {f['us_per_chunk']:.1f} µs/chunk"
                for t, f in summary["fit"].items()
            )
        )
    paced = summary["scenarios"].get("paced", {}).get("chatgate")
    if paced:
        lines.append(
            f"paced: chatgate held {paced['open_streams_mean']:.0f} streams in real time: "
            f"added TTFE p99 {_f(paced['added_ttfe_p99_ms'])} ms, "
            f"RSS {_f(paced.get('rss_kb_per_open_stream'), '{:.1f}')} KiB per open stream, "
            f"stream p50 {_f(paced['stream_ms_p50'], '{:.0f}')} ms (1000 ms in real time)"
        )
    for target, limited in summary["scenarios"].get("limits", {}).items():
        if limited.get("limit_statements_per_call") is not None:
            lines.append(
                f"limits: {target}: {limited['limit_statements_per_call']:.4f} lease statements"
                " per admitted call (warm-up and drain included)"
            )
    slow = summary["scenarios"].get("slow", {}).get("chatgate")
    if slow:
        lines.append(
            f"slow: chatgate held {slow['open_streams_mean']:.0f} open streams (mean), "
            f"RSS {_f(slow.get('rss_kb_per_open_stream'), '{:.1f}')} KiB per open stream, "
            f"stream p50 {_f(slow['stream_ms_p50'], '{:.0f}')} ms (1000 ms in real time)"
        )
    sc = summary["scenarios"].get("slow-consumer", {}).get("chatgate")
    if sc:
        up = sc.get("upstream", {})
        total = results["scenarios"]["slow-consumer"]["scenario"]["chunks"]
        lines.append(
            f"slow consumer: RSS {_f(sc.get('rss_kb_per_open_stream'), '{:.1f}')} KiB per stream; "
            f"callers took {_f(sc.get('events_per_stream'), '{:.0f}')} events each; the upstream sent "
            f"{_f(up.get('content_chunks_sent_mean'), '{:.0f}')} chunks on average "
            f"(max {up.get('content_chunks_sent_max', '-')}) of {total}"
        )
    if "workers" in summary:
        w = summary["workers"]
        lines.append(
            f"workers: 1 → {w['streams_per_s_1']:.0f} streams/s, 2 → {w['streams_per_s_2']:.0f} streams/s "
            f"({_f(w['speedup'], '{:.2f}x')}); server CPU {w['server_cpu_util_1']:.2f} → "
            f"{w['server_cpu_util_2']:.2f} cores, load generator {w['client_cpu_util_2']:.2f}, "
            f"upstream {_f(w['upstream_cpu_util_2'])} (nothing pinned)"
        )
    lines.append("")
    lines.append("targets:" + (" (none is measured by a --quick run)" if results.get("quick") else ""))
    for t in summary["targets"]:
        mark = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        lines.append(f"  {t['target']:<50} {_f(t['value']):>9}  (limit {t['limit']})  {mark}")
    return "\n".join(lines)
