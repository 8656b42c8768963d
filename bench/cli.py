"""``python -m bench``: build the models, start the servers, run the cases, report.

One repeat = raw torch for each model used, the idle tiny-MLP daemon (start-up, idle RSS
and CPU), then every selected case in order (the open loops take their capacity from
the closed-loop cases of the same model and transport in that repeat). The echo server
and the bench daemon stay up across repeats. Everything is printed and written to
``OUT/bench-<time>.json`` and ``.png``; the exit code says whether the bench *ran*, not
whether targets were met.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import peers, report
from bench.cases import (
    CLIENTS,
    ECHO,
    PERF_ANALYZER,
    QUICK,
    Case,
    CaseRunner,
    Settings,
    all_cases,
    select,
)
from bench.catalog import (
    DAEMON_TELEMETRY,
    MODELS,
    PEERS,
    TELEMETRY_OFF,
    TELEMETRY_ON,
    TELEMETRY_UPLOAD,
    TORCHSERVE,
    build_archives,
)
from bench.references import baselines, idle_daemon, raw_torch, telemetry_cost
from bench.server import DaemonSetup, Server, start_daemon, start_echo, wait_quiet

DAEMON = "edgeserve"  # the main bench daemon (the thread-budget variants have their own)
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DAEMON_TELEMETRY_MODELS = {
    k for k, m in MODELS.items() if m.daemon in (TELEMETRY_ON, TELEMETRY_OFF)
}
UPLOAD_MODELS = {k for k, m in MODELS.items() if m.daemon == TELEMETRY_UPLOAD}
MAX_QUEUE_SIZE = 256
QUIET_START_TIMEOUT_S = 60.0
"""Longest wait for a quiet machine before a bench daemon starts (``wait_quiet``)."""
BOTH = "both"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short smoke run (< 1 min)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    parser.add_argument("--only", help="comma-separated case globs (e.g. 'mlp-uds-*,echo-*')")
    parser.add_argument("--repeats", type=int, default=1, help="repeats; medians are reported")
    parser.add_argument("--duration", type=float, help="measured seconds per case")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per case")
    parser.add_argument("--idle-seconds", type=float, help="idle CPU window (default 10)")
    parser.add_argument("--procs", type=int, default=1, help="load processes (default 1)")
    parser.add_argument(
        "--client",
        choices=[*CLIENTS, BOTH],
        default=CLIENTS[0],
        help="load generator: the bench's Python one, NVIDIA's perf_analyzer, or both "
        "(each case twice, back to back; perf_analyzer's figures in their own table)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="intra-op threads of raw torch (the physical limit)",
    )
    parser.add_argument(
        "--daemon-threads",
        type=int,
        default=None,
        help="intra_op_threads in the daemon's config (default: edgeserve measures per model)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="re-runs of a case while other processes load the machine",
    )
    parser.add_argument(
        "--quiet-cores",
        type=float,
        default=0.25,
        help="CPU of other processes (cores) above which a case is re-run",
    )
    parser.add_argument(
        "--daemon-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for the bench daemons (repeatable), e.g. OMP_WAIT_POLICY=PASSIVE",
    )
    parser.add_argument("--no-idle", action="store_true", help="skip the idle-daemon step")
    parser.add_argument(
        "--telemetry-intervals",
        type=int,
        help="intervals the buffer write cost is measured over (default 30; --quick 5)",
    )
    parser.add_argument(
        "--upload-backlog-s",
        type=float,
        default=30.0,
        help="telemetry-upload: backlog put in the buffer before the daemon starts, in "
        "seconds of upload at the rate cap, per repeat (default 30)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the repeats, profile the daemon with py-spy (bench/profile.py)",
    )
    parser.add_argument("--profile-cases", default="mlp-uds-c1,mlp-uds-c32,echo-uds-c32")
    parser.add_argument(
        "--peers",
        choices=["torchserve"],
        help="add issue 12's cells: edgeserve beside TorchServe 0.12 (its own venv, made "
        "on first use in the bench's cache) and the echo ceiling",
    )
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument(
        "--report", type=Path, help="re-print the tables and re-plot from a bench JSON; no run"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, state)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.duration = args.duration or (1.0 if quick else 3.0)
    args.warmup = args.warmup if args.warmup is not None else (0.3 if quick else 0.5)
    args.idle_seconds = args.idle_seconds or (1.0 if quick else 10.0)
    args.raw_seconds = 1.0 if quick else 3.0
    args.telemetry_intervals = args.telemetry_intervals or (5 if quick else 30)
    if quick and not args.only:
        args.only = QUICK
    return args


def chosen_cases(args: argparse.Namespace) -> list[Case]:
    """``--only``'s cases (the default set without it), and with ``--peers`` the peer
    cells too, in run order."""
    cases = select(all_cases(), args.only)
    if args.peers:
        peers = {c.name for c in select(all_cases(), "peers")}
        cases = [c for c in all_cases() if c in cases or c.name in peers]
    return cases


def _models_needed(cases: list[Case], idle: bool) -> list[str]:
    """Models edgeserve serves (the cases' targets; for a TorchServe registration, the
    model whose TorchScript file it serves), plus the tiny MLP for the idle step."""
    keys = {MODELS[c.target].peer_of or c.target for c in cases if c.target != ECHO}
    keys |= {"mlp"} if idle else set()
    return [k for k in MODELS if k in keys]


def _capacity(results: dict[str, Any], case: Case) -> float | None:
    """The closed-loop throughput at 32 in flight of the same model and transport (the
    best closed-loop figure when c=32 was not run)."""
    prefix = f"{case.target}-{case.transport}-c"
    if f"{prefix}32" in results:
        return float(results[f"{prefix}32"]["throughput"])
    rates = [f["throughput"] for name, f in results.items() if name.startswith(prefix)]
    return max(rates) if rates else None


def run_repeat(
    runner: CaseRunner, cases: list[Case], args: argparse.Namespace, ctx: dict[str, Any]
) -> dict[str, Any]:
    repeat: dict[str, Any] = {"cases": {}, "raw": {}, "max_queue_size": MAX_QUEUE_SIZE}
    raw_keys = {MODELS[m].raw_key for m in ctx["served"] if MODELS[m].raw}
    for model in sorted(raw_keys, key=list(MODELS).index):
        print(f"  raw torch {model} ...", flush=True)
        repeat["raw"][model] = raw_torch(
            ctx["work"], model, args.threads, args.raw_seconds, args.retries, args.quiet_cores
        )
    if not args.no_idle:
        print("  idle tiny-MLP daemon ...", flush=True)
        repeat["idle"] = idle_daemon(
            ctx["work"], ctx["public"], args.daemon_threads, args.idle_seconds
        )
        repeat["baselines"] = baselines()
    if PEERS in ctx["servers"]:
        print("  idle: edgeserve's peer daemon and TorchServe ...", flush=True)
        repeat["peers_idle"] = peers.idle(
            ctx["servers"][PEERS], ctx["servers"].get(TORCHSERVE), args.idle_seconds
        )
    if any(c.target in DAEMON_TELEMETRY_MODELS for c in cases):
        print("  telemetry buffer writes ...", flush=True)
        repeat["telemetry_cost"] = telemetry_cost(args.telemetry_intervals)
    upload = [c for c in cases if c.target in UPLOAD_MODELS]
    if upload and len(ctx.get("repeats_done", [])) % 2:
        # idle, upload in odd repeats; upload, idle in even ones
        cases = [c for c in cases if c not in upload] + upload[::-1]
    for case in cases:
        capacity = None
        if case.kind == "open":
            capacity = _capacity(repeat["cases"], case)
            if capacity is None:
                probe = Case(
                    f"{case.target}-{case.transport}-c32", case.target, case.transport, "closed", 32
                )
                capacity = runner.run(probe)["throughput"]
        controller = ctx.get("upload") if case.target in UPLOAD_MODELS else None
        before = controller.before(case.phase) if controller is not None else None
        figures = runner.run(case, capacity)
        if args.client == BOTH and case.target not in runner.requests:  # TorchServe: not KServe
            again = runner.run(case, capacity, client=PERF_ANALYZER)
            repeat.setdefault("perf_analyzer", {})[case.name] = again
            _print_case(f"{case.name} (pa)", again)
        if controller is not None:
            controller.after(case.phase, before, figures)
            _print_upload(figures["upload"])
        repeat["cases"][case.name] = figures
        _print_case(case.name, figures)
    daemon: Server | None = ctx["servers"].get(DAEMON)
    if daemon is not None:
        repeat["daemon"] = {
            "ready_s": daemon.ready_s,
            "models": sum(MODELS[k].daemon == DAEMON for k in ctx["served"]),
            "rss_after_load_mb": daemon.rss() / 2**20,
        }
    return repeat


def _print_case(name: str, figures: dict[str, Any]) -> None:
    failed = f"  FAILED: {figures['failed']}" if figures.get("failed") else ""
    print(
        f"  {name:<24} {figures['throughput']:8.0f}/s  p50 "
        f"{report._f(figures['p50_ms'], 3)} ms  p99 {report._f(figures['p99_ms'], 3)} ms"
        f"  other cpu {figures['cpu']['other']:.2f}{failed}",
        flush=True,
    )


def _print_upload(found: dict[str, Any]) -> None:
    rate = found.get("upload_bytes_per_s") or 0.0
    print(
        f"    {found['phase']}: backlog rows {found['backlog_rows_before']} -> "
        f"{found['backlog_rows_after']}, uploaded {found['uploaded_bytes'] / 1024:.0f} KiB "
        f"in the window ({rate / 1024:.1f} KiB/s, {found['upload_vs_cap']:.2f} of the cap)"
        + (f", reconnect {found['reconnect_s']:.1f} s" if "reconnect_s" in found else ""),
        flush=True,
    )


def _start_broker(ctx: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The upload case's Mosquitto and a backlog in its daemon's buffer; the fleet section."""
    from bench.broker import Broker
    from bench.telemetry_upload import (
        DEVICE_ID,
        UPLOAD_BYTES_PER_S,
        UploadController,
        prefill,
    )

    state = ctx["work"] / f"state-{TELEMETRY_UPLOAD}"
    broker = Broker(ctx["work"] / "broker")
    ctx["upload"] = UploadController(broker, state / "config.yaml")
    broker.start()
    nbytes = int(UPLOAD_BYTES_PER_S * args.upload_backlog_s * args.repeats)
    filled = prefill(state / "telemetry.db", nbytes)
    print(f"telemetry backlog: {filled['backlog_rows']} rows in the buffer", flush=True)
    ctx["upload_prefill"] = filled
    return {"broker": broker.url, "device_id": DEVICE_ID}


def _start_servers(cases: list[Case], ctx: dict[str, Any], args: argparse.Namespace) -> None:
    if any(c.target == ECHO for c in cases):
        ctx["servers"][ECHO] = start_echo(ctx["work"])
    groups: dict[str, list[str]] = {}
    for key in ctx["served"]:
        groups.setdefault(MODELS[key].daemon, []).append(key)
    registrations = peers.registrations(cases)
    if registrations:
        server, ctx["requests"] = peers.start_torchserve(ctx["work"], registrations)
        ctx["servers"][TORCHSERVE] = server
    for name, keys in groups.items():
        fleet = _start_broker(ctx, args) if name == TELEMETRY_UPLOAD else None
        setup = DaemonSetup(
            models=[(MODELS[k].archive(ctx["work"]), MODELS[k].batching) for k in keys],
            public_key=ctx["public"],
            threads=args.daemon_threads,
            max_queue_size=MAX_QUEUE_SIZE,
            env=dict(item.split("=", 1) for item in args.daemon_env),
            telemetry=DAEMON_TELEMETRY.get(name),
            fleet=fleet,
        )
        waited, busy = wait_quiet(args.quiet_cores, QUIET_START_TIMEOUT_S)
        if busy > args.quiet_cores:
            print(f"  {name}: starting on a busy machine ({busy:.2f} cores after {waited:.0f} s)")
        ctx["servers"][name] = start_daemon(ctx["work"], name, setup)


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    git = shutil.which("git")
    commit = ""
    if git:
        commit = subprocess.run(
            [git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    return {
        "command": "python -m bench " + " ".join(sys.argv[1:]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": commit,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg(),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = chosen_cases(args)
    if args.list:
        print("\n".join(c.name for c in all_cases()))
        return 0
    if args.report:
        return _report_again(args.report)
    if args.client != CLIENTS[0]:
        from bench.perf_analyzer import Unavailable, locate

        try:
            locate()
        except Unavailable as error:
            print(f"bench: --client {args.client}: {error}", file=sys.stderr)
            return 2
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"edgeserve-bench-{stamp}-"))
    ctx: dict[str, Any] = {"work": work, "servers": {}}
    meta = _meta(args)
    started = time.monotonic()
    try:
        from edgeserve.archive.signing import generate_key

        private, ctx["public"] = work / "bench.key", work / "bench.pub"
        generate_key(private, ctx["public"])
        ctx["served"] = _models_needed(cases, False)
        needed = _models_needed(cases, not args.no_idle)
        print(f"building {', '.join(needed)} ...", flush=True)
        meta["archives"] = build_archives(work, private, needed)
        _start_servers(cases, ctx, args)
        settings = Settings(
            args.warmup,
            args.duration,
            args.retries,
            args.quiet_cores,
            args.procs,
            client=PERF_ANALYZER if args.client == PERF_ANALYZER else CLIENTS[0],
        )
        runner = CaseRunner(ctx["servers"], work, settings)
        runner.requests.update(ctx.get("requests", {}))
        if "upload" in ctx:
            for key in UPLOAD_MODELS:
                runner.edge_hooks[key] = ctx["upload"].edges
        repeats = ctx["repeats_done"] = []
        try:
            for index in range(args.repeats):
                print(f"repeat {index + 1}/{args.repeats}", flush=True)
                repeats.append(run_repeat(runner, cases, args, ctx))
            profiles = _profile(runner, ctx, args) if args.profile else None
        finally:
            runner.close()
    finally:
        for server in ctx["servers"].values():
            server.stop()
        if "upload" in ctx:
            ctx["upload"].close()
    meta["upload_prefill"] = ctx.get("upload_prefill")
    summary = report.summarize_repeats(repeats, cases)
    meta["wall_s"] = time.monotonic() - started
    document = {"meta": meta, "median": summary, "repeats": repeats, "profile": profiles}
    json_path, png_path = args.out / f"bench-{stamp}.json", args.out / f"bench-{stamp}.png"
    report.write_json(json_path, document)
    report.plot(png_path, summary, cases)
    print()
    print(report.reference_table(summary))
    print()
    print(report.case_table(summary, cases))
    print()
    print(report.target_table(summary))
    _print_telemetry(summary)
    _print_clients(summary, cases)
    print(
        f"\nmedians of {args.repeats} repeat(s); wrote {json_path} and {png_path} "
        f"in {meta['wall_s']:.0f} s"
    )
    if args.keep:
        print(f"work folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _print_tables(summary: dict[str, Any], cases: list[Case]) -> None:
    print()
    print(report.reference_table(summary))
    print()
    print(report.case_table(summary, cases))
    print()
    print(report.target_table(summary))
    _print_telemetry(summary)
    _print_clients(summary, cases)


def _print_clients(summary: dict[str, Any], cases: list[Case]) -> None:
    for table in (report.peer_table(summary), report.client_table(summary, cases)):
        if table:
            print()
            print(table)


def _print_telemetry(summary: dict[str, Any]) -> None:
    table = report.telemetry_table(summary)
    if table:
        print()
        print(table)


def _report_again(path: Path) -> int:
    """Summarize a bench JSON again (medians, ratios, targets), rewrite it and its plot."""
    document = json.loads(path.read_text())
    cases = [c for c in all_cases() if any(c.name in r["cases"] for r in document["repeats"])]
    document["median"] = report.summarize_repeats(document["repeats"], cases)
    report.write_json(path, document)
    report.plot(path.with_suffix(".png"), document["median"], cases)
    _print_tables(document["median"], cases)
    print(f"\nmedians of {len(document['repeats'])} repeat(s); rewrote {path}")
    return 0


def _profile(runner: CaseRunner, ctx: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from bench.profile import profile_cases

    chosen = select(all_cases(), args.profile_cases)
    seconds = max(args.duration, 5.0)
    return profile_cases(runner, ctx["servers"], chosen, args.out, seconds, args.warmup)
