"""TLS for the HTTPS workloads: the run's certificate, the config templates, resumption.

No certificate or key is committed. Each run makes a self-signed ECDSA P-256 certificate for
``localhost`` and ``127.0.0.1`` with openssl in its work directory (deleted with it at the end
of the run). The HTTPS config sets name their files as ``@TLS_DIR@/cert.pem`` and
``@TLS_DIR@/key.pem``; staging replaces ``@TLS_DIR@`` with that directory, an absolute path,
so Sluice (``--config``) and Envoy (its bootstrap, from ``sluice translate --envoy-bootstrap``
on the staged copy) read the same files.

The load targets ``https://localhost:10443``, not ``https://127.0.0.1:10443``: wrk puts the
URL's host in the SNI extension even when it is an IP address, which RFC 6066 forbids, and
rustls then logs a warning on every handshake (a cost Envoy does not pay). ``localhost``
resolves to 127.0.0.1 for wrk; curl is pinned to it with ``--resolve``.
"""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
from pathlib import Path

#: Placeholder for the certificate directory in the HTTPS config sets.
TLS_DIR_PLACEHOLDER = "@TLS_DIR@"
CERT = "cert.pem"
KEY = "key.pem"
#: The certificate's names: the load's URL host and the listener's address.
SERVER_NAME = "localhost"
SUBJECT_ALT_NAMES = "DNS:localhost,IP:127.0.0.1"


class TlsError(Exception):
    """The certificate could not be made."""


def openssl_argv(directory: Path, days: int = 2) -> list[str]:
    """The openssl command writing a self-signed ECDSA P-256 certificate and its key."""
    return [
        "openssl", "req", "-x509",
        "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-days", str(days),
        "-subj", f"/CN={SERVER_NAME}",
        "-addext", f"subjectAltName={SUBJECT_ALT_NAMES}",
        "-keyout", str(directory / KEY),
        "-out", str(directory / CERT),
    ]  # fmt: skip


def make_certificate(directory: Path) -> Path:
    """Writes ``cert.pem`` and ``key.pem`` into ``directory`` (created, mode 0700) and returns
    the certificate, which is also the CA that clients verify against."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    argv = openssl_argv(directory)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise TlsError(f"openssl: {e}") from None
    if done.returncode != 0 or not (directory / CERT).exists():
        raise TlsError(f"openssl exited {done.returncode}: {done.stderr.strip()[-300:]}")
    return directory / CERT


def render(text: str, tls_dir: Path) -> str:
    """A config file with ``@TLS_DIR@`` replaced by the run's certificate directory."""
    return text.replace(TLS_DIR_PLACEHOLDER, str(tls_dir))


_DOWNSTREAM_TLS = re.compile(
    r"^(?P<indent>[ \t]*)\"@type\": type\.googleapis\.com/envoy\.extensions\.transport_sockets"
    r"\.tls\.v3\.DownstreamTlsContext[ \t]*\n",
    re.M,
)


def without_session_resumption(text: str) -> str:
    """``text`` (a CEC in YAML) with session resumption turned off in every
    DownstreamTlsContext: both ``disable_stateless_session_resumption`` (tickets) and
    ``disable_stateful_session_resumption`` (the session cache), so that every connection
    pays for a full handshake whatever the client offers."""
    out, n = _DOWNSTREAM_TLS.subn(
        lambda m: m.group(0)
        + f"{m.group('indent')}disable_stateless_session_resumption: true\n"
        + f"{m.group('indent')}disable_stateful_session_resumption: true\n",
        text,
    )
    if n == 0:
        raise ValueError("no DownstreamTlsContext in the config")
    return out


def session_resumed(addr: str, server_name: str, cafile: Path, timeout: float = 5.0) -> bool:
    """Connects twice to ``addr`` (``host:port``), offering the first connection's session
    (TLS 1.3 ticket or session ID) on the second: True if the server resumed it."""
    host, _, port = addr.rpartition(":")
    ctx = ssl.create_default_context(cafile=str(cafile))
    session = None
    for _ in range(2):
        with socket.create_connection((host, int(port)), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=server_name, session=session) as s:
                # Read a whole response: TLS 1.3 tickets arrive after the handshake.
                s.sendall(
                    f"GET / HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n".encode()
                )
                while s.recv(65536):
                    pass
                resumed, session = s.session_reused, s.session
    return resumed
