#!/usr/bin/env python3
"""A tiny OTLP/gRPC trace sink for the tracing workloads: accepts every export, counts spans.

    python3 benches/harness/otlp_sink.py --listen 127.0.0.1:0

It speaks just enough HTTP/2 (cleartext, prior knowledge, as gRPC clients do) to take
``opentelemetry.proto.collector.trace.v1.TraceService/Export`` calls from Sluice's OTLP
exporter and from Envoy's OpenTelemetry tracer: it reads each request to its end, answers
``200``, an empty ``ExportTraceServiceResponse`` and ``grpc-status: 0``, and never looks at
the request headers (so it needs no HPACK decoder). Flow-control windows are opened wide and
replenished as data arrives. After each export it prints one line with running totals,

    export spans=5 bytes=2412 exports_total=12 spans_total=60

which the harness reads (``read_totals``) to check that the proxy really traced. Standard
library only; one thread per connection (a proxy opens one or two).
"""

from __future__ import annotations

import argparse
import gzip
import re
import socket
import socketserver
import sys
import threading
from dataclasses import dataclass

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types and flags (RFC 9113).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE = range(9)
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def _literal(name: bytes, value: bytes) -> bytes:
    """HPACK literal header field without indexing, new name, no Huffman (short strings)."""
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


#: A dynamic table size update to 0: valid whatever the client's SETTINGS_HEADER_TABLE_SIZE,
#: and required after the client lowers it. Sent at the start of the first header block and
#: after any SETTINGS that changes the table size; the sink never indexes anything.
TABLE_SIZE_ZERO = b"\x20"
#: ":status: 200" (static table index 8) and the gRPC content type.
RESPONSE_HEADERS = b"\x88" + _literal(b"content-type", b"application/grpc")
TRAILERS = _literal(b"grpc-status", b"0")
#: One uncompressed gRPC message of 0 bytes: an empty ExportTraceServiceResponse.
EMPTY_MESSAGE = b"\x00\x00\x00\x00\x00"


def response(stream: int, table_update: bool) -> bytes:
    head = (TABLE_SIZE_ZERO if table_update else b"") + RESPONSE_HEADERS
    return (
        frame(HEADERS, END_HEADERS, stream, head)
        + frame(DATA, 0, stream, EMPTY_MESSAGE)
        + frame(HEADERS, END_HEADERS | END_STREAM, stream, TRAILERS)
    )


# ---------------------------------------------------------------------------------------------
# Counting spans


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def fields(buf: bytes):
    """(field number, wire type, value) of a protobuf message; length-delimited values are
    bytes, the others ints (fixed ones little-endian)."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = int.from_bytes(buf[i : i + 8], "little"), i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire == 5:
            value, i = int.from_bytes(buf[i : i + 4], "little"), i + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if i > len(buf):
            raise ValueError("truncated field")
        yield number, wire, value


def count_spans(request: bytes) -> int:
    """Spans in an ExportTraceServiceRequest: resource_spans (1) -> scope_spans (2) ->
    spans (2)."""
    count = 0
    for n1, w1, resource_spans in fields(request):
        if n1 != 1 or w1 != 2:
            continue
        for n2, w2, scope_spans in fields(resource_spans):
            if n2 != 2 or w2 != 2:
                continue
            count += sum(1 for n3, w3, _ in fields(scope_spans) if n3 == 2 and w3 == 2)
    return count


def grpc_messages(body: bytes) -> list[bytes]:
    """The messages of a gRPC request body (5-byte prefix each; gzip when flagged)."""
    out, i = [], 0
    while i + 5 <= len(body):
        compressed, n = body[i], int.from_bytes(body[i + 1 : i + 5], "big")
        message = body[i + 5 : i + 5 + n]
        i += 5 + n
        out.append(gzip.decompress(message) if compressed else message)
    return out


_TOTALS = re.compile(r"exports_total=(\d+) spans_total=(\d+)")


def read_totals(log: str) -> tuple[int, int]:
    """(exports, spans) received so far, from the sink's output."""
    for line in reversed(log.splitlines()):
        m = _TOTALS.search(line)
        if m:
            return int(m.group(1)), int(m.group(2))
    return 0, 0


# ---------------------------------------------------------------------------------------------
# Serving


@dataclass
class Totals:
    exports: int = 0
    spans: int = 0
    errors: int = 0


class Sink:
    def __init__(self, out=sys.stdout) -> None:
        self.totals = Totals()
        self.lock = threading.Lock()
        self.out = out

    def record(self, body: bytes) -> None:
        try:
            spans = sum(count_spans(m) for m in grpc_messages(body))
            error = ""
        except (ValueError, OSError, EOFError) as e:
            spans, error = 0, f" error={e!r}"
        with self.lock:
            self.totals.exports += 1
            self.totals.spans += spans
            self.totals.errors += bool(error)
            t = self.totals
            print(
                f"export spans={spans} bytes={len(body)} exports_total={t.exports}"
                f" spans_total={t.spans}{error}",
                file=self.out,
                flush=True,
            )

    def serve_connection(self, sock: socket.socket) -> None:
        """One HTTP/2 connection, until the peer closes it or sends GOAWAY."""
        reader = sock.makefile("rb")

        def read(n: int) -> bytes:
            data = reader.read(n)
            if data is None or len(data) < n:
                raise EOFError
            return data

        try:
            if read(len(PREFACE)) != PREFACE:
                return
            sock.sendall(
                frame(SETTINGS, 0, 0, SETTINGS_INITIAL_WINDOW_SIZE.to_bytes(2, "big") + MAX_WINDOW.to_bytes(4, "big"))
                + frame(WINDOW_UPDATE, 0, 0, (MAX_WINDOW - DEFAULT_WINDOW).to_bytes(4, "big"))
            )
            streams: dict[int, bytearray] = {}
            table_update = True
            while True:
                header = read(9)
                length = int.from_bytes(header[:3], "big")
                kind, flags = header[3], header[4]
                stream = int.from_bytes(header[5:9], "big") & 0x7FFFFFFF
                payload = read(length) if length else b""
                if kind == DATA:
                    data = payload
                    if flags & PADDED:
                        data = payload[1 : len(payload) - payload[0]]
                    streams.setdefault(stream, bytearray()).extend(data)
                    if length:
                        sock.sendall(frame(WINDOW_UPDATE, 0, 0, length.to_bytes(4, "big")))
                elif kind == HEADERS:
                    streams.setdefault(stream, bytearray())
                elif kind == SETTINGS:
                    if not flags & ACK:
                        for i in range(0, len(payload) - 5, 6):
                            if int.from_bytes(payload[i : i + 2], "big") == SETTINGS_HEADER_TABLE_SIZE:
                                table_update = True
                        sock.sendall(frame(SETTINGS, ACK, 0))
                    continue
                elif kind == PING:
                    if not flags & ACK:
                        sock.sendall(frame(PING, ACK, 0, payload))
                    continue
                elif kind == RST_STREAM:
                    streams.pop(stream, None)
                    continue
                elif kind == GOAWAY:
                    return
                else:  # PRIORITY, WINDOW_UPDATE, CONTINUATION, unknown: nothing to do
                    continue
                if flags & END_STREAM and stream in streams:
                    self.record(bytes(streams.pop(stream)))
                    sock.sendall(response(stream, table_update))
                    table_update = False
        except (EOFError, OSError):
            return
        finally:
            reader.close()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="OTLP/gRPC trace sink that counts spans")
    p.add_argument("--listen", default="127.0.0.1:0", help="host:port (port 0 picks one)")
    args = p.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    sink = Sink()

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sink.serve_connection(self.request)

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    with Server((host, int(port)), Handler) as server:
        bound = server.server_address
        print(f"listening on {bound[0]}:{bound[1]}", flush=True)
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
