"""The node's response head is read without the email package, and reads the same."""

from __future__ import annotations

from gevent.server import StreamServer

from pipeline.upstream import UpstreamClient

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
