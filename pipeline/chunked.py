"""A node's chunked stream, decoded straight off its socket.

http.client decodes a chunked body one chunk per call through six Python layers (read1, the
chunk-size line through the buffered reader and ``SocketIO``, the data, the CRLF): for a token
stream, where every chunk is one line, that is most of what relaying a line costs. A proxy
needs less: read what has arrived in one ``recv`` and take every whole chunk out of it in one
pass. ``ChunkedReader.read()`` does that, with http.client's limits and errors (a size line
longer than its limit or not hexadecimal, a missing CRLF after a chunk's data: a protocol
error; the connection closing before the last chunk: ``IncompleteRead``), so a broken stream
is reported as one.
"""

from __future__ import annotations

from collections.abc import Callable
from http.client import IncompleteRead, LineTooLong

RECV_BYTES = 65536  # above the head reader's buffer size: its read1 then leaves it empty
MAX_LINE = 65536  # http.client's _MAXLINE, for a chunk-size line and each trailer line
_DATA, _CRLF, _SIZE, _TRAILER, _DONE = range(5)


class ChunkFramingError(IncompleteRead):
    """The node's chunked framing is broken (not hexadecimal, no CRLF where one must be)."""

    def __init__(self, why: str) -> None:
        super().__init__(b"")
        self.why = why

    def __str__(self) -> str:
        return f"bad chunked framing: {self.why}"


class ChunkedReader:
    """Decodes one chunked body; ``read()`` gives the data of every chunk that has arrived."""

    __slots__ = ("_buf", "_first", "_full", "_left", "_on_done", "_recv", "_state", "_wait")

    def __init__(self, recv: Callable[[int], bytes], first: Callable[[int], bytes],
                 on_done: Callable[[], None], wait: Callable[[], None] | None = None) -> None:
        #: the socket's recv: b"" at EOF; without ``wait`` it blocks until something arrives,
        #: with it, it may raise BlockingIOError (a non-blocking socket's own recv)
        self._recv = recv
        #: the head's buffered reader: what it already took off the socket, else one recv
        self._first: Callable[[int], bytes] | None = first
        self._on_done = on_done  # once, when the body has ended
        #: blocks until the socket is readable. Waiting before asking saves, on a token
        #: stream (where the next line is never there yet when the last one was read), one
        #: failed system call and one exception per line; a read that filled its buffer asks
        #: again at once (more may be waiting)
        self._wait = wait
        self._full = False
        self._buf = b""
        self._state = _SIZE
        self._left = 0  # data bytes still to come in the current chunk

    @property
    def done(self) -> bool:
        """The last chunk and its trailers were read: the connection can carry another request."""
        return self._state == _DONE

    @property
    def more(self) -> bool:
        """Another read would not wait: the last ``recv`` filled its buffer (more may be on
        the socket already), or the last chunk has come (the next read ends the body)."""
        return self._full or self._state == _DONE

    def read(self) -> bytes:
        """At least one byte of chunk data, or b"" once the body has ended; waits for the node."""
        return self.read_now(wait=True)  # type: ignore[return-value]  # waits: never None

    def read_now(self, wait: bool = False) -> bytes | None:
        """What ``read()`` gives, without waiting: None while nothing whole has arrived.

        For a non-blocking socket's ``recv`` (one with ``wait``) once the head reader's
        leftovers were taken (after a first ``read()``), called from the hub's loop when the
        socket is readable: it never yields. (``wait`` True is ``read()``.)
        """
        while self._state != _DONE:
            if buf := self._buf:
                if self._state == _SIZE and (out := _one_whole_chunk(buf)):
                    self._buf = b""  # a token stream's every read: one chunk, whole
                    return out
                if out := self._decode():
                    return out
                if self._state == _DONE:
                    break
            if self._first is not None:
                data, self._first = self._first(RECV_BYTES), None
            else:
                if wait and self._wait is not None and not self._full:
                    self._wait()
                try:
                    data = self._recv(RECV_BYTES)
                except BlockingIOError:
                    self._full = False
                    if not wait:
                        return None
                    continue
                self._full = len(data) == RECV_BYTES
            if not data:
                raise IncompleteRead(b"", self._left or None)
            self._buf = self._buf + data if self._buf else data
        self._on_done()
        return b""

    def _decode(self) -> bytes:
        """Every chunk's data that ``_buf`` holds; what is left of a chunk stays for later."""
        buf, pos, out = self._buf, 0, []
        state, left, end = self._state, self._left, len(self._buf)
        while pos < end:
            if state == _DATA:
                take = min(left, end - pos)
                out.append(buf[pos:pos + take])
                pos += take
                left -= take
                if left:
                    break
                state = _CRLF
            elif state == _CRLF:
                if end - pos < 2:
                    break
                if buf[pos:pos + 2] != b"\r\n":
                    raise ChunkFramingError("no CRLF after a chunk's data")
                pos += 2
                state = _SIZE
            elif state == _SIZE:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    _check_line(end - pos)
                    break
                try:  # the common line: hex digits alone
                    left = int(buf[pos:eol], 16) if eol - pos <= 16 else -1
                except ValueError:
                    left = -1
                if left < 0:  # an extension, a long line, or no size at all
                    left = _chunk_size(buf[pos:eol])
                pos = eol + 2
                state = _DATA if left else _TRAILER
            else:  # _TRAILER: lines up to an empty one (trailer fields are not forwarded)
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    _check_line(end - pos)
                    break
                state = _DONE if eol == pos else _TRAILER
                pos = eol + 2
                if state == _DONE:
                    break
        self._buf, self._state, self._left = buf[pos:], state, left
        return out[0] if len(out) == 1 else b"".join(out)


def _one_whole_chunk(buf: bytes) -> bytes:
    """The data of ``buf`` if it is exactly one whole chunk with a plain size line, else b""."""
    eol = buf.find(b"\r\n", 0, 18)
    if eol <= 0:
        return b""
    try:
        size = int(buf[:eol], 16)
    except ValueError:
        return b""
    end = eol + 2 + size
    if size <= 0 or len(buf) != end + 2 or buf[end:] != b"\r\n":
        return b""
    return buf[eol + 2:end]


def _chunk_size(line: bytes) -> int:
    _check_line(len(line))
    try:
        size = int(line.split(b";", 1)[0], 16)
    except ValueError:
        raise ChunkFramingError(f"chunk size {line[:20]!r} is not hexadecimal") from None
    if size < 0:
        raise ChunkFramingError("negative chunk size")
    return size


def _check_line(length: int) -> None:
    if length > MAX_LINE:
        raise LineTooLong("chunk size")
