"""Processes the harness starts, and what /proc says about them.

Every process is started through :class:`Processes`, which remembers it by PID so that the
harness can stop exactly what it started (and nothing else) on a normal exit, an exception,
Ctrl-C or SIGTERM. Processes are signalled through their ``Popen`` object, by PID, and only
while they have not been reaped, so a recycled PID can never be hit.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Processes:
    """The set of live child processes started by this harness."""

    def __init__(self) -> None:
        self._live: dict[int, tuple[str, subprocess.Popen]] = {}

    def start(self, name: str, argv: list[str], log: Path | None = None) -> subprocess.Popen:
        """Starts ``argv`` in its own session (so a Ctrl-C on the terminal reaches only the
        harness, which then stops its children in order). stdout and stderr go to ``log``, or
        to a pipe (read it with ``communicate``) when no log is given."""
        log_file: IO | None = open(log, "ab") if log is not None else None
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file if log_file is not None else subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            if log_file is not None:
                log_file.close()
        self._live[proc.pid] = (name, proc)
        return proc

    def stop(self, proc: subprocess.Popen, grace: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds. Returns the exit code."""
        self._live.pop(proc.pid, None)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def forget(self, proc: subprocess.Popen) -> None:
        """For a process that has already been waited for."""
        self._live.pop(proc.pid, None)

    def stop_all(self) -> None:
        for pid in list(self._live):
            name, proc = self._live[pid]
            if proc.poll() is None:
                print(f"stopping {name} (pid {pid})", file=sys.stderr)
            self.stop(proc)


def install_signal_handlers() -> None:
    """Turns SIGTERM/SIGHUP into SystemExit so ``finally`` blocks and atexit hooks run (SIGINT
    already raises KeyboardInterrupt)."""

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------
# /proc


@dataclass(frozen=True)
class Memory:
    rss_kib: int
    hwm_kib: int


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        stat = f.read()
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / CLOCK_TICKS


def memory(pid: int) -> Memory:
    """VmRSS and VmHWM (peak RSS) from /proc/<pid>/status, in KiB."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return Memory(rss_kib=values.get("VmRSS", 0), hwm_kib=values.get("VmHWM", 0))


# ---------------------------------------------------------------------------------------------
# Sockets


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def accepts(addr: str, timeout: float = 0.2) -> bool:
    """True if something accepts TCP connections on ``addr`` (``host:port``)."""
    host, port = split_addr(addr)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel considers free right now (for admin listeners)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class NotReady(Exception):
    """The process exited, or never started listening."""


def wait_listening(proc: subprocess.Popen, addr: str, timeout: float, log: Path | None) -> None:
    """Waits until ``addr`` accepts connections while ``proc`` is alive."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise NotReady(
                f"exited with code {proc.returncode} before listening on {addr}"
                + tail_suffix(log)
            )
        if accepts(addr):
            return
        time.sleep(0.05)
    raise NotReady(f"not listening on {addr} after {timeout:.0f} s" + tail_suffix(log))


def wait_for_line(proc: subprocess.Popen, log: Path, needle: str, timeout: float) -> str:
    """Waits until ``log`` contains a line with ``needle`` (e.g. the backend's
    ``listening on``) and returns that line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            for line in log.read_text(errors="replace").splitlines():
                if needle in line:
                    return line
        except FileNotFoundError:
            pass
        if proc.poll() is not None:
            raise NotReady(f"exited with code {proc.returncode}" + tail_suffix(log))
        time.sleep(0.05)
    raise NotReady(f"no '{needle}' line after {timeout:.0f} s" + tail_suffix(log))


def tail(log: Path | None, lines: int = 8, width: int = 600) -> str:
    if log is None:
        return ""
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return ""
    return " | ".join(text[-lines:])[-width:]


def tail_suffix(log: Path | None) -> str:
    text = tail(log)
    return f"; output: {text}" if text else "; no output"
