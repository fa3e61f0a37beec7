"""The node's response head is read without the email package, and a request is written in
one piece: both read the same as the standard path."""

from __future__ import annotations

import urllib3
from gevent.server import StreamServer

from pipeline.upstream import UpstreamClient
from tests.waiting import wait_until

REPLY = (b"HTTP/1.1 200 OK\r\n"
         b"Content-Type: application/json; charset=utf-8\r\n"
         b"X-Multi: one\r\n"
         b"X-Multi: two\r\n"
         b"X-Folded: first\r\n"
         b"\tcontinued\r\n"
         b"Content-Length: 11\r\n"
         b"\r\n"
         b'{"ok":true}')


def serve(reply: bytes) -> StreamServer:
    def handle(sock, _addr):
        f = sock.makefile("rb")
        for _ in range(2):  # two requests on one kept-alive connection
            while f.readline() not in (b"\r\n", b""):
                pass
            sock.sendall(reply)
        sock.close()

    server = StreamServer(("127.0.0.1", 0), handle)
    server.start()
    return server


def test_head_fields_framing_and_reuse_read_as_http_client_reads_them():
    server = serve(REPLY)
    client = UpstreamClient()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        for _ in range(2):
            resp = client.send(url, "GET", "/x", None, {}, 1.0, 1.0, pool_size=1)
            assert resp.status_code == 200
            assert resp.headers["content-type"] == "application/json; charset=utf-8"
            assert resp.headers.getlist("X-Multi") == ["one", "two"]
            assert resp.headers["X-Folded"] == "first continued"
            assert resp.content == b'{"ok":true}'
            resp.close()
        assert client.checked_out == 0
    finally:
        client.close()
        server.stop()


def capture_requests(count: int) -> tuple[StreamServer, list[bytes]]:
    """A node that records each request it gets (head and Content-Length body) and answers."""
    seen: list[bytes] = []

    def handle(sock, _addr):
        f = sock.makefile("rb")
        for _ in range(count):
            head = b""
            while (line := f.readline()) not in (b"\r\n", b""):
                head += line
            if not head:
                break
            length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n")
                           if h.lower().startswith(b"content-length:")), 0)
            seen.append(head + b"\r\n" + f.read(length))
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        sock.close()

    server = StreamServer(("127.0.0.1", 0), handle)
    server.start()
    return server, seen


def test_a_request_written_in_one_piece_reads_as_urllib3_would_have_sent_it():
    server, seen = capture_requests(4)
    url = f"http://127.0.0.1:{server.server_port}"
    body = b'{"model":"m","messages":[]}'
    headers = {"Content-Type": "application/json", "X-Request-ID": "r1",
               "User-Agent": "ollama-python/0.6.3"}
    client = UpstreamClient()
    plain = urllib3.HTTPConnectionPool("127.0.0.1", server.server_port, maxsize=1)
    try:
        for _ in range(2):  # the second one reuses the kept-alive connection
            resp = client.send(url, "POST", "/api/chat", body, headers, 1.0, 1.0, pool_size=1)
            assert resp.content == b"{}"
            resp.close()
        for sent in ({**headers, "Content-Length": str(len(body))}, {"Accept": "x"}):
            plain.urlopen("POST", "/api/chat", body=body if "Content-Type" in sent else None,
                          headers=sent, retries=False).read()
        client.send(url, "POST", "/api/chat", None, {"Accept": "x"}, 1.0, 1.0).close()
    finally:
        client.close()
        plain.close()
        server.stop()
    ours, again, theirs, theirs_bare = seen[:4]
    assert ours == again == theirs  # byte for byte: request line, Host, every header, body
    assert b"User-Agent: ollama-python/0.6.3\r\n" in ours and ours.endswith(body)
    assert theirs_bare.startswith(b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1:")
    assert b"User-Agent: python-urllib3/" in theirs_bare



def test_a_pool_keeps_at_most_its_size_of_idle_connections_and_lends_the_newest_first():
    """Connections beyond the pool's size are closed when given back (the pool never blocks);
    the kept ones are lent again, the last returned first."""
    opened: list[object] = []
    closed: list[object] = []

    def handle(sock, _addr):
        opened.append(sock)
        f = sock.makefile("rb")
        while f.readline():
            while f.readline() not in (b"\r\n", b""):
                pass
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        closed.append(sock)

    server = StreamServer(("127.0.0.1", 0), handle)
    server.start()
    client = UpstreamClient()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        held = [client.send(url, "GET", "/x", None, {}, 1.0, 1.0, pool_size=2) for _ in range(4)]
        assert [r.content for r in held] == [b"ok"] * 4 and len(opened) == 4
        socks = [r.conn.sock for r in held]
        for r in held:
            r.close()
        assert wait_until(lambda: len(closed) == 2)  # two over the size: closed, not kept
        again = client.send(url, "GET", "/x", None, {}, 1.0, 1.0, pool_size=2)
        assert again.content == b"ok" and again.conn.sock is socks[1]  # the last one kept
        again.close()
        assert len(opened) == 4 and client.checked_out == 0
    finally:
        client.close()
        server.stop()
