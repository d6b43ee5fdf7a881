"""Unit tests of the harness's pure parts: output parsers, statistics, report, generator.

    python3 -m unittest discover -s benches -p 'test_*.py'
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gen_routes  # noqa: E402
from harness import cgroups, checks, otlp_sink, report, tls  # noqa: E402
from harness.loadgen import ParseError, RequestShape, parse_h2load, parse_wrk, percentile  # noqa: E402
from harness.report import Round, Row  # noqa: E402
from harness.workloads import (  # noqa: E402
    CONFIG_SETS,
    GRPC_BODY,
    OTLP_SINK_CLUSTER,
    WORKLOADS,
    envoy_otel_tracing,
    fastpath_counters,
    fastpath_spliced,
    write_grpc_body,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

WRK_OUT = """\
Running 3s test @ http://127.0.0.1:10080/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   398.31us  214.53us   4.69ms   93.30%
    Req/Sec   107.37k     8.08k  124.31k    73.33%
  Latency Distribution
     50%  409.00us
     75%  467.00us
     90%  520.00us
     99%    1.05ms
  320190 requests in 3.01s, 344.44MB read
  Non-2xx or 3xx responses: 7
  Socket errors: connect 0, read 2, write 0, timeout 1
Requests/sec: 106527.07
Transfer/sec:    114.60MB
"""

H2LOAD_OUT = """\
finished in 3.00s, 97817.33 req/s, 98.04MB/s
requests: 293452 total, 293552 started, 293452 done, 293450 succeeded, 2 failed, 0 errored, 0 timeout
status codes: 293450 2xx, 0 3xx, 0 4xx, 2 5xx
traffic: 294.13MB (308419712) total, 2.52MB (2642178) headers (space savings 89.15%)
"""


class ParserTests(unittest.TestCase):
    def test_wrk(self) -> None:
        r = parse_wrk(WRK_OUT)
        self.assertEqual(r.requests, 320190)
        self.assertAlmostEqual(r.duration_s, 3.01)
        self.assertAlmostEqual(r.rps, 106527.07)
        self.assertAlmostEqual(r.p50_ms, 0.409)
        self.assertAlmostEqual(r.p99_ms, 1.05)
        self.assertEqual(r.errors["non_2xx_3xx"], 7)
        self.assertEqual(r.error_summary(), "non_2xx_3xx=7, read=2, timeout=1")

    def test_wrk_clean_run_has_no_errors(self) -> None:
        clean = re.sub(r"  (Non-2xx|Socket errors).*\n", "", WRK_OUT)
        self.assertEqual(parse_wrk(clean).error_summary(), "")

    def test_wrk_garbage(self) -> None:
        with self.assertRaises(ParseError):
            parse_wrk("unable to connect to 127.0.0.1:10080 Connection refused")

    def test_h2load(self) -> None:
        r = parse_h2load(H2LOAD_OUT, [3.0, 1.0, 2.0, 4.0])
        self.assertEqual(r.requests, 293450)
        self.assertAlmostEqual(r.rps, 97817.33)
        self.assertEqual(r.p50_ms, 2.0)
        self.assertEqual(r.p99_ms, 4.0)
        self.assertEqual(r.error_summary(), "failed=2, 5xx=2")

    def test_percentile_nearest_rank(self) -> None:
        values = [float(v) for v in range(1, 101)]
        self.assertEqual(percentile(values, 50), 50.0)
        self.assertEqual(percentile(values, 99), 99.0)
        self.assertEqual(percentile([7.0], 99), 7.0)
        self.assertIsNone(percentile([], 50))


def _row(proxy: str, rps: list[float], rss: float) -> Row:
    rounds = [
        Round(index=i + 1, ok=True, rps=v, p50_ms=1.0, p99_ms=2.0, cpu_per_10k=1e4 / v,
              idle_rss_mib=rss, peak_rss_mib=rss * 2)
        for i, v in enumerate(rps)
    ]  # fmt: skip
    return Row(workload="http1", proxy=proxy, rounds=rounds)


class ReportTests(unittest.TestCase):
    def table(self) -> dict[str, dict[str, Row]]:
        sluice = _row("sluice", [30_000, 31_000, 29_000], 8.0)
        sluice.rounds.append(Round(index=4, ok=False, error="sanity check: 404"))
        return {
            "http1": {
                "sluice": sluice,
                "envoy": _row("envoy", [10_000, 12_000, 11_000], 64.0),
                "direct": Row(workload="http1", proxy="direct", unavailable="no reason"),
            }
        }

    def test_medians_ignore_failed_rounds(self) -> None:
        row = self.table()["http1"]["sluice"]
        self.assertEqual(row.median("rps"), 30_000)
        self.assertAlmostEqual(row.spread("rps"), 1_000 / 30_000)

    def test_ratios(self) -> None:
        rows = self.table()["http1"]
        self.assertAlmostEqual(report.ratio(rows, "rps"), 30_000 / 11_000)
        self.assertAlmostEqual(report.ratio(rows, "idle_rss_mib"), 0.125)
        self.assertIsNone(report.ratio({"sluice": rows["sluice"]}, "rps"))

    def test_markdown(self) -> None:
        meta = {
            "date": "2026-01-01 00:00 UTC",
            "command": "python3 benches/loadtest.py --quick",
            "machine": {"cpu_model": "Test CPU", "cpus": "2", "kernel": "6.0"},
            "versions": {"envoy": "1.40.0"},
            "settings": {"proxies": ["sluice", "envoy", "direct"], "rounds": 3,
                         "duration_s": 2, "warmup_s": 1, "body_bytes": 1024,
                         "proxy_cpu": 0, "load_cpu": 1, "pinned": True},
        }  # fmt: skip
        workloads = [{"name": "http1", "description": "d", "config": "c", "command": "wrk x"}]
        text = report.markdown(meta, workloads, self.table())
        self.assertIn("| http1 | sluice | 30,000 ±3% |", text)
        self.assertIn("**direct not available:** no reason", text)
        self.assertIn("| http1 | 2.73 ✅ |", text)  # req/s ratio vs target 1.5
        self.assertIn("sluice round 4: sanity check: 404", text)
        self.assertIn("`python3 benches/loadtest.py --quick`", text)

    def test_publish_keeps_hand_written_notes(self) -> None:
        new = f"table v2\n{report.NOTES_BEGIN}\n{report.NOTES_PLACEHOLDER}\n{report.NOTES_END}\n"
        old = f"table v1\n{report.NOTES_BEGIN}\nflamegraph says: parsing\n{report.NOTES_END}\n"
        merged = report.carry_notes(new, old)
        self.assertIn("table v2", merged)
        self.assertIn("flamegraph says: parsing", merged)
        self.assertNotIn(report.NOTES_PLACEHOLDER, merged)
        self.assertEqual(report.carry_notes(new, "no markers"), new)

    @unittest.skipUnless(importlib.util.find_spec("matplotlib"), "matplotlib not installed")
    def test_chart_is_a_png(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "ratios.png"
            report.chart(path, self.table())
            self.assertEqual(path.read_bytes()[:8], b"\x89PNG\r\n\x1a\n")


class GeneratorTests(unittest.TestCase):
    def test_routes_are_deterministic_with_the_target_near_the_end(self) -> None:
        text = gen_routes.render(100)
        self.assertEqual(text, gen_routes.render(100))
        routes = [line for line in text.splitlines() if line.strip().startswith("- match:")]
        self.assertEqual(len(routes), 100)
        target = [i for i, line in enumerate(routes) if gen_routes.TARGET_PATH in line]
        self.assertEqual(target, [100 - gen_routes.TARGET_FROM_END])
        for kind in ("path:", "prefix:", "x-tenant", "safe_regex"):
            self.assertTrue(any(kind in r for r in routes), kind)

    def test_too_few_routes(self) -> None:
        with self.assertRaises(ValueError):
            gen_routes.render(gen_routes.TARGET_FROM_END)


class GrpcBodyTests(unittest.TestCase):
    def test_length_prefixed_message(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            write_grpc_body(Path(d), payload_bytes=200)
            frame = (Path(d) / GRPC_BODY).read_bytes()
        self.assertEqual(frame[0], 0)
        self.assertEqual(int.from_bytes(frame[1:5], "big"), len(frame) - 5)
        # field 1, wire type 2, varint length 200 = 0xc8 0x01
        self.assertEqual(frame[5:8], b"\x0a\xc8\x01")


SHUTDOWN_LINE = (
    "2026-01-01T00:00:00.000000Z \x1b[32m INFO\x1b[0m \x1b[2msluice_proxy::fastpath\x1b[0m\x1b[2m:\x1b[0m"
    " eBPF fast path counters at shutdown \x1b[3mstats\x1b[0m\x1b[2m=\x1b[0m"
    '{"redirected_msgs":420,"redirected_bytes":99000,"passed_bytes":%d,"sockhash_inserts_client":50}'
)


class FastPathTests(unittest.TestCase):
    def test_counters_from_a_coloured_log(self) -> None:
        log = "starting\n" + SHUTDOWN_LINE % 0 + "\neBPF fast path detached\n"
        self.assertEqual(fastpath_counters(log)["redirected_bytes"], 99000)
        self.assertIsNone(fastpath_spliced(log))

    def test_a_round_that_did_not_splice_does_not_count(self) -> None:
        self.assertIn("no fast-path counters", fastpath_spliced("INFO eBPF fast path off\n"))
        self.assertIn("through TCP", fastpath_spliced(SHUTDOWN_LINE % 5000))
        nothing = SHUTDOWN_LINE.replace('"redirected_msgs":420', '"redirected_msgs":0') % 0
        self.assertIn("carried nothing", fastpath_spliced(nothing))

    def test_cgroup2_mount_on_unified_and_hybrid_hosts(self) -> None:
        unified = "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
        hybrid = (
            "31 23 0:27 / /sys/fs/cgroup/memory rw shared:5 - cgroup cgroup rw,memory\n"
            "32 23 0:28 / /sys/fs/cgroup/unified rw shared:6 - cgroup2 cgroup2 rw\n"
        )
        self.assertEqual(cgroups.cgroup2_mount(unified), Path("/sys/fs/cgroup"))
        self.assertEqual(cgroups.cgroup2_mount(hybrid), Path("/sys/fs/cgroup/unified"))
        self.assertIsNone(cgroups.cgroup2_mount("31 23 0:27 / /proc rw - proc proc rw\n"))

    def test_wrap_joins_the_cgroup_then_execs(self) -> None:
        argv = cgroups.wrap(Path("/cg/app"), ["wrk", "-c50"], {"K": "v"})
        self.assertEqual(argv[:2], ["sh", "-c"])
        self.assertIn("cgroup.procs", argv[2])
        self.assertIn("exec", argv[2])
        self.assertEqual(argv[3:], ["/cg/app", "env", "K=v", "wrk", "-c50"])


class TlsTests(unittest.TestCase):
    def test_https_config_is_a_template_without_key_material(self) -> None:
        text = (CONFIGS / "https.yaml").read_text(encoding="utf-8")
        self.assertNotIn("BEGIN", text)
        self.assertIn('filename: "@TLS_DIR@/cert.pem"', text)
        self.assertIn('alpn_protocols: ["h2,http/1.1"]', text)
        rendered = tls.render(text, Path("/run/w/tls"))
        self.assertIn('filename: "/run/w/tls/key.pem"', rendered)
        self.assertNotIn(tls.TLS_DIR_PLACEHOLDER, rendered)

    def test_full_handshake_config_turns_resumption_off(self) -> None:
        text = (CONFIGS / "https.yaml").read_text(encoding="utf-8")
        out = tls.without_session_resumption(text)
        added = [line for line in out.splitlines() if line not in text.splitlines()]
        typed = next(line for line in text.splitlines() if "DownstreamTlsContext" in line and "@type" in line)
        indent = typed[: len(typed) - len(typed.lstrip())]
        self.assertEqual(
            added,
            [
                f"{indent}disable_stateless_session_resumption: true",
                f"{indent}disable_stateful_session_resumption: true",
            ],
        )
        with self.assertRaises(ValueError):
            tls.without_session_resumption((CONFIGS / "http.yaml").read_text(encoding="utf-8"))

    def test_openssl_makes_an_ecdsa_p256_certificate(self) -> None:
        argv = tls.openssl_argv(Path("/d"))
        self.assertIn("ec_paramgen_curve:prime256v1", argv)
        self.assertIn("subjectAltName=DNS:localhost,IP:127.0.0.1", argv)
        self.assertEqual(argv[-4:], ["-keyout", "/d/key.pem", "-out", "/d/cert.pem"])

    @unittest.skipUnless(shutil.which("openssl"), "openssl not installed")
    def test_certificate(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            cert = tls.make_certificate(Path(d) / "tls")
            text = subprocess.run(
                ["openssl", "x509", "-in", str(cert), "-noout", "-text"],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
        self.assertIn("prime256v1", text)
        self.assertIn("IP Address:127.0.0.1", text)

    def test_https_workloads(self) -> None:
        by_name = {w.name: w for w in WORKLOADS}
        https, handshakes = by_name["https"], by_name["tls-handshake"]
        self.assertEqual(https.url, "https://localhost:10443")
        self.assertEqual(by_name["http1"].url, "http://127.0.0.1:10080")
        self.assertTrue(CONFIG_SETS[https.config].tls and CONFIG_SETS[handshakes.config].tls)
        self.assertTrue(handshakes.full_handshakes)
        self.assertIn(("Connection", "close"), handshakes.request.headers)
        cmd = handshakes.load(handshakes.url, handshakes.request, 2, Path("/w"))
        self.assertEqual(cmd.argv[-3:], ["-H", "Connection: close", "https://localhost:10443/"])

    def test_curl_verifies_the_certificate(self) -> None:
        via = checks.Tls(cacert=Path("/w/tls/cert.pem"), resolve="localhost:10443:127.0.0.1")
        argv = checks.curl_argv(
            "https://localhost:10443", RequestShape(), "h2", Path("/w"), Path("/w/out"), tls=via
        )
        self.assertIn("--http2", argv)
        self.assertEqual(argv[argv.index("--cacert") + 1], "/w/tls/cert.pem")
        self.assertEqual(argv[argv.index("--resolve") + 1], "localhost:10443:127.0.0.1")
        self.assertNotIn("-k", argv)
        plain = checks.curl_argv("http://127.0.0.1:10080", RequestShape(), "grpc", Path("/w"), Path("/o"))
        self.assertIn("--http2-prior-knowledge", plain)
        self.assertNotIn("--cacert", plain)


def _pb(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (short payloads)."""
    assert len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


def _export_request(spans_per_scope: list[int]) -> bytes:
    span = _pb(5, b"GET /") + bytes([6 << 3, 2])  # name, kind = SERVER
    scopes = b"".join(_pb(2, _pb(1, _pb(1, b"sluice")) + _pb(2, span) * n) for n in spans_per_scope)
    resource_spans = _pb(1, b"") + scopes
    return _pb(1, resource_spans)


class OtlpSinkTests(unittest.TestCase):
    def test_count_spans(self) -> None:
        self.assertEqual(otlp_sink.count_spans(_export_request([2, 3])), 5)
        self.assertEqual(otlp_sink.count_spans(b""), 0)
        with self.assertRaises(ValueError):
            otlp_sink.count_spans(b"\x0a\x05ab")

    def test_grpc_messages(self) -> None:
        msg = _export_request([1])
        body = b"\x00" + len(msg).to_bytes(4, "big") + msg
        self.assertEqual(otlp_sink.grpc_messages(body * 2), [msg, msg])

    def test_read_totals(self) -> None:
        log = "listening on 127.0.0.1:1\nexport spans=5 bytes=9 exports_total=1 spans_total=5\n" \
              "export spans=3 bytes=9 exports_total=2 spans_total=8\n"  # fmt: skip
        self.assertEqual(otlp_sink.read_totals(log), (2, 8))
        self.assertEqual(otlp_sink.read_totals("listening on x\n"), (0, 0))

    def test_an_export_over_http2(self) -> None:
        """A client's frames in, a gRPC response with grpc-status 0 out, spans counted."""
        msg = _export_request([4])
        body = b"\x00" + len(msg).to_bytes(4, "big") + msg
        f = otlp_sink.frame
        client, server = socket.socketpair()
        out = tempfile.TemporaryFile("w+")
        self.addCleanup(out.close)
        sink = otlp_sink.Sink(out=out)
        thread = threading.Thread(target=sink.serve_connection, args=(server,))
        thread.start()
        try:
            client.sendall(
                otlp_sink.PREFACE
                + f(otlp_sink.SETTINGS, 0, 0, b"\x00\x01\x00\x00\x10\x00")
                + f(otlp_sink.HEADERS, otlp_sink.END_HEADERS, 1, b"\x83\x86")  # not decoded
                + f(otlp_sink.DATA, 0, 1, body[:7])
                + f(otlp_sink.DATA, otlp_sink.END_STREAM, 1, body[7:])
                + f(otlp_sink.PING, 0, 0, b"12345678")
                + f(otlp_sink.GOAWAY, 0, 0, bytes(8))
            )
            thread.join(timeout=5)
            self.assertFalse(thread.is_alive())
            server.close()  # the sink leaves closing to its caller
            frames = _read_frames(client)
        finally:
            client.close()
            server.close()
        kinds = [(k, fl, s) for k, fl, s, _ in frames]
        self.assertEqual(kinds[0][:1], (otlp_sink.SETTINGS,))
        self.assertIn((otlp_sink.SETTINGS, otlp_sink.ACK, 0), kinds)
        self.assertIn((otlp_sink.PING, otlp_sink.ACK, 0), kinds)
        on_stream = [(k, fl, p) for k, fl, s, p in frames if s == 1]
        self.assertEqual([k for k, _, _ in on_stream], [otlp_sink.HEADERS, otlp_sink.DATA, otlp_sink.HEADERS])
        self.assertTrue(on_stream[0][2].startswith(otlp_sink.TABLE_SIZE_ZERO + b"\x88"))
        self.assertEqual(on_stream[1][2], otlp_sink.EMPTY_MESSAGE)
        self.assertEqual(on_stream[2][1], otlp_sink.END_HEADERS | otlp_sink.END_STREAM)
        self.assertIn(b"grpc-status", on_stream[2][2])
        out.seek(0)
        self.assertEqual(otlp_sink.read_totals(out.read()), (1, 4))


def _read_frames(sock: socket.socket) -> list[tuple[int, int, int, bytes]]:
    sock.settimeout(5)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    frames, i = [], 0
    while i + 9 <= len(data):
        n = int.from_bytes(data[i : i + 3], "big")
        stream = int.from_bytes(data[i + 5 : i + 9], "big")
        frames.append((data[i + 3], data[i + 4], stream, data[i + 9 : i + 9 + n]))
        i += 9 + n
    return frames


class TracingTests(unittest.TestCase):
    BOOTSTRAP = {
        "static_resources": {
            "listeners": [{"filter_chains": [{"filters": [
                {"name": "envoy.filters.network.http_connection_manager", "typed_config": {"stat_prefix": "x"}},
            ]}]}],
            "clusters": [{"name": "default/bench-backend"}],
        }
    }  # fmt: skip

    def test_envoy_gets_the_tracing_sluice_gets_from_flags(self) -> None:
        import copy  # noqa: PLC0415

        b = copy.deepcopy(self.BOOTSTRAP)
        envoy_otel_tracing(1.0)(b, {"otlp_sink": "127.0.0.1:4317"})
        hcm = b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        self.assertEqual(hcm["tracing"]["random_sampling"], {"value": 1.0})
        self.assertTrue(hcm["tracing"]["spawn_upstream_span"])
        provider = hcm["tracing"]["provider"]["typed_config"]
        self.assertEqual(provider["grpc_service"]["envoy_grpc"]["cluster_name"], OTLP_SINK_CLUSTER)
        sink = b["static_resources"]["clusters"][-1]
        self.assertEqual(sink["name"], OTLP_SINK_CLUSTER)
        address = sink["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        self.assertEqual(address["socket_address"], {"address": "127.0.0.1", "port_value": 4317})
        with self.assertRaises(ValueError):
            envoy_otel_tracing(1.0)({"static_resources": {}}, {"otlp_sink": "127.0.0.1:1"})

    def test_tracing_workload(self) -> None:
        w = {w.name: w for w in WORKLOADS}["tracing-1pct"]
        self.assertTrue(w.trace_sink)
        self.assertEqual(w.baseline, "http1")
        self.assertEqual(
            w.proxy_args["sluice"],
            ["--otlp-endpoint", "http://{otlp_sink}", "--trace-sampling", "0.01"],
        )

    def test_baseline_section(self) -> None:
        def row(workload: str, proxy: str, rps: float, spans: int | None) -> Row:
            r = Round(index=1, ok=True, rps=rps, p99_ms=2.0, cpu_per_10k=1.0,
                      proxied_requests=10_000, trace_spans=spans)  # fmt: skip
            return Row(workload=workload, proxy=proxy, rounds=[r])

        table = {
            "http1": {"sluice": row("http1", "sluice", 20_000, None)},
            "tracing-1pct": {
                "sluice": row("tracing-1pct", "sluice", 19_000, 200),
                "envoy": row("tracing-1pct", "envoy", 9_000, 200),
            },
        }
        workloads = [{"name": "http1"}, {"name": "tracing-1pct", "baseline": "http1"}]
        text = "\n".join(report.baseline_section(workloads, table))
        self.assertIn("| tracing-1pct | http1 | sluice | 19,000 vs 20,000 (0.95×) |", text)
        self.assertIn("| 2.00 |", text)
        self.assertNotIn("| envoy |", text)  # no http1 row for envoy
        self.assertEqual(report.baseline_section(workloads[1:], {"tracing-1pct": table["tracing-1pct"]}), [])


if __name__ == "__main__":
    unittest.main()
