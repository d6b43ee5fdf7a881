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

HTTPS needs ``scheme="https"``, a config set with ``tls=True`` (its files name the run's
certificate as ``@TLS_DIR@/cert.pem``, see :mod:`tls`) and ``server_name`` (the URL's host, so
the SNI is a name; curl is pinned to the listener's address with ``--resolve``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import tls
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
    #: The files name the run's TLS certificate as ``@TLS_DIR@/cert.pem`` and
    #: ``@TLS_DIR@/key.pem``; staging makes the certificate and fills in the directory.
    tls: bool = False


def _gen_routes(count: int) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        # Imported lazily: gen_routes.py lives next to loadtest.py, not in this package.
        import gen_routes  # noqa: PLC0415

        path.write_text(gen_routes.render(count), encoding="utf-8")

    return write


CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


def _derived(source: str, edit: Callable[[str], str]) -> Callable[[Path], None]:
    """A generated file: ``edit`` applied to the committed ``configs/<source>``."""

    def write(path: Path) -> None:
        path.write_text(edit((CONFIGS_DIR / source).read_text(encoding="utf-8")), encoding="utf-8")

    return write


HTTPS_LISTEN = "127.0.0.1:10443"
FULL_HANDSHAKE_CONFIG = "https-full-handshake.yaml"

CONFIG_SETS: dict[str, ConfigSet] = {
    c.name: c
    for c in (
        ConfigSet("http", files=("http.yaml", "backend.yaml"), listen="127.0.0.1:10080"),
        ConfigSet("fastpath", files=("fastpath.yaml", "backend.yaml"), listen="127.0.0.1:10080"),
        ConfigSet(
            "routes-10k",
            files=("routes-10k.yaml", "backend.yaml"),
            listen="127.0.0.1:10080",
            generated={"routes-10k.yaml": _gen_routes(10_000)},
        ),
        ConfigSet("https", files=("https.yaml", "backend.yaml"), listen=HTTPS_LISTEN, tls=True),
        # https.yaml with session resumption off: every connection is a full handshake.
        ConfigSet(
            "https-full-handshake",
            files=(FULL_HANDSHAKE_CONFIG, "backend.yaml"),
            listen=HTTPS_LISTEN,
            generated={
                FULL_HANDSHAKE_CONFIG: _derived("https.yaml", tls.without_session_resumption)
            },
            tls=True,
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
    #: Extra environment variables per proxy.
    proxy_env: dict[str, dict[str, str]] = field(default_factory=dict)
    #: The rows this workload has; the others are reported as not available.
    proxies: tuple[str, ...] = ("sluice", "envoy", "direct")
    #: Where the load generator and the sanity check connect instead of the config set's
    #: listener, e.g. a Service VIP that only the eBPF fast path routes to the listener.
    target: str | None = None
    #: Run the proxy and the load generator in the ``proxy/`` and ``app/`` children of a
    #: per-round cgroup (see :mod:`cgroups`); ``{cgroup}`` and ``{app_cgroup}`` in
    #: ``proxy_args`` and ``proxy_env`` become their paths.
    cgroups: bool = False
    #: Reads the proxy's log after the round; returns why the round must not count (it did not
    #: measure what it claims to), or None.
    check_log: Callable[[str], str | None] | None = None
    #: TLS: the host name in the URL (and so in SNI) instead of the listener's IP address; it
    #: must resolve to that address (``localhost``). Sanity checks also verify the certificate
    #: (the run's self-signed one is its own CA).
    server_name: str | None = None
    #: Sanity checks in other protocols before measuring, e.g. "h2" (HTTP/2 chosen by ALPN).
    also_check: tuple[str, ...] = ()
    #: TLS: the round fails unless the listener refuses to resume a session (every connection
    #: of the load must be a full handshake).
    full_handshakes: bool = False
    #: Start the OTLP trace sink (:mod:`otlp_sink`) for this workload; ``{otlp_sink}`` in
    #: ``proxy_args`` becomes its ``host:port``, and a round fails unless the proxy sent it
    #: spans.
    trace_sink: bool = False
    #: Edits Envoy's bootstrap (in place) for this workload only, to configure what Sluice gets
    #: from a command-line flag; the second argument maps ``otlp_sink`` to the sink's address.
    envoy_bootstrap_edit: Callable[[dict, dict[str, str]], None] | None = None
    #: A workload this one is best compared with (the same load without the feature), shown
    #: side by side in the report.
    baseline: str | None = None

    @property
    def address(self) -> str:
        """``host:port`` the load generator and the sanity check connect to."""
        return self.target or CONFIG_SETS[self.config].listen

    @property
    def url(self) -> str:
        """The load's URL without the path (the host is ``server_name`` when there is one)."""
        host, _, port = self.address.rpartition(":")
        return f"{self.scheme}://{self.server_name or host}:{port}"


#: Service VIP of configs/fastpath.yaml, redirected by the fast path to 127.0.0.1:10080.
FASTPATH_VIP = "127.96.80.10:80"


def fastpath_counters(log: str) -> dict[str, int] | None:
    """The fast-path counters Sluice logs when it stops (``eBPF fast path counters at
    shutdown stats={...}``), or None if the log has no such line."""
    for line in reversed(log.splitlines()):
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)  # the text log may carry ANSI colours
        if "eBPF fast path counters at shutdown" in line and "stats=" in line:
            try:
                return json.loads(line.split("stats=", 1)[1].strip())
            except ValueError:
                return None
    return None


def fastpath_spliced(log: str) -> str | None:
    """A fast-path round counts only if the bytes between load generator and Sluice really
    went by sk_msg redirect."""
    c = fastpath_counters(log)
    if c is None:
        return "Sluice logged no fast-path counters at shutdown (was the fast path on?)"
    if not c.get("redirected_msgs") or not c.get("sockhash_inserts_client"):
        return f"the fast path carried nothing: {c}"
    if c.get("passed_bytes", 0) > c.get("redirected_bytes", 0) // 100:
        return f"more than 1 % of the spliced bytes went through TCP: {c}"
    return None


# ---------------------------------------------------------------------------------------------
# Tracing

#: Envoy's name for the sink cluster added to its bootstrap.
OTLP_SINK_CLUSTER = "bench-otlp-sink"
HCM_FILTER = "envoy.filters.network.http_connection_manager"


def envoy_otel_tracing(percent: float) -> Callable[[dict, dict[str, str]], None]:
    """A bootstrap edit giving every HTTP connection manager what ``sluice run
    --otlp-endpoint http://<sink> --trace-sampling <percent/100>`` does: OpenTelemetry tracing
    over OTLP/gRPC to the sink at ``percent`` % random sampling, with a client span per
    upstream request as Sluice makes (``spawn_upstream_span``), and a STATIC HTTP/2 cluster
    for the sink."""

    def edit(bootstrap: dict, addrs: dict[str, str]) -> None:
        host, _, port = addrs["otlp_sink"].rpartition(":")
        resources = bootstrap.setdefault("static_resources", {})
        managers = 0
        for listener in resources.get("listeners", []):
            for chain in listener.get("filter_chains", []):
                for f in chain.get("filters", []):
                    if f.get("name") == HCM_FILTER:
                        f["typed_config"]["tracing"] = {
                            "random_sampling": {"value": percent},
                            "spawn_upstream_span": True,
                            "provider": {
                                "name": "envoy.tracers.opentelemetry",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                                    "grpc_service": {
                                        "envoy_grpc": {"cluster_name": OTLP_SINK_CLUSTER},
                                        "timeout": "1s",
                                    },
                                    "service_name": "envoy",
                                },
                            },
                        }
                        managers += 1
        if not managers:
            raise ValueError("the bootstrap has no HTTP connection manager to trace")
        resources.setdefault("clusters", []).append(
            {
                "name": OTLP_SINK_CLUSTER,
                "type": "STATIC",
                "connect_timeout": "1s",
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {"http2_protocol_options": {}},
                    }
                },
                "load_assignment": {
                    "cluster_name": OTLP_SINK_CLUSTER,
                    "endpoints": [
                        {
                            "lb_endpoints": [
                                {
                                    "endpoint": {
                                        "address": {
                                            "socket_address": {"address": host, "port_value": int(port)}
                                        }
                                    }
                                }
                            ]
                        }
                    ],
                },
            }
        )

    return edit


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
    Workload(
        name="fastpath",
        description="same node, eBPF fast path on: wrk (spliced cgroup) -> Service VIP -> Sluice,"
        " HTTP/1.1 keep-alive, 50 connections",
        config="fastpath",
        load=wrk(connections=50),
        protocol="http1",
        proxies=("sluice", "direct"),
        target=FASTPATH_VIP,
        cgroups=True,
        proxy_args={"sluice": ["--fast-path", "on", "--fast-path-cgroup", "{cgroup}"]},
        proxy_env={"sluice": {"SLUICE_FAST_PATH_SPLICE_CGROUPS": "{app_cgroup}"}},
        check_log=fastpath_spliced,
    ),
    Workload(
        name="fastpath-off",
        description="same node, fast path off: wrk -> Sluice's listener, HTTP/1.1 keep-alive,"
        " 50 connections (the same cgroups and pinning as `fastpath`)",
        config="fastpath",
        load=wrk(connections=50),
        protocol="http1",
        proxies=("sluice", "direct"),
        cgroups=True,
        proxy_args={"sluice": ["--fast-path", "off"]},
    ),
    Workload(
        name="https",
        description="HTTPS keep-alive (TLS 1.3, ECDSA P-256 certificate, HTTP/1.1), wrk 1 thread,"
        " 50 connections, GET /",
        config="https",
        load=wrk(connections=50),
        protocol="http1",
        scheme="https",
        server_name=tls.SERVER_NAME,
        also_check=("h2",),
        proxies=("sluice", "envoy"),
    ),
    Workload(
        name="tls-handshake",
        description="TLS handshakes/s: every request on a new connection with a full TLS 1.3"
        " handshake (wrk `Connection: close`; session resumption off in the listener, because wrk"
        " would otherwise resume), 50 connections; req/s = handshakes/s",
        config="https-full-handshake",
        load=wrk(connections=50),
        protocol="http1",
        request=RequestShape(headers=(("Connection", "close"),)),
        scheme="https",
        server_name=tls.SERVER_NAME,
        full_handshakes=True,
        proxies=("sluice", "envoy"),
    ),
    Workload(
        name="tracing-1pct",
        description="`http1` with OpenTelemetry tracing at 1 % sampling to a local OTLP/gRPC sink:"
        " Sluice `--otlp-endpoint --trace-sampling 0.01`, Envoy the same as an HCM `tracing` block"
        " (random_sampling 1 %, spawn_upstream_span) in its bootstrap; compare with `http1`",
        config="http",
        load=wrk(connections=50),
        protocol="http1",
        proxies=("sluice", "envoy"),
        trace_sink=True,
        proxy_args={
            "sluice": ["--otlp-endpoint", "http://{otlp_sink}", "--trace-sampling", "0.01"]
        },
        envoy_bootstrap_edit=envoy_otel_tracing(1.0),
        baseline="http1",
    ),
]
