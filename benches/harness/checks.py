"""Sanity checks run before any measurement: does the target really route to the backend?

A benchmark of a proxy that answers 404 or 503 very fast is worthless, so every round first
sends one request with curl, the same shape as the load, and checks that it reached
``bench-backend`` over the expected protocol:

* HTTP/1.1 and h2c: status 200 and a JSON body whose ``backend`` is ``bench-backend`` (the echo
  backend's ``--fixed-body`` payload is such a JSON object);
* gRPC: status 200, ``grpc-status: 0``, ``x-backend: bench-backend``, and the request message
  echoed back unchanged.

Over ``https://`` curl verifies the certificate against the run's CA (``cacert``), is pinned to
the listener's address (``resolve``), and the handshake must show in its output. Protocol
``h2`` is HTTP/2 chosen by ALPN (``--http2``), ``h2c`` and ``grpc`` are HTTP/2 with prior
knowledge.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .loadgen import RequestShape


class SanityError(Exception):
    """The target did not route the request to the benchmark backend."""


@dataclass
class CurlResponse:
    version: str
    status: int
    #: Response headers and trailers, lower-case names (last value wins).
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Tls:
    """How curl reaches an ``https://`` target."""

    #: The CA the certificate must verify against.
    cacert: Path
    #: ``host:port:address`` for ``--resolve`` (the URL's host name -> the listener).
    resolve: str | None = None


#: protocol -> curl's HTTP version option
CURL_VERSION = {
    "http1": "--http1.1",
    "h2": "--http2",
    "h2c": "--http2-prior-knowledge",
    "grpc": "--http2-prior-knowledge",
}


def curl_argv(
    url: str,
    shape: RequestShape,
    protocol: str,
    workdir: Path,
    body_path: Path,
    prefix: list[str] | None = None,
    tls: Tls | None = None,
) -> list[str]:
    argv = [*(prefix or []), "curl", "-sS", "-v", "--max-time", "5", "-o", str(body_path)]
    argv.append(CURL_VERSION[protocol])
    if tls is not None:
        argv += ["--cacert", str(tls.cacert)]
        if tls.resolve:
            argv += ["--resolve", tls.resolve]
    for name, value in shape.headers:
        argv += ["-H", f"{name}: {value}"]
    if shape.body_file is not None:
        argv += ["--data-binary", f"@{workdir / shape.body_file}"]
    argv.append(url + shape.path)
    return argv


def curl(
    url: str,
    shape: RequestShape,
    protocol: str,
    workdir: Path,
    prefix: list[str] | None = None,
    tls: Tls | None = None,
) -> CurlResponse:
    """``prefix`` goes before the curl command (e.g. a wrapper placing it in a cgroup)."""
    body_path = workdir / "sanity-body.out"
    argv = curl_argv(url, shape, protocol, workdir, body_path, prefix, tls)
    proc = subprocess.run(argv, capture_output=True, timeout=15)
    verbose = proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        last = verbose.strip().splitlines()[-1:] or ["(no output)"]
        raise SanityError(f"curl {url + shape.path} failed (exit {proc.returncode}): {last[0]}")
    if url.startswith("https://") and "SSL connection using" not in verbose:
        raise SanityError(f"curl {url + shape.path}: no TLS handshake in curl's output")
    version, status, headers = "", 0, {}
    for line in verbose.splitlines():
        if not line.startswith("< "):
            continue
        text = line[2:].strip()
        if text.startswith("HTTP/"):
            parts = text.split()
            version, status = parts[0], int(parts[1])
            headers = {}  # a 100-continue or similar came first; keep the final response
        elif ":" in text:
            name, _, value = text.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = body_path.read_bytes() if body_path.exists() else b""
    body_path.unlink(missing_ok=True)
    return CurlResponse(version=version, status=status, headers=headers, body=body)


def check(
    url: str,
    shape: RequestShape,
    protocol: str,
    workdir: Path,
    backend: str,
    attempts: int = 20,
    prefix: list[str] | None = None,
    tls: Tls | None = None,
) -> CurlResponse:
    """Raises :class:`SanityError` unless ``url`` routes ``shape`` to ``backend``. Retries for a
    few seconds: a proxy may accept connections slightly before its routes are live."""
    error: SanityError | None = None
    for _ in range(attempts):
        try:
            return _check_once(url, shape, protocol, workdir, backend, prefix, tls)
        except SanityError as e:
            error = e
            time.sleep(0.25)
    assert error is not None
    raise error


def _check_once(
    url: str,
    shape: RequestShape,
    protocol: str,
    workdir: Path,
    backend: str,
    prefix: list[str] | None,
    tls: Tls | None,
) -> CurlResponse:
    http2 = protocol != "http1"
    resp = curl(url, shape, protocol, workdir, prefix, tls)
    want_version = "HTTP/2" if http2 else "HTTP/1.1"
    where = f"{url}{shape.path}"
    if resp.version != want_version:
        raise SanityError(f"{where}: answered over {resp.version or '?'}, not {want_version}")
    if resp.status != 200:
        snippet = resp.body[:200].decode(errors="replace")
        raise SanityError(f"{where}: status {resp.status}, not 200; body: {snippet!r}")
    if protocol == "grpc":
        if resp.headers.get("grpc-status") != "0":
            raise SanityError(f"{where}: grpc-status {resp.headers.get('grpc-status')!r}, not '0'")
        if resp.headers.get("x-backend") != backend:
            raise SanityError(f"{where}: x-backend {resp.headers.get('x-backend')!r}, not {backend!r}")
        sent = (workdir / shape.body_file).read_bytes() if shape.body_file else b""
        if resp.body != sent:
            raise SanityError(f"{where}: the gRPC message did not come back unchanged")
        return resp
    try:
        said = json.loads(resp.body).get("backend")
    except (ValueError, AttributeError):
        raise SanityError(f"{where}: body is not the backend's JSON: {resp.body[:200]!r}") from None
    if said != backend:
        raise SanityError(f"{where}: answered by backend {said!r}, not {backend!r}")
    return resp
