"""TLS termination and hostile input: real clients over HTTPS, raw sockets for the rest.

TLS tests make their certificates with the ``openssl`` command (tests/certs.py) and verify
them as production clients would (hostname and CA); hostile clients are raw sockets that send
exactly what a proxy must survive: oversized heads, dribbled heads, stalled bodies, garbage,
too many connections. Every wait is a bounded loop on an observable state.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import signal
import socket
import ssl
import time

import certs
import gevent
import httpx
import ollama
import openai
import pytest
import requests
from test_server import Proc, write_config
from test_transport import http_request, read_response, wait_until

from pipeline.config import ConfigError, parse_config

pytestmark = pytest.mark.skipif(certs.WHY_NOT is not None, reason=str(certs.WHY_NOT))

# openai's module-level lazy proxies import the SDK's submodules the first time anything asks
# their __class__, and conftest's scan for leftover greenlets does (isinstance on every
# object): seconds of imports, longer than that scan's 2 s budget when paid in the first
# test's teardown. Paid here, at import, instead.
_ = [isinstance(obj, gevent.Greenlet) for obj in gc.get_objects()]

POLLED = ("/api/version", "/api/tags", "/api/ps")  # what health checks and discovery ask


def inference_paths(node) -> set[str]:
    """Paths the node was asked for other than by health checks: what clients got through."""
    return {p for p in node.stats.by_path if p not in POLLED}


@pytest.fixture
def pki(tmp_path):
    """A server CA with a server certificate; a client CA with a client certificate."""
    ca = certs.make_ca(tmp_path / "pki", "server-ca")
    cert, key = ca.issue("server")
    client_ca = certs.make_ca(tmp_path / "pki", "client-ca")
    client_cert, client_key = client_ca.issue("client", client=True, cn="team-search")
    return {"ca": ca, "cert": cert, "key": key, "client_ca": client_ca,
            "client_cert": client_cert, "client_key": client_key}


def tls_server(pki, mutual: bool = False) -> dict:
    tls = {"certFile": str(pki["cert"]), "keyFile": str(pki["key"])}
    if mutual:
        tls["clientCaFile"] = str(pki["client_ca"].cert)
    return {"tls": tls}


def client_context(pki, client_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki["ca"].cert))
    if client_cert:
        ctx.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
    return ctx


def handshake(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    """A completed TLS connection to the appliance (hostname checked against 127.0.0.1)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        return ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    except BaseException:
        raw.close()
        raise


def presented_cert(port: int, pki) -> bytes:
    with handshake(port, client_context(pki)) as tls:
        return tls.getpeercert(binary_form=True)


def read_until_eof(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything the peer sends until it closes (a reset counts as closed)."""
    sock.settimeout(timeout)
    buf = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return buf
        if not chunk:
            return buf
        buf += chunk
    raise AssertionError(f"the connection stayed open: {buf[:200]!r}")


def answer(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one whole response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


# --- TLS ----------------------------------------------------------------------------------------

def test_https_serves_the_official_ollama_client_and_the_openai_client(
        fake_node, appliance, pki):
    node = fake_node(["m"])
    lb = appliance([node], server=tls_server(pki))
    assert lb.url == f"https://127.0.0.1:{lb.port}"
    reply = ollama.Client(host=lb.url, verify=client_context(pki)).generate(model="m",
                                                                            prompt="hi")
    assert reply.done and reply.response
    with httpx.Client(verify=client_context(pki)) as http:
        oa = openai.OpenAI(base_url=f"{lb.url}/v1", api_key="unused", http_client=http)
        chat = oa.chat.completions.create(model="m", messages=[{"role": "user",
                                                                 "content": "hi"}])
    assert chat.choices[0].message.content
    assert node.stats.by_path.get("/api/generate") == 1
    assert node.stats.by_path.get("/v1/chat/completions") == 1
    with pytest.raises(requests.ConnectionError):  # no plain HTTP on a TLS port
        requests.get(f"http://127.0.0.1:{lb.port}/api/version", timeout=5)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
def test_tls_1_1_and_a_cipher_outside_the_profile_are_refused_1_2_and_1_3_accepted(
        fake_node, appliance, pki):
    lb = appliance([fake_node(["m"])], server=tls_server(pki))
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = client_context(pki)
        ctx.minimum_version = ctx.maximum_version = version
        with handshake(lb.port, ctx) as tls:
            assert tls.version() == version.name.replace("_", ".")
            tls.sendall(http_request("GET", "/api/version"))
            assert read_response(tls)[0].startswith(b"HTTP/1.1 200")
    old = client_context(pki)
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # this OpenSSL would not even offer 1.1 otherwise
    with pytest.raises(ssl.SSLError) as refused:
        handshake(lb.port, old)
    assert refused.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION"  # the server said no
    cbc = client_context(pki)
    cbc.maximum_version = ssl.TLSVersion.TLSv1_2
    cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA")  # ECDHE, but CBC with SHA-1: not intermediate
    with pytest.raises(ssl.SSLError) as weak:
        handshake(lb.port, cbc)
    assert weak.value.reason == "SSLV3_ALERT_HANDSHAKE_FAILURE"
    wait_until(lambda: lb.server.tls.handshake_failures == 2, 5)


def test_mutual_tls_refuses_clients_without_a_trusted_certificate_and_serves_those_with_one(
        fake_node, appliance, pki, tmp_path):
    node = fake_node(["m"])
    lb = appliance([node], server=tls_server(pki, mutual=True))
    stranger_ca = certs.make_ca(tmp_path / "other", "stranger-ca")
    stranger_cert, stranger_key = stranger_ca.issue("stranger", client=True)
    stranger = client_context(pki)
    stranger.load_cert_chain(str(stranger_cert), str(stranger_key))
    for ctx in (client_context(pki), stranger):  # no certificate; one from another CA
        with httpx.Client(verify=ctx) as http, pytest.raises(httpx.TransportError):
            http.post(f"{lb.url}/api/generate", json={"model": "m", "prompt": "hi"})
    wait_until(lambda: lb.server.tls.handshake_failures == 2, 5)
    assert inference_paths(node) == set()  # nothing reached a node
    client = ollama.Client(host=lb.url, verify=client_context(pki, client_cert=True))
    assert client.generate(model="m", prompt="hi").done
    assert inference_paths(node) == {"/api/generate"}


def replace_atomically(target, source) -> None:
    """What certbot and cert-manager do: write beside, then rename over."""
    tmp = target.with_suffix(".new")
    tmp.write_bytes(source.read_bytes())
    os.replace(tmp, target)


def test_a_replaced_certificate_serves_new_handshakes_while_an_open_stream_keeps_flowing(
        fake_node, appliance, pki):
    node = fake_node(["m"], decode_tps=20, tokens=40)  # a 2 s stream
    live_cert, live_key = pki["cert"].with_name("live.pem"), pki["key"].with_name("live.key")
    replace_atomically(live_cert, pki["cert"])
    replace_atomically(live_key, pki["key"])
    lb = appliance([node], server={"tls": {"certFile": str(live_cert),
                                           "keyFile": str(live_key)}})
    old = presented_cert(lb.port, pki)
    client = ollama.Client(host=lb.url, verify=client_context(pki))
    stream = iter(client.generate(model="m", prompt="x", stream=True))
    first = next(stream)
    assert not first.done

    new_cert, new_key = pki["ca"].issue("renewed")
    replace_atomically(live_key, new_key)
    replace_atomically(live_cert, new_cert)
    wait_until(lambda: presented_cert(lb.port, pki) != old, 10, step=0.1)
    assert ssl.PEM_cert_to_DER_cert(new_cert.read_text()) == presented_cert(lb.port, pki)
    rest = list(stream)  # the stream opened before the renewal ran to its end
    assert rest[-1].done and len(rest) == 40
    assert lb.server.tls.reloads == 1


def test_an_unloadable_replacement_keeps_the_current_certificate_until_a_good_one_comes(
        fake_node, appliance, pki, caplog):
    live_cert = pki["cert"].with_name("live.pem")
    replace_atomically(live_cert, pki["cert"])
    lb = appliance([fake_node(["m"])], server={"tls": {"certFile": str(live_cert),
                                                       "keyFile": str(pki["key"])}})
    old = presented_cert(lb.port, pki)
    caplog.set_level(logging.ERROR, logger="ollama_lb.tls")
    other_cert, _ = pki["ca"].issue("mismatch")  # a certificate without its key
    replace_atomically(live_cert, other_cert)
    wait_until(lambda: any("cannot be loaded" in r.message for r in caplog.records), 10)
    assert presented_cert(lb.port, pki) == old  # still served with the pair that works
    good_cert, good_key = pki["ca"].issue("good")
    replace_atomically(pki["key"], good_key)  # now the pair matches again: loaded
    replace_atomically(live_cert, good_cert)
    wait_until(lambda: presented_cert(lb.port, pki) != old, 10, step=0.1)


def test_an_idle_https_connection_is_closed_by_the_drain_after_its_grace(fake_node, appliance,
                                                                         pki):
    """Under TLS the drain closes an idle kept-alive connection as it does a plain one: once
    the grace after its last reply (``app.transport.NEXT_S``) has passed, not drainSeconds."""
    lb = appliance([fake_node(["m"])], server={**tls_server(pki), "drainSeconds": 10},
                   check_leaks=False)  # the test shuts it down itself, and checks below
    with handshake(lb.port, client_context(pki)) as tls:
        tls.sendall(http_request("GET", "/api/version"))
        assert read_response(tls)[0].startswith(b"HTTP/1.1 200")  # now idle, kept alive
        start = time.monotonic()
        stopping = gevent.spawn(lb.shutdown)
        assert read_until_eof(tls, timeout=5) == b""  # closed by the drain
        stopping.get(timeout=5)
        assert time.monotonic() - start < 3  # nothing busy: no wait for drainSeconds
    assert not lb.server.connections and lb.factory.pipeline.in_flight == 0
    assert lb.exit_status == 0


def test_tls_files_are_checked_at_start_and_in_the_config():
    with pytest.raises(ConfigError, match=r"server\.tls: certFile and keyFile"):
        parse_config({"server": {"tls": {"certFile": "/x.pem"}}})
    from app.tls import build_context

    with pytest.raises(ConfigError, match=r"server\.tls\.certFile/keyFile: cannot load"):
        build_context(parse_config({"server": {"tls": {
            "certFile": "/nonexistent.pem", "keyFile": "/nonexistent.key"}}}).server.tls)


# --- hostile input ------------------------------------------------------------------------------

@pytest.fixture
def raw(appliance, fake_node):
    """An appliance (with ``server`` settings) and a way to open raw client sockets to it."""
    opened: list[socket.socket] = []

    def make(server: dict | None = None, source: str = "127.0.0.1"):
        node = fake_node(["m"])
        lb = appliance([node], server=server or {})

        def connect() -> socket.socket:
            sock = socket.create_connection(("127.0.0.1", lb.port), timeout=10,
                                            source_address=(source, 0))
            opened.append(sock)
            return sock

        return lb, node, connect

    yield make
    for sock in opened:
        sock.close()


@pytest.mark.parametrize(("head", "limit_word"), [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: lb\r\n\r\n", "request line too long"),
    (b"GET /api/tags HTTP/1.1\r\nHost: lb\r\nX-Big: " + b"b" * 40_000 + b"\r\n\r\n",
     "request header fields too large"),
    (b"GET /api/tags HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(101))
     + b"\r\n", "too many request header fields"),
])
def test_oversized_request_heads_get_431_in_ollamas_shape_and_the_connection_closes(
        raw, head, limit_word):
    _lb, node, connect = raw()
    sock = connect()
    sock.sendall(head)
    status, headers, body = answer(read_until_eof(sock))
    assert status == 431 and headers["connection"] == "close"
    assert json.loads(body)["error"].startswith(limit_word)
    assert inference_paths(node) == set()


def test_431_on_v1_uses_openais_error_object_and_limits_are_configurable(raw):
    _lb, _, connect = raw({"maxHeaderBytes": 512, "maxHeaderCount": 5})
    sock = connect()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: lb\r\nX-A: " + b"a" * 600
                 + b"\r\n\r\n")
    status, _, body = answer(read_until_eof(sock))
    assert status == 431
    assert json.loads(body)["error"]["message"] == (
        "request header fields too large: the limit is 512 bytes")
    ok = connect()  # within the limits: served on the same server
    ok.sendall(http_request("GET", "/api/version"))
    assert read_response(ok)[0].startswith(b"HTTP/1.1 200")


def test_a_connection_dribbling_its_head_gets_408_and_is_closed(raw):
    _lb, node, connect = raw({"headerTimeoutMs": 500})
    sock = connect()
    head = b"POST /api/generate HTTP/1.1\r\nHost: lb\r\nX-Slow: " + b"z" * 200

    def dribble() -> None:
        for byte in head:
            try:
                sock.send(bytes([byte]))
            except OSError:
                return
            gevent.sleep(0.05)

    start = time.monotonic()
    sender = gevent.spawn(dribble)
    try:
        status, headers, body = answer(read_until_eof(sock))
    finally:
        sender.kill()
    took = time.monotonic() - start
    assert status == 408 and headers["connection"] == "close"
    assert "request head was not received within 500 ms" in json.loads(body)["error"]
    assert 0.4 <= took < 3  # the whole head's deadline, not a per-byte timeout
    assert inference_paths(node) == set()


def test_a_new_connection_that_sends_nothing_is_closed_after_the_head_timeout(raw):
    lb, _, connect = raw({"headerTimeoutMs": 400, "keepAliveTimeoutMs": 60_000})
    sock = connect()
    start = time.monotonic()
    assert read_until_eof(sock) == b""  # closed without a word: nothing was asked
    assert 0.3 <= time.monotonic() - start < 3
    assert not lb.server.connections


def test_a_stalled_body_gets_408_in_the_api_shape_instead_of_a_500(raw, caplog):
    lb, node, connect = raw({"bodyTimeoutMs": 500})
    caplog.set_level(logging.INFO)
    for path, error_of in (("/api/generate", lambda b: b["error"]),
                           ("/v1/chat/completions", lambda b: b["error"]["message"])):
        sock = connect()
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: lb\r\nContent-Type: application/json\r\n"
                     "Content-Length: 100\r\n\r\n".encode() + b'{"model": "m", ')
        start = time.monotonic()
        status, headers, body = answer(read_until_eof(sock))
        assert status == 408 and headers["connection"] == "close"
        assert error_of(json.loads(body)).startswith(
            "request body not received in time: 15 bytes in ")
        assert 0.4 <= time.monotonic() - start < 3
    assert not [r for r in caplog.records if "unhandled" in r.getMessage()]
    assert inference_paths(node) == set()
    assert lb.factory.pipeline.in_flight == 0


def test_the_body_deadline_moves_with_a_steady_upload_and_cuts_a_trickle(raw):
    """bodyTimeoutMs plus a second per bodyMinBytesPerSecond: a rate floor, not a total."""
    _lb, node, connect = raw({"bodyTimeoutMs": 300, "bodyMinBytesPerSecond": 1000})
    body = json.dumps({"model": "m", "prompt": "x" * 2950, "stream": False}).encode()
    head = (f"POST /api/generate HTTP/1.1\r\nHost: lb\r\nContent-Length: {len(body)}\r\n"
            "\r\n").encode()

    def upload(sock: socket.socket, piece: int, pause: float) -> None:
        sock.sendall(head)
        for i in range(0, len(body), piece):
            try:
                sock.sendall(body[i:i + piece])
            except OSError:
                return  # cut: the test reads why
            gevent.sleep(pause)

    steady = connect()  # ~3,000 bytes/s: 1 s in all, three times bodyTimeoutMs
    start = time.monotonic()
    sender = gevent.spawn(upload, steady, 300, 0.1)
    head_in, reply = read_response(steady)
    sender.join(timeout=5)
    assert head_in.startswith(b"HTTP/1.1 200") and json.loads(reply)["done"] is True
    assert time.monotonic() - start > 0.3
    trickle = connect()  # 500 bytes/s: half the floor, cut after about 0.6 s
    sender = gevent.spawn(upload, trickle, 100, 0.2)
    try:
        status, _, text = answer(read_until_eof(trickle))
    finally:
        sender.kill()
    assert status == 408 and "the floor is 1000 bytes/s" in json.loads(text)["error"]
    assert node.stats.by_path.get("/api/generate") == 1  # only the steady one got through


def test_a_body_that_ends_early_is_a_400_not_a_500(raw, caplog):
    _lb, node, connect = raw()
    caplog.set_level(logging.INFO)
    sock = connect()
    sock.sendall(b"POST /api/chat HTTP/1.1\r\nHost: lb\r\nContent-Length: 100\r\n\r\n{\"mo")
    sock.shutdown(socket.SHUT_WR)  # the client is done sending, 96 bytes short
    status, _, body = answer(read_until_eof(sock))
    assert status == 400 and "whole request body" in json.loads(body)["error"]
    assert not [r for r in caplog.records if "unhandled" in r.getMessage()]
    assert inference_paths(node) == set()


def test_a_huge_declared_body_is_refused_without_being_read_and_a_small_one_keeps_alive(raw):
    _lb, node, connect = raw({"maxBodyBytes": 1000})
    sock = connect()
    sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: lb\r\nContent-Length: 10000000000\r\n"
                 b"\r\n" + b"x" * 1000)
    status, _, _ = answer(read_until_eof(sock))  # closed after the 413: 10 GB are not read
    assert status == 413
    kept = connect()  # an unread small body is skipped and the connection stays usable
    kept.sendall(b"GET /api/version HTTP/1.1\r\nHost: lb\r\nContent-Length: 5\r\n\r\nhello")
    assert read_response(kept)[0].startswith(b"HTTP/1.1 200")
    kept.sendall(http_request("GET", "/api/version"))
    assert read_response(kept)[0].startswith(b"HTTP/1.1 200")
    assert inference_paths(node) == set()


GARBAGE = [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64) + b"\r\n\r\n",  # TLS
    b"GET / HTTP/9.9\r\n\r\n",
    b"NOT-HTTP\r\n\r\n",
    b"POST /api/generate HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
    b"POST /api/generate HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
    b"POST /api/generate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nxx\r\n",
    b"GET /api/tags HTTP/1.1\r\nno colon here\r\n\r\n",
    b"GET /api/tags HTTP/1.1\r\nX-A: 1\r\n folded: 2\r\n\r\n",
    b"POST /api/chat HTTP/1.1\r\nTransfer-Encoding : chunked\r\nContent-Length: 3\r\n\r\n{}x",
    b"POST /api/chat HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 30\r\n\r\n{}x",
    b"POST /api/chat HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    b"\r\n\r\n\r\n",
    os.urandom(3000),
]


def test_garbage_gets_an_answer_or_a_close_never_a_crash_and_never_reaches_a_node(
        raw, greenlet_errors):
    lb, node, connect = raw({"headerTimeoutMs": 1000})  # junk without a newline: 408 at 1 s
    for junk in GARBAGE:
        sock = connect()
        with contextlib.suppress(OSError):  # closed on us mid-send: also a fine outcome
            sock.sendall(junk)
        got = read_until_eof(sock)
        if got:
            status = int(got.split(b" ", 2)[1])
            assert status in (400, 404, 405, 408, 431), got[:100]

    assert not greenlet_errors
    assert inference_paths(node) == set()
    wait_until(lambda: not lb.server.connections, 5)  # every handler has finished
    ok = connect()
    ok.sendall(http_request("GET", "/api/version"))
    assert read_response(ok)[0].startswith(b"HTTP/1.1 200")


def test_connections_over_the_per_client_cap_are_closed_at_once_others_are_served(raw):
    lb, _, connect = raw({"maxConnectionsPerClient": 3, "connectionLimitExempt": []})
    held = [connect() for _ in range(3)]
    for sock in held:
        sock.sendall(http_request("GET", "/api/version"))
        assert read_response(sock)[0].startswith(b"HTTP/1.1 200")
    extra = connect()  # the kernel accepts it; the appliance closes it unread
    start = time.monotonic()
    assert read_until_eof(extra, timeout=5) == b""
    assert time.monotonic() - start < 2  # at once, not after a timeout
    assert lb.server.limiter.refused == 1
    other = socket.create_connection(("127.0.0.1", lb.port), timeout=10,
                                     source_address=("127.0.0.2", 0))  # another client
    with other:
        other.sendall(http_request("GET", "/api/version"))
        assert read_response(other)[0].startswith(b"HTTP/1.1 200")
    held.pop().close()
    wait_until(lambda: lb.server.limiter.open.get("127.0.0.1") == 2, 5)
    again = connect()  # room again
    again.sendall(http_request("GET", "/api/version"))
    assert read_response(again)[0].startswith(b"HTTP/1.1 200")


def test_exempt_addresses_are_not_capped(raw):
    lb, _, connect = raw({"maxConnectionsPerClient": 2})  # loopback is exempt by default
    socks = [connect() for _ in range(4)]
    for sock in socks:
        sock.sendall(http_request("GET", "/api/version"))
        assert read_response(sock)[0].startswith(b"HTTP/1.1 200")
    assert lb.server.limiter.refused == 0


# --- readiness during the drain, as a process ---------------------------------------------------

@pytest.fixture
def proc():
    started: list[Proc] = []

    def make(config):
        p = Proc(config)
        started.append(p)
        return p

    yield make
    for p in started:
        if p.p.poll() is None:
            p.p.kill()
            p.p.wait()
        p.p.stderr.close()


def test_ready_answers_503_once_sigterm_starts_the_drain_while_a_stream_finishes(
        fake_node, tmp_path, proc):
    """What a balancer's probe sees on a connection that is open when SIGTERM comes."""
    node = fake_node(["m"], decode_tps=20, tokens=20)  # a 1 s stream
    p = proc(write_config(tmp_path / "c.yaml", [node]))
    assert requests.get(f"{p.url}/health/ready", timeout=5).status_code == 200
    stream = iter(ollama.Client(host=p.url).generate(model="m", prompt="x", stream=True))
    assert not next(stream).done
    port = int(p.url.rsplit(":", 1)[1])
    probe = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        probe.sendall(b"GET /health/ready HTTP/1.1\r\nHost: lb\r\n")  # the probe is under way
        p.p.send_signal(signal.SIGTERM)
        p.wait_for("stopping")
        probe.sendall(b"\r\n")
        status, headers, body = answer(read_until_eof(probe))
    finally:
        probe.close()
    assert status == 503 and headers["connection"] == "close"
    assert json.loads(body)["status"] == "DOWN" and json.loads(body)["draining"] is True
    rest = list(stream)
    assert rest[-1].done and len(rest) == 20  # the stream kept going through the drain
    assert p.stop() == 0
