"""TLS termination: the server's SSL context, built from ``server.tls`` and reloaded on change.

Accepted sockets are wrapped here, one at a time, with whatever context is current at that
moment (``TlsTerminator.handshake``). A renewed certificate therefore needs no restart and
drops no connection: a poller notices that a file changed (inode, size or mtime, so a
rename, a symlink swap or an in-place write all count), builds a fresh context, and swaps the
reference. New handshakes present the new certificate; a connection already established
keeps the SSL object, and so the certificate, it was made with. A file that cannot be loaded
(a renewal caught between writing the certificate and its key) leaves the current context in
force and is retried as soon as a file changes again.

Protocol and ciphers follow Mozilla's "intermediate" profile: TLS 1.2 and 1.3 only (1.0 and
1.1 are deprecated by RFC 8996), and for TLS 1.2 only ECDHE key exchange (forward secrecy)
with AEAD ciphers (AES-GCM, ChaCha20-Poly1305). Its DHE suites are left out because no DH
parameters are configured, so OpenSSL could not use them anyway. TLS 1.3 suites are
OpenSSL's defaults, all of which that profile accepts. Compression (CRIME) and
renegotiation (a client-driven CPU sink) are off; session tickets are off too, because their
key would live as long as the context, undoing forward secrecy between reloads.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent import ssl as gssl

from pipeline.config import ConfigError, TlsConfig

log = logging.getLogger("ollama_lb.tls")

#: Mozilla intermediate (v5.7) for TLS 1.2, minus the DHE suites (no DH parameters here).
INTERMEDIATE_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305"))
POLL_S = 1.0  # how often the certificate files are checked for a change
LOG_EVERY_S = 10.0  # failed handshakes are logged at most this often (scanners are noisy)

Fingerprint = tuple[tuple[str, int, int, int, int] | tuple[str], ...]


def _no_password() -> bytes:
    raise ValueError("the key file is encrypted; ollama-lb needs an unencrypted key "
                     "(readable only by root and the service's group)")


def build_context(tls: TlsConfig) -> gssl.SSLContext:
    """A server context for ``tls``; ConfigError naming the file that cannot be used."""
    ctx = gssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET
    try:
        ctx.load_cert_chain(tls.certFile or "", tls.keyFile, password=_no_password)
    except (OSError, ValueError) as exc:
        raise ConfigError([f"server.tls.certFile/keyFile: cannot load {tls.certFile} with "
                           f"{tls.keyFile}: {exc}"]) from None
    if tls.clientCaFile:
        ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: no certificate, no connection
        try:
            ctx.load_verify_locations(cafile=tls.clientCaFile)
        except (OSError, ValueError) as exc:
            raise ConfigError([f"server.tls.clientCaFile: cannot load {tls.clientCaFile}: "
                               f"{exc}"]) from None
    return ctx


def fingerprint(tls: TlsConfig) -> Fingerprint:
    """What identifies the files' current contents without reading them (stat follows links)."""
    out: list[Any] = []
    for path in (tls.certFile, tls.keyFile, tls.clientCaFile):
        if not path:
            continue
        try:
            st = os.stat(path)
            out.append((path, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((path,))
    return tuple(out)


class TlsTerminator:
    """The current context for new handshakes, and the poller that replaces it."""

    def __init__(self, settings: Callable[[], TlsConfig]) -> None:
        self.settings = settings
        tls = settings()
        self.fingerprint = fingerprint(tls)
        self.context = build_context(tls)  # at start a bad file is fatal: ConfigError
        self.failed: Fingerprint | None = None  # files that did not load; retried on change
        self.reloads = 0
        self.handshake_failures = 0
        self._logged_at = 0.0
        self._poller: gevent.Greenlet | None = None

    def start(self) -> TlsTerminator:
        self._poller = gevent.spawn(self._poll)
        return self

    def stop(self) -> None:
        if self._poller is not None:
            self._poller.kill()
            self._poller = None

    def _poll(self) -> None:
        while True:
            gevent.sleep(POLL_S)
            try:
                self.check()
            except Exception:  # the poller must outlive any surprise; the old context stays
                log.exception("checking the TLS files failed", extra={"event": "tls_reload"})

    def check(self) -> bool:
        """Load the files again if they changed; True when a new context took over."""
        tls = self.settings()
        if not tls.certFile:
            return False  # TLS switched off in the file: only a restart does that
        fp = fingerprint(tls)
        if fp in (self.fingerprint, self.failed):
            return False
        try:
            ctx = build_context(tls)
        except ConfigError as exc:
            self.failed = fp
            log.error("TLS files changed but cannot be loaded; the current certificate stays "
                      "in force", extra={"event": "tls_reload", "result": "invalid",
                                         "problems": exc.problems})
            return False
        self.context, self.fingerprint, self.failed = ctx, fp, None
        self.reloads += 1
        log.warning("TLS certificate reloaded: new connections use it", extra={
            "event": "tls_reload", "result": "applied", "cert_file": tls.certFile})
        return True

    def handshake(self, sock: socket.socket, timeout: float, client: str) -> Any | None:
        """The TLS socket for an accepted one, or None (closed) if the handshake failed."""
        tls_sock = self.context.wrap_socket(sock, server_side=True,
                                            do_handshake_on_connect=False)
        tls_sock.settimeout(max(timeout, 0.001))
        try:
            tls_sock.do_handshake()
        except (OSError, ValueError) as exc:  # ssl.SSLError and timeouts are OSErrors
            self.handshake_failures += 1
            self._log_failure(client, exc)
            tls_sock.close()
            return None
        return tls_sock

    def _log_failure(self, client: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._logged_at < LOG_EVERY_S:
            return
        self._logged_at = now
        log.warning("TLS handshake failed", extra={
            "event": "tls_handshake_failed", "client": client,
            "reason": getattr(exc, "reason", None) or str(exc) or type(exc).__name__,
            "failures_total": self.handshake_failures})
