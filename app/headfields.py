"""Request header fields: read line by line under limits, or a whole head in one pass.

pywsgi parses header lines with the ``email`` package and builds the environ's ``HTTP_``
entries again from them; here both come from one loop over ``name: value`` pairs. A head
still arriving is read line by line (``read_fields``, with the size and count limits and the
refusals request smuggling is made of); a head that is already here whole and in its plainest
form is parsed in one pass (``whole_head``): the same fields, environ and refusals either way.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from gevent.pywsgi import OldMessage

from app.intake import HeadRejected

_TCHAR = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]"  # what a header name is made of (RFC 9110 token)
# a header line: a token, then a colon at once (no obs-fold, no space before the colon)
FIELD = re.compile(rf"{_TCHAR}+:".encode())


def read_fields(fp: Any, max_bytes: int, max_count: int) -> Fields:
    """The header lines after the request line, parsed as pywsgi's MessageClass would, but
    never reading more than ``max_bytes`` or ``max_count`` lines (HeadRejected: 431), and
    refusing what request smuggling is made of (ValueError: 400, see ``check_framing``).
    The way for a head still arriving, or one the one-pass parse (``whole_head``) declines."""
    pairs: list[tuple[str, str]] = []
    size = 0
    while True:
        line = fp.readline(max_bytes - size + 1)
        size += len(line)
        if size > max_bytes:
            raise HeadRejected(431, f"request header fields too large: the limit is "
                                    f"{max_bytes} bytes")
        if line in (b"\r\n", b"\n", b""):
            break
        if not FIELD.match(line):
            raise ValueError(f"malformed header line {line[:40]!r}")
        name, _, value = line.decode("iso-8859-1").partition(":")
        pairs.append((name, value.lstrip(" \t").rstrip("\r\n")))
        if len(pairs) > max_count:
            raise HeadRejected(431, f"too many request header fields: the limit is "
                                    f"{max_count}")
    fields = Fields(pairs)
    check_framing(fields)
    return fields


# A head in its plainest form: one space between three words, HTTP/1.0 or 1.1, CRLF line
# ends, ``name: value`` lines whose values are ready as the environ holds them: nothing at
# either end that str.strip() (pywsgi's) would remove, no control character but a tab within
# (blanks before a line end are looked for apart: ``whole_head``). Anything else (bare LF,
# obs-fold, a stray CR, an odd request line) is left to read_fields and pywsgi's parsing,
# which give today's answers. Possessive runs of character classes: one pass, no backtracking.
_TOKEN = _TCHAR + "++"
_VALUE = r"[^\x00-\x08\x0a-\x1f\x7f\x85\xa0]*+"  # after the blanks that lead it
PLAIN_HEAD = re.compile(
    rf"(\S++) (\S++) (HTTP/1\.[01])\r\n((?:{_TOKEN}:[ \t]*+{_VALUE}\r\n)*+)\r\n")
PLAIN_FIELD = re.compile(rf"({_TOKEN}):[ \t]*+({_VALUE})\r\n")


class Head(NamedTuple):
    """A request head parsed in one pass: what pywsgi's read_request takes from it."""

    requestline: str
    command: str
    path: str
    version: str
    fields: Fields


def whole_head(data: bytes, end: int, max_line: int, max_bytes: int, max_count: int
               ) -> Head | None:
    """The head ending at ``end`` (its blank line) of bytes already received, in one pass:
    one decode, one match, one split into fields, instead of some fourteen calls per line.
    None when it is not in its plainest form or is near a limit: then read_fields reads it,
    line by line, and gives the answers (400, 431) and values it always gave."""
    text = data[:end + 4].decode("latin-1")
    m = PLAIN_HEAD.fullmatch(text)
    if m is None or " \r\n" in text or "\t\r\n" in text:
        return None
    block = m[4]
    size = end + 4  # within both limits, its parts are too (the usual case: no len())
    if (size > max_line or size > max_bytes) and (
            size - 2 - len(block) > max_line or len(block) + 2 > max_bytes):
        return None  # over a limit: read_fields says which, as it does for any head
    pairs = PLAIN_FIELD.findall(block)
    if len(pairs) > max_count:
        return None
    fields = Fields(pairs, stripped=True)
    first = fields.first
    if fields.repeated or "transfer-encoding" in first:
        check_framing(fields)  # what read_fields checks of every head
    elif "content-length" in first:
        check_length(first["content-length"])  # the one framing rule a single field needs
    return Head(f"{m[1]} {m[2]} {m[3]}", m[1], m[2], m[3], fields)


#: pywsgi's environ names of header fields (``HTTP_`` and the name in capitals, ``-`` as
#: ``_``; None for a name it leaves out: with an ``_``, or Content-Type and -Length, which have
#: their own), with the lower-case name, by the name as sent. Common names are here from the
#: start, others are learnt up to NAMES_MAX (a client making names up cannot grow it further).
NAMES: dict[str, tuple[str, str | None]] = {}
NAMES_MAX = 512
COMMON_NAMES = (
    "Host", "User-Agent", "Accept", "Accept-Encoding", "Accept-Language", "Connection",
    "Content-Type", "Content-Length", "Transfer-Encoding", "Expect", "Authorization",
    "X-Api-Key", "Origin", "Cookie", "Upgrade", "Keep-Alive", "Referer", "Cache-Control",
    "X-Request-ID", "X-Correlation-ID", "X-Forwarded-For", "X-Forwarded-Proto",
    "X-Forwarded-Host", "X-Real-IP", "Forwarded", "Traceparent", "Anthropic-Version",
    "OpenAI-Organization", "OpenAI-Project", "X-Stainless-Lang", "X-Stainless-Package-Version",
    "X-Stainless-OS", "X-Stainless-Arch", "X-Stainless-Runtime", "X-Stainless-Runtime-Version",
    "X-Stainless-Async", "X-Stainless-Retry-Count", "X-Stainless-Read-Timeout")


def name_entry(name: str) -> tuple[str, str | None]:
    """(lower-case name, environ name or None) of a header name, remembered while there is
    room."""
    key: str | None = None
    if "_" not in name:  # pywsgi drops such names: X_Forwarded_For must not pass as X-...
        key = "HTTP_" + name.replace("-", "_").upper()
        if key in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
            key = None
    entry = (name.lower(), key)
    if len(NAMES) < NAMES_MAX:
        NAMES[name] = entry
    return entry


for _name in COMMON_NAMES:
    for _spelling in (_name, _name.lower(), _name.title()):
        name_entry(_spelling)


class Fields(OldMessage):
    """Request header fields as pywsgi reads them (``get``, ``getheader``, ``headers``,
    ``typeheader``, ``del``), built from the checked lines directly: the ``email`` parser
    pywsgi uses costs ~80 Python calls per request for what is a split on the first colon.
    Values as email's compat32 policy gives them: leading blanks and the line end stripped.

    The ``HTTP_`` entries of the environ are made here as well, in the same loop, as pywsgi's
    ``_headers`` makes them (values stripped, repeated names joined with ``,``, or ``; `` for
    cookies): ``environ``. ``stripped``: the values need no stripping (``whole_head``)."""

    def __init__(self, pairs: list[tuple[str, str]], stripped: bool = False) -> None:
        self.status = ""
        self._headers = pairs
        first: dict[str, str] = {}
        env: dict[str, str] = {}
        repeated = False
        for name, value in pairs:
            low, key = NAMES[name] if name in NAMES else name_entry(name)
            if low in first:
                repeated = True
            else:
                first[low] = value
            if key is None:
                continue
            if not stripped:
                value = value.strip()
            if key in env:
                env[key] += ("; " if "COOKIE" in key else ",") + value
            else:
                env[key] = value
        self.first = first  # lower-case name -> its first value
        self.environ = env
        self.repeated = repeated  # a name came more than once: check_framing must look

    def get(self, name: str, failobj: Any = None) -> Any:  # type: ignore[override]
        return self.first.get(name.lower(), failobj)

    def getheader(self, name: str, default: Any = None) -> Any:
        return self.first.get(name.lower(), default)

    def get_all(self, name: str, failobj: Any = None) -> Any:  # type: ignore[override]
        key = name.lower()
        return [v for k, v in self._headers if k.lower() == key] or failobj

    def __getitem__(self, name: str) -> Any:
        return self.first.get(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self.first

    def __delitem__(self, name: str) -> None:
        key = name.lower()
        self._headers = [(k, v) for k, v in self._headers if k.lower() != key]
        self.first.pop(key, None)
        env_key = (NAMES[name] if name in NAMES else name_entry(name))[1]
        if env_key is not None:
            self.environ.pop(env_key, None)

    def items(self) -> list[tuple[str, str]]:  # type: ignore[override]
        return list(self._headers)

    def keys(self) -> list[str]:  # type: ignore[override]
        return [k for k, _ in self._headers]

    def __len__(self) -> int:
        return len(self._headers)


def check_framing(fields: OldMessage) -> None:
    """One unambiguous body length, as RFC 9112 §6 asks of a server behind or before proxies:
    no two different Content-Lengths, no Transfer-Encoding but plain ``chunked``, and not both
    (a proxy in front may have framed the body by the other one: RFC 9112 §6.3 lets a server
    refuse that, and nginx does); each length only digits."""
    lengths = {v.strip() for v in fields.get_all("content-length") or ()}
    for length in lengths:
        check_length(length)
    if len(lengths) > 1:
        raise ValueError(f"conflicting Content-Length headers: {sorted(lengths)}")
    codings = fields.get_all("transfer-encoding") or ()
    if codings and lengths:
        raise ValueError("both Content-Length and Transfer-Encoding")
    if codings and [c.strip().lower() for c in codings] != ["chunked"]:
        raise ValueError(f"unsupported Transfer-Encoding: {', '.join(codings)}")


def check_length(value: str) -> None:
    """A Content-Length is ASCII digits and nothing else (RFC 9110 §8.6): Python's ``int``
    would also take ``+5``, ``1_0`` or a superscript digit, which a proxy in front may read
    otherwise."""
    if not (value.isascii() and value.isdigit()):
        raise ValueError(f"invalid Content-Length: {value[:20]!r}")
