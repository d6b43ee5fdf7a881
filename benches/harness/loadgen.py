"""Load generators: how to build their command lines and how to read their output.

A workload picks a *builder* (``wrk(...)`` or ``h2load(...)``); the builder turns a target URL,
a request shape and a duration into a :class:`LoadCommand`, which knows how to parse its own
output into a :class:`LoadResult`.

Latency percentiles:
* wrk: from ``--latency`` (its HdrHistogram; p50 and p99 as printed).
* h2load prints no percentiles, so it writes one line per request with ``--log-file`` and the
  percentiles are computed here from those durations (nearest-rank). Writing the log costs
  the load generator a little CPU, equally for every row.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class RequestShape:
    """What each request of a workload looks like."""

    path: str = "/"
    headers: tuple[tuple[str, str], ...] = ()
    #: A file (in the run's work directory) sent as the body of every request (POST).
    body_file: str | None = None


@dataclass
class LoadResult:
    requests: int
    duration_s: float
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    #: Counters that must all be zero for the round to count (non-2xx, socket errors, ...).
    errors: dict[str, int] = field(default_factory=dict)

    def error_summary(self) -> str:
        bad = {k: v for k, v in self.errors.items() if v}
        return ", ".join(f"{k}={v}" for k, v in bad.items())


class ParseError(Exception):
    """The load generator's output did not have the expected shape."""


@dataclass
class LoadCommand:
    argv: list[str]
    parse: Callable[[str], LoadResult]


#: (url, request shape, duration in whole seconds, work directory) -> command
Builder = Callable[[str, RequestShape, int, Path], LoadCommand]


# ---------------------------------------------------------------------------------------------
# wrk


def wrk(connections: int = 50, threads: int = 1) -> Builder:
    """HTTP/1.1 keep-alive load with wrk."""

    def build(url: str, req: RequestShape, duration: int, workdir: Path) -> LoadCommand:
        if req.body_file is not None:
            raise ValueError("the wrk builder sends no bodies; use h2load or a Lua script")
        argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency"]
        for name, value in req.headers:
            argv += ["-H", f"{name}: {value}"]
        argv.append(url + req.path)
        return LoadCommand(argv, parse_wrk)

    return build


_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _wrk_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ParseError(f"unexpected wrk latency {text!r}")
    return float(m.group(1)) * _WRK_UNITS[m.group(2)]


def parse_wrk(out: str) -> LoadResult:
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m or not rps:
        raise ParseError("no request count / Requests/sec in wrk output: " + out[-400:])
    percentiles = dict(re.findall(r"^\s+(50|99)(?:\.0+)?%\s+(\S+)", out, re.M))
    errors = {"non_2xx_3xx": 0, "connect": 0, "read": 0, "write": 0, "timeout": 0}
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if non2xx:
        errors["non_2xx_3xx"] = int(non2xx.group(1))
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    if sock:
        for key, value in zip(("connect", "read", "write", "timeout"), sock.groups()):
            errors[key] = int(value)
    return LoadResult(
        requests=int(m.group(1)),
        duration_s=_wrk_ms(m.group(2) + m.group(3)) / 1e3,
        rps=float(rps.group(1)),
        p50_ms=_wrk_ms(percentiles["50"]) if "50" in percentiles else None,
        p99_ms=_wrk_ms(percentiles["99"]) if "99" in percentiles else None,
        errors=errors,
    )


# ---------------------------------------------------------------------------------------------
# h2load


def h2load(clients: int = 10, streams: int = 10, threads: int = 1) -> Builder:
    """HTTP/2 (h2c prior knowledge for http:// URLs) multiplexed load with h2load."""

    def build(url: str, req: RequestShape, duration: int, workdir: Path) -> LoadCommand:
        log = workdir / "h2load-requests.log"
        argv = [
            "h2load",
            f"--threads={threads}",
            f"--clients={clients}",
            f"--max-concurrent-streams={streams}",
            f"--duration={duration}",
            f"--log-file={log}",
        ]
        for name, value in req.headers:
            argv += ["-H", f"{name}: {value}"]
        if req.body_file is not None:
            argv += ["--data", str(workdir / req.body_file)]
        argv.append(url + req.path)

        def parse(out: str) -> LoadResult:
            try:
                durations = read_h2load_log(log)
            finally:
                log.unlink(missing_ok=True)
            return parse_h2load(out, durations)

        return LoadCommand(argv, parse)

    return build


def read_h2load_log(log: Path) -> list[float]:
    """Per-request durations in ms of successful (status >= 0) requests."""
    durations = []
    with open(log, encoding="ascii", errors="replace") as f:
        for line in f:
            cols = line.split("\t")
            if len(cols) >= 3 and not cols[1].startswith("-"):
                durations.append(int(cols[2]) / 1e3)
    return durations


def parse_h2load(out: str, durations_ms: list[float]) -> LoadResult:
    fin = re.search(r"finished in ([\d.]+)(us|ms|s), ([\d.]+) req/s", out)
    req = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
        r"(\d+) failed, (\d+) errored, (\d+) timeout",
        out,
    )
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    if not fin or not req or not codes:
        raise ParseError("unexpected h2load output: " + out[-400:])
    _total, _started, _done, succeeded, failed, errored, timeout = map(int, req.groups())
    _ok, c3, c4, c5 = map(int, codes.groups())
    durations_ms.sort()
    return LoadResult(
        requests=succeeded,
        duration_s=_wrk_ms(fin.group(1) + fin.group(2)) / 1e3,
        rps=float(fin.group(3)),
        p50_ms=percentile(durations_ms, 50),
        p99_ms=percentile(durations_ms, 99),
        errors={
            "failed": failed,
            "errored": errored,
            "timeout": timeout,
            "3xx": c3,
            "4xx": c4,
            "5xx": c5,
        },
    )


def percentile(sorted_values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]
