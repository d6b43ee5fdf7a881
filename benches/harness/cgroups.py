"""Per-round cgroups for the same-node fast-path workloads.

Sluice's eBPF fast path attaches to a cgroup: connects from processes below it are redirected,
and processes in an opted-in ("splice") cgroup get their bytes carried by sk_msg. Sluice must run
below the attached cgroup too, because an accepted socket belongs to its listener's cgroup. So a
fast-path round runs in a fresh cgroup ``<cgroup2>/sluice-bench-<pid>-<round>/`` with two
children, ``proxy/`` (Sluice) and ``app/`` (the load generator and the sanity-check curl).

A process is placed by a shell that writes its own PID into ``cgroup.procs`` and then execs
the real command, so the PID the harness tracks (and pins, and measures) is the command's own.
Needs root and a cgroup2 hierarchy; without them the round's row says why it is unavailable.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_JOIN = 'echo $$ > "$0/cgroup.procs" && exec "$@"'


class CgroupError(Exception):
    """The per-round cgroup cannot be made here (not root, no cgroup2)."""


def cgroup2_mount(mountinfo: str | None = None) -> Path | None:
    """Where the cgroup2 hierarchy is mounted (``/sys/fs/cgroup``, or
    ``/sys/fs/cgroup/unified`` on hybrid hosts), from /proc/self/mountinfo."""
    if mountinfo is None:
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
                mountinfo = f.read()
        except OSError:
            return None
    for line in mountinfo.splitlines():
        # "<id> <parent> <dev> <root> <mount point> <options> [optional...] - <fstype> ..."
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if sep and right.split()[:1] == ["cgroup2"] and len(fields) > 4:
            return Path(fields[4])
    return None


def wrap(cgroup: Path, argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    """``argv`` started inside ``cgroup`` (optionally with extra environment variables)."""
    prefix = ["sh", "-c", _JOIN, str(cgroup)]
    if env:
        prefix += ["env", *(f"{k}={v}" for k, v in env.items())]
    return prefix + argv


class RoundCgroup:
    """``<cgroup2>/sluice-bench-<pid>-<name>/{proxy,app}``, removed by :meth:`remove` (after
    the harness has stopped the processes it put there)."""

    def __init__(self, name: str, mount: Path | None = None) -> None:
        mount = mount or cgroup2_mount()
        if mount is None:
            raise CgroupError("no cgroup2 hierarchy is mounted")
        if os.geteuid() != 0:
            raise CgroupError(f"needs root to create cgroups and load BPF programs (euid {os.geteuid()})")
        self.base = mount / f"sluice-bench-{os.getpid()}-{name}"
        self.proxy = self.base / "proxy"
        self.app = self.base / "app"
        try:
            for d in (self.base, self.proxy, self.app):
                d.mkdir(exist_ok=True)
        except OSError as e:
            self.remove()
            raise CgroupError(f"cannot create {self.base}: {e}") from None

    def substitute(self, args: list[str]) -> list[str]:
        """Replaces ``{cgroup}`` and ``{app_cgroup}`` in workload arguments."""
        return [a.replace("{cgroup}", str(self.base)).replace("{app_cgroup}", str(self.app)) for a in args]

    def remove(self, timeout: float = 5.0) -> None:
        for d in (self.app, self.proxy, self.base):
            deadline = time.monotonic() + timeout
            while True:
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    # A process that just exited may take a moment to leave the cgroup.
                    if time.monotonic() > deadline:
                        print(f"warning: cannot remove {d}", flush=True)
                        break
                    time.sleep(0.05)
