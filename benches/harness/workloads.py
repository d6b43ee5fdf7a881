"""The benchmark workloads and the configurations they run on.

To add a workload, append a :class:`Workload` to ``WORKLOADS``: a name, the config set it runs
on, a load builder from :mod:`loadgen` with the request shape, the protocol for the sanity
check, and any extra command-line arguments per proxy. For example, a fast-path-off variant of
the HTTP/1.1 workload is::

    Workload(
        name="http1-nofastpath",
        description="HTTP/1.1 keep-alive, same-node fast path disabled",
        config="http",
        load=wrk(connections=50),
        protocol="http1",
        proxy_args={"sluice": ["--fast-path", "off"]},
    )

HTTPS needs ``scheme="https"`` (the load generators and curl then speak TLS; certificates go
in the config set's files).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .loadgen import Builder, RequestShape, h2load, wrk

BACKEND_NAME = "bench-backend"
BACKEND_ADDR = "127.0.0.1:18080"


@dataclass(frozen=True)
class ConfigSet:
    """A directory of CEC + Kubernetes manifests that Sluice loads with ``--config`` and that
    ``sluice translate --envoy-bootstrap`` turns into Envoy's bootstrap."""

    name: str
    #: Files under benches/configs/ copied into the run's config directory.
    files: tuple[str, ...]
    #: The listener address the CEC binds (what the load generator targets).
    listen: str
    #: Files generated before the run: name -> function writing it (deterministic).
    generated: dict[str, Callable[[Path], None]] = field(default_factory=dict)


def _gen_routes(count: int) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        # Imported lazily: gen_routes.py lives next to loadtest.py, not in this package.
        import gen_routes  # noqa: PLC0415

        path.write_text(gen_routes.render(count), encoding="utf-8")

    return write


CONFIG_SETS: dict[str, ConfigSet] = {
    c.name: c
    for c in (
        ConfigSet("http", files=("http.yaml", "backend.yaml"), listen="127.0.0.1:10080"),
        ConfigSet(
            "routes-10k",
            files=("routes-10k.yaml", "backend.yaml"),
            listen="127.0.0.1:10080",
            generated={"routes-10k.yaml": _gen_routes(10_000)},
        ),
    )
}


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    #: Key into CONFIG_SETS.
    config: str
    load: Builder
    #: "http1", "h2c" or "grpc": how the sanity check talks to the target.
    protocol: str
    request: RequestShape = RequestShape()
    scheme: str = "http"
    #: Extra command-line arguments per proxy ("sluice", "envoy"), e.g. a feature switch.
    proxy_args: dict[str, list[str]] = field(default_factory=dict)


#: The gRPC request body file (written into the run's work directory by ``write_grpc_body``).
GRPC_BODY = "grpc-request.bin"


def write_grpc_body(workdir: Path, payload_bytes: int = 64) -> None:
    """One length-prefixed gRPC message: a protobuf with field 1 (bytes) of ``payload_bytes``."""
    payload = bytes(i % 251 for i in range(payload_bytes))
    message = b"\x0a" + _varint(len(payload)) + payload
    frame = b"\x00" + len(message).to_bytes(4, "big") + message
    (workdir / GRPC_BODY).write_bytes(frame)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


WORKLOADS: list[Workload] = [
    Workload(
        name="http1",
        description="HTTP/1.1 keep-alive, wrk 1 thread, 50 connections, GET /",
        config="http",
        load=wrk(connections=50),
        protocol="http1",
    ),
    Workload(
        name="h2c",
        description="h2c (prior knowledge), h2load 10 connections x 10 streams, GET /",
        config="http",
        load=h2load(clients=10, streams=10),
        protocol="h2c",
    ),
    Workload(
        name="grpc",
        description="gRPC unary over h2c, h2load 10 connections x 10 streams, 64-byte payload",
        config="http",
        load=h2load(clients=10, streams=10),
        protocol="grpc",
        request=RequestShape(
            path="/bench.Echo/Unary",
            headers=(("content-type", "application/grpc"), ("te", "trailers")),
            body_file=GRPC_BODY,
        ),
    ),
    Workload(
        name="routes-10k",
        description="HTTP/1.1 keep-alive through 10,000 routes, the matching one near the end",
        config="routes-10k",
        load=wrk(connections=50),
        protocol="http1",
        request=RequestShape(path="/bench/target", headers=(("x-bench-route", "target"),)),
    ),
]
