"""The request head as the application sees it: every header, limit and refusal, to the byte.

A head that arrived whole is parsed in one pass (app/headfields.py); one that is still arriving is
read line by line. Both must give the WSGI environ pywsgi gives (``HTTP_`` names, duplicates
joined, names with an underscore dropped, values stripped, Content-Type and Content-Length
as sent) and refuse what it refused: 400 for a folded or malformed line or an ambiguous body
length, 431 over a limit, each followed by a close. An echo application behind the
appliance's own server (app/transport.py) answers with what it got. Raw sockets send each
case in one piece, then again split, the rest sent only once the server waits for it.
"""

from __future__ import annotations

import json
import random
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from app.transport import ApplianceServer
from pipeline.config import ServerConfig
from tests.waiting import wait_until

LIMITS = {"maxRequestLineBytes": 64, "maxHeaderBytes": 256, "maxHeaderCount": 6}


def echo(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """What the request brought: the environ's text entries and the body."""
    stream = environ["wsgi.input"]
    body = stream.read() if environ["wsgi.input_terminated"] else b""
    seen = {k: v for k, v in environ.items() if isinstance(v, str)}
    seen |= {"body": body.decode("latin-1"), "terminated": environ["wsgi.input_terminated"]}
    data = json.dumps(seen).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(data)))])
    return [data]


@pytest.fixture
def server() -> Iterator[ApplianceServer]:
    cfg = ServerConfig(headerTimeoutMs=5000, **LIMITS)
    srv = ApplianceServer(("127.0.0.1", 0), echo, lambda: cfg)
    srv.start()
    yield srv
    srv.stop(timeout=2)


class Conn:
    """A raw client connection; its replies read through one buffer (several may arrive in
    one segment)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *_: object) -> None:
        self.file.close()
        self.sock.close()

    def reply(self) -> tuple[int, dict[str, str], bytes]:
        """One response with a Content-Length: (status, headers, body)."""
        status = self.file.readline()
        assert status, "EOF before a response"
        headers = {}
        while (line := self.file.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.lower()] = value.strip()
        body = self.file.read(int(headers.get("content-length", "0")))
        return int(status.split()[1]), headers, body

    def closed(self) -> bool:
        try:
            return self.file.read(1) == b""
        except ConnectionResetError:
            return True


def send(srv: ApplianceServer, data: bytes, split: int | None) -> Conn:
    """``data`` in one piece, or its first ``split`` bytes until the server waits for the
    rest of the head (its head deadline running), then the rest."""
    conn = Conn(srv.server_port)
    if split is None:
        conn.sock.sendall(data)
        return conn
    ends = [i for i in (data.find(b"\r\n\r\n"), data.find(b"\n\n")) if i >= 0]
    split = split if ends and split < min(ends) else 3  # the head must not be complete
    conn.sock.sendall(data[:split])
    assert wait_until(lambda: any(h.head_timer is not None for h in srv.connections))
    conn.sock.sendall(data[split:])
    return conn


def head(*lines: str, start: str = "POST /echo HTTP/1.1", body: str = "") -> bytes:
    return "".join(f"{line}\r\n" for line in (start, *lines)).encode("latin-1") + b"\r\n" + \
        body.encode("latin-1")


SERVED: list[tuple[str, bytes, dict[str, Any], tuple[str, ...]]] = [
    ("plain", head("Host: lb", "Content-Type: application/json", "Content-Length: 2",
                   "Authorization: Bearer k", body="{}"),
     {"REQUEST_METHOD": "POST", "PATH_INFO": "/echo", "QUERY_STRING": "",
      "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "lb", "CONTENT_TYPE": "application/json",
      "CONTENT_LENGTH": "2", "HTTP_AUTHORIZATION": "Bearer k", "body": "{}",
      "terminated": True, "SCRIPT_NAME": "", "REMOTE_ADDR": "127.0.0.1"},
     ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH")),
    ("duplicates joined", head("X-A: 1", "Cookie: a=1", "x-a: 2", "cookie: b=2", "X-A: 3"),
     {"HTTP_X_A": "1,2,3", "HTTP_COOKIE": "a=1; b=2"}, ()),
    ("underscores dropped", head("X_Who: evil", "X-Who: good", "Content_Length: 9"),
     {"HTTP_X_WHO": "good"}, ("CONTENT_LENGTH",)),
    ("blanks", head("X-Pad: \t v  w \t", "X-Empty:", "X-Blank:   ",
                    "Content-Type:  text/plain "),
     {"HTTP_X_PAD": "v  w", "HTTP_X_EMPTY": "", "HTTP_X_BLANK": "",
      "CONTENT_TYPE": "text/plain "}, ()),
    ("blanks before values", head("X-Pad: \t v  w", "X-Empty:", "Content-Type:  text/plain",
                                  "X-Name: caf\xe9"),
     {"HTTP_X_PAD": "v  w", "HTTP_X_EMPTY": "", "CONTENT_TYPE": "text/plain",
      "HTTP_X_NAME": "caf\xe9"}, ()),
    ("latin-1 and controls", head("X-Name: caf\xe9 \xa0ok", "X-Edge: \xa0v\xa0",
                                  "X-Ctl: a\x01b", "X-VT: \x0bv\x0c", "X-CR: a\rb"),
     {"HTTP_X_NAME": "caf\xe9 \xa0ok", "HTTP_X_EDGE": "v", "HTTP_X_CTL": "a\x01b",
      "HTTP_X_VT": "v", "HTTP_X_CR": "a\rb"}, ()),
    ("names in any case", head("HOST: lb", "content-length: 2", "content-TYPE: x/y",
                               body="ab"),
     {"HTTP_HOST": "lb", "CONTENT_LENGTH": "2", "CONTENT_TYPE": "x/y", "body": "ab"}, ()),
    ("path and query", head("Host: lb", start="GET /echo%20x/%41?a=1&b=%20 HTTP/1.1"),
     {"REQUEST_METHOD": "GET", "PATH_INFO": "/echo x/A", "QUERY_STRING": "a=1&b=%20"}, ()),
    ("loose request line", head("Host: lb", start="GET \t/echo   HTTP/1.1 "),
     {"PATH_INFO": "/echo", "SERVER_PROTOCOL": "HTTP/1.1"}, ()),
    ("one length twice", head("Content-Length: 2", "Content-Length:  2", body="{}"),
     {"CONTENT_LENGTH": "2", "body": "{}"}, ()),
    ("chunked", head("Transfer-Encoding: Chunked", body="2\r\n{}\r\n0\r\n\r\n"),
     {"HTTP_TRANSFER_ENCODING": "Chunked", "body": "{}"}, ("CONTENT_LENGTH",)),
    ("bare line feeds", b"POST /echo HTTP/1.1\nHost: lb\nX-A: 1 \nContent-Length: 2\n\n{}",
     {"HTTP_HOST": "lb", "HTTP_X_A": "1", "CONTENT_LENGTH": "2", "body": "{}"}, ()),
    ("upgrade", head("Connection: Upgrade", "Upgrade: websocket", start="GET /echo HTTP/1.1"),
     {"terminated": False, "HTTP_UPGRADE": "websocket"}, ()),
    # 64 bytes of request line, 6 header lines of 256 bytes with the blank line
    ("at every limit", head(*(f"X-{i}: {'v' * 33}" for i in range(5)), "X-L: " + "w" * 47,
                            start="GET /echo?" + "q" * 43 + " HTTP/1.1"),
     {"HTTP_X_0": "v" * 33, "HTTP_X_L": "w" * 47, "QUERY_STRING": "q" * 43}, ()),
]

REFUSED: list[tuple[str, bytes, int, str]] = [
    ("folded line", head("X-A: 1", " folded"), 400, ""),
    ("tab folded", head("X-A: 1", "\tfolded"), 400, ""),
    ("space before the colon", head("X-A : 1"), 400, ""),
    ("no colon", head("no colon here"), 400, ""),
    ("no name", head(": v"), 400, ""),
    ("two lengths", head("Content-Length: 2", "Content-Length: 3", body="{}"), 400, ""),
    ("a coding", head("Transfer-Encoding: gzip, chunked", body="0\r\n\r\n"), 400, ""),
    ("chunked twice", head("Transfer-Encoding: chunked", "Transfer-Encoding: chunked",
                           body="0\r\n\r\n"), 400, ""),
    ("identity", head("Transfer-Encoding: identity"), 400, ""),
    # both framings: which one a proxy in front believed is unknown (request smuggling);
    # RFC 9112 section 6.3 lets a server reject it, as nginx does since 1.21.1
    ("chunked and a length", head("Content-Length: 5", "Transfer-Encoding: chunked",
                                  body="2\r\n{}\r\n0\r\n\r\n"), 400, ""),
    ("a length and chunked", head("Transfer-Encoding: chunked", "Content-Length: 5",
                                  body="2\r\n{}\r\n0\r\n\r\n"), 400, ""),
    ("length not a number", head("Content-Length: abc"), 400, ""),
    ("negative length", head("Content-Length: -5"), 400, ""),
    # lengths Python's int() reads but HTTP does not (a proxy in front may frame otherwise)
    ("length with a sign", head("Content-Length: +2", body="{}"), 400, ""),
    ("length with an underscore", head("Content-Length: 0_2", body="{}"), 400, ""),
    ("length in superscript", head("Content-Length: \xb2", body="{}"), 400, ""),
    ("HEAD with a body", head("Content-Length: 5", start="HEAD /echo HTTP/1.1"), 400, ""),
    ("unknown version", head("Host: lb", start="GET /echo HTTP/9.9"), 400, ""),
    ("four words", head("Host: lb", start="GET /echo HTTP/1.1 x"), 400, ""),
    ("request line over", head(start="GET /echo?" + "q" * 44 + " HTTP/1.1"), 431,
     "request line too long: the limit is 64 bytes"),
    ("header bytes over", head(*(f"X-{i}: {'v' * 33}" for i in range(5)), "X-L: " + "w" * 48),
     431, "request header fields too large: the limit is 256 bytes"),
    ("header count over", head(*(f"X-{i}: v" for i in range(7))), 431,
     "too many request header fields: the limit is 6"),
    ("over before malformed", head("X-A: " + "v" * 300, "bad line"), 431,
     "request header fields too large: the limit is 256 bytes"),
    ("malformed before over", head("bad line", "X-A: " + "v" * 300), 400, ""),
]

SPLITS = [None, 3, 30]  # whole; split within the request line; within the headers
SPLIT_IDS = ["whole", "split-line", "split-headers"]


@pytest.mark.parametrize("split", SPLITS, ids=SPLIT_IDS)
@pytest.mark.parametrize(("data", "want", "absent"), [c[1:] for c in SERVED],
                         ids=[c[0] for c in SERVED])
def test_a_served_head_reaches_the_app_as_pywsgi_builds_it(server, data, want, absent, split):
    with send(server, data, split) as conn:
        status, _, body = conn.reply()
        assert status == 200
        seen = json.loads(body)
        assert {k: seen.get(k) for k in want} == want
        assert [k for k in absent if k in seen] == []


@pytest.mark.parametrize("split", SPLITS, ids=SPLIT_IDS)
@pytest.mark.parametrize(("data", "status", "message"), [c[1:] for c in REFUSED],
                         ids=[c[0] for c in REFUSED])
def test_a_refused_head_gets_its_status_and_a_close(server, data, status, message, split):
    with send(server, data, split) as conn:
        got, headers, body = conn.reply()
        assert got == status and headers["connection"] == "close"
        if message:
            assert json.loads(body)["error"] == message
        assert conn.closed()


def test_an_empty_request_line_is_refused(server):
    with send(server, b"\r\nHost: lb\r\n\r\n", None) as conn:
        assert conn.reply()[0] == 400 and conn.closed()


def test_keep_alive_follows_the_version_and_connection_header(server):
    for data, kept in [(head(start="GET /echo HTTP/1.0"), False),
                       (head("Connection: keep-alive", start="GET /echo HTTP/1.0"), True),
                       (head("Connection: close", start="GET /echo HTTP/1.1"), False),
                       (head("Connection: CLOSE", start="GET /echo HTTP/1.1"), False),
                       (head(start="GET /echo HTTP/1.1"), True)]:
        with send(server, data, None) as conn:
            assert conn.reply()[0] == 200
            if not kept:
                assert conn.closed(), data
                continue
            conn.sock.sendall(head(start="GET /echo?again HTTP/1.1"))
            assert json.loads(conn.reply()[2])["QUERY_STRING"] == "again"


def test_pipelined_requests_are_answered_in_order(server):
    data = b"".join(head("Content-Length: 1", body=c, start=f"POST /echo?{c} HTTP/1.1")
                    for c in "abc")
    with send(server, data, None) as conn:
        for c in "abc":
            seen = json.loads(conn.reply()[2])
            assert (seen["QUERY_STRING"], seen["body"]) == (c, c)


def test_expect_100_continue_is_answered_before_the_body_is_read(server):
    with send(server, head("Expect: 100-continue", "Content-Length: 2"), None) as conn:
        assert conn.file.readline() == b"HTTP/1.1 100 Continue\r\n"
        assert conn.file.readline() == b"\r\n"
        conn.sock.sendall(b"{}")
        status, _, body = conn.reply()
        assert status == 200 and json.loads(body)["body"] == "{}"


@pytest.mark.parametrize("with_head", [0, 5, 11])
def test_a_body_is_read_whole_however_much_of_it_came_with_the_head(server, with_head):
    body = b'{"a": "bc"}x'  # 12 bytes: none, some or all but one with the head
    data = head("Content-Length: 12").decode("latin-1").encode() + body[:with_head]
    with send(server, data, None) as conn:
        assert wait_until(lambda: any(h.environ for h in server.connections))  # reading
        conn.sock.sendall(body[with_head:])
        seen = json.loads(conn.reply()[2])
        assert seen["body"] == body.decode()
        conn.sock.sendall(head("Content-Length: 2", body="{}"))  # and the next one, kept alive
        assert json.loads(conn.reply()[2])["body"] == "{}"


def random_head(rng: random.Random) -> bytes:
    """A head from pieces that sit at the edges of the parse: names in any case and with an
    underscore, blanks and odd bytes at a value's ends, framing headers, bare LF, folding."""
    names = ["Host", "X-A", "x-a", "Content-Length", "content-length", "Transfer-Encoding",
             "Connection", "Cookie", "X_U", "Content-Type", "Authorization"]
    plain = ["1", "", "a b", "caf\xe9", "chunked", "Chunked", "gzip", "close", "keep-alive",
             "2", "-1", "a,b", "a\tb"]
    odd = ["1 ", "\t1\t", "\xa0x", "x\x01y", "a\rb", "\x0bv", "v\x85"]
    start = rng.choice(["POST /echo HTTP/1.1", "GET /echo?x=%41 HTTP/1.0",
                        "POST /ec%68o HTTP/1.1"] * 4 + ["GET  /echo HTTP/1.1",
                                                        "GET /echo HTTP/2.0"])
    lines = [start]
    for _ in range(rng.randrange(8)):
        sep = rng.choice([": ", ":", ":  ", ":\t", " : " if rng.random() < 0.2 else ": "])
        value = rng.choice(odd if rng.random() < 0.1 else plain)
        lines.append(rng.choice(names) + sep + value)
        if rng.random() < 0.03:
            lines.append(" folded")
    ends = "\n" if rng.random() < 0.05 else "\r\n"
    return (ends.join(lines) + ends + ends).encode("latin-1") + b"2\r\n{}\r\n0\r\n\r\n"


def outcome(srv: ApplianceServer, data: bytes, split: int | None) -> tuple[Any, ...]:
    with send(srv, data, split) as conn:
        status, headers, body = conn.reply()
    if status != 200:
        return status, headers.get("connection"), body
    seen = json.loads(body)
    seen.pop("REMOTE_PORT")
    return status, seen


def test_a_head_parsed_in_one_pass_gives_what_reading_it_line_by_line_gives(server):
    """Random heads at the parse's edges, each sent whole (parsed in one pass when plain)
    and split (read line by line, as every head was before): the same answer, the same
    environ."""
    rng = random.Random(20261202)
    for _ in range(200):
        data = random_head(rng)
        assert outcome(server, data, None) == outcome(server, data, 3), data
