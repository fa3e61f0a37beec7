"""A node's chunked stream decoded off the socket reads as http.client reads it: the same data,
the same end (the connection lent again), the same errors for broken framing."""

from __future__ import annotations

from collections.abc import Iterator
from http.client import HTTPException, IncompleteRead
from typing import Any

import gevent
import pytest
from gevent.server import StreamServer

from pipeline.chunked import ChunkedReader, ChunkFramingError
from pipeline.upstream import UpstreamClient
from tests import certs

HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n")
LINES = [b'{"response":"%d","done":false}\n' % i for i in range(30)] + [b'{"done":true}\n']


def chunked(pieces: list[bytes], trailer: bytes = b"") -> bytes:
    body = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) if i % 7 == 3 else
                    b"%x\r\n%s\r\n" % (len(p), p) for i, p in enumerate(pieces))
    return body + b"0\r\n" + trailer + b"\r\n"


def decode(wire: bytes, step: int) -> tuple[bytes, bool]:
    """``wire`` fed to the reader ``step`` bytes per recv: what it decoded, and if it ended."""
    feed: Iterator[bytes] = (wire[i:i + step] for i in range(0, len(wire), step))
    ended = []
    reader = ChunkedReader(lambda n: next(feed, b""), lambda n: next(feed, b""),
                           lambda: ended.append(True))
    out = b""
    while data := reader.read():
        out += data
    return out, ended == [True] and reader.done


@pytest.mark.parametrize("step", [1, 2, 3, 5, 17, 64, 100_000])
def test_every_split_of_the_wire_decodes_to_the_same_data(step):
    wire = chunked(LINES, trailer=b"X-Trailer: yes\r\n")
    assert decode(wire, step) == (b"".join(LINES), True)


def test_one_whole_chunk_per_recv_decodes_as_split_reads_do():
    """A token stream's usual read (exactly one chunk) takes a shortcut: same data, same end."""
    pieces = [b"%x\r\n%s\r\n" % (len(p), p) for p in LINES] + [b"0\r\n\r\n"]
    feed = iter(pieces)
    ended: list[bool] = []
    reader = ChunkedReader(lambda n: next(feed, b""), lambda n: next(feed, b""),
                           lambda: ended.append(True))
    got = []
    while data := reader.read():
        got.append(data)
    assert got == LINES and ended == [True] and reader.done


@pytest.mark.parametrize("wire, error", [
    (b"zz\r\nab\r\n0\r\n\r\n", ChunkFramingError),
    (b"2\r\nabXX0\r\n\r\n", ChunkFramingError),
    (b"5\r\nab", IncompleteRead),  # the node went away mid-chunk
    (b"2\r\nab\r\n", IncompleteRead),  # ... or before the last chunk
])
def test_broken_framing_is_an_http_error(wire, error):
    with pytest.raises(error) as caught:
        decode(wire, 3)
    assert isinstance(caught.value, HTTPException)


def serve(replies: list[bytes], step: int, seen: list[int], **tls: Any) -> StreamServer:
    """A node that answers each request on one kept-alive connection with the next reply,
    written ``step`` bytes at a time with a pause between them (over TLS with ``tls``)."""

    def handle(sock, _addr):
        seen.append(1)
        f = sock.makefile("rb")
        for reply in replies:
            while f.readline() not in (b"\r\n", b""):
                pass
            for i in range(0, len(reply), step):
                sock.sendall(reply[i:i + step])
                gevent.sleep(0.001)
        sock.close()

    server = StreamServer(("127.0.0.1", 0), handle, **tls)
    server.start()
    return server


def test_a_stream_read_through_the_socket_ends_cleanly_and_its_connection_is_reused():
    read_twice_on_one_connection("http", {})


@pytest.mark.skipif(certs.WHY_NOT is not None, reason=str(certs.WHY_NOT))
def test_a_stream_from_an_https_node_is_read_through_tls(tmp_path, monkeypatch):
    ca = certs.make_ca(tmp_path / "pki", "node-ca")
    cert, key = ca.issue("node")
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.cert))  # the default context trusts the test CA
    read_twice_on_one_connection("https", {"certfile": str(cert), "keyfile": str(key)})


def read_twice_on_one_connection(scheme: str, tls: dict[str, str]) -> None:
    seen: list[int] = []
    first = HEAD + chunked(LINES[:10], trailer=b"X-Done: 1\r\n")
    second = HEAD + chunked(LINES[10:])
    server = serve([first, second], 7, seen, **tls)
    client = UpstreamClient()
    url = f"{scheme}://127.0.0.1:{server.server_port}"
    try:
        got = []
        for _ in range(2):
            resp = client.send(url, "POST", "/api/chat", b"{}", {}, 2, 5)
            read, out = resp.body_reader(), b""
            while data := read():
                out += data
            resp.close()
            got.append(out)
        assert got == [b"".join(LINES[:10]), b"".join(LINES[10:])]
        assert seen == [1], "the second request did not reuse the connection"
        assert client.checked_out == 0
    finally:
        client.close()
        server.stop()


# --- the relay: every line that arrived in one read is checked, not only the piece's first ----

def scripted_node(stream: list[bytes]) -> StreamServer:
    """A node whose every POST answers with ``stream`` (NDJSON lines) in one send: all of them
    reach the appliance in one read. GETs (discovery, health) list the one model ``m``."""

    def handle(sock, _addr):
        f = sock.makefile("rb")
        while request := f.readline():
            length = 0
            while (line := f.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            f.read(length)
            if request.startswith(b"GET"):
                body = b'{"models":[{"name":"m","model":"m"}],"version":"0.5.0"}'
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                continue
            sock.sendall(HEAD + chunked(stream))
        sock.close()

    server = StreamServer(("127.0.0.1", 0), handle)
    server.start()
    return server


class Url:
    def __init__(self, server: StreamServer) -> None:
        self.url = f"http://127.0.0.1:{server.server_port}"


def relayed(appliance, stream: list[bytes]) -> tuple[list[bytes], object]:
    import requests

    server = scripted_node(stream)
    try:
        lb = appliance([Url(server)], node_overrides={0: {"models": ["m"]}},
                       healthCheck={"enabled": False})
        r = requests.post(f"{lb.url}/api/chat", json={"model": "m", "messages": []}, timeout=10)
        return r.content.splitlines(keepends=True), lb.factory.node_registry.get("n0")
    finally:
        server.stop()


def test_a_malformed_line_inside_a_piece_ends_the_stream_after_the_good_lines(appliance):
    lines, _node = relayed(appliance, [LINES[0] + LINES[1] + b"not json\n" + LINES[2]])
    assert lines[:2] == LINES[:2]
    assert len(lines) == 3 and b"malformed line" in lines[2] and lines[2].startswith(b"{")


def test_a_node_error_line_after_good_lines_in_one_piece_counts_as_the_nodes_failure(appliance):
    error = b'{"error":"out of memory"}\n'
    lines, node = relayed(appliance, [LINES[0] + LINES[1] + error])
    assert lines == [LINES[0], LINES[1], error]
    assert node.failures == 1
