"""Request validation: the body as Ollama's Go decoder would see it, plus configured rules.

The body is parsed as JSON whatever the Content-Type (Ollama ignores it). Field types are
checked with a marshmallow schema of strict fields, and failures are worded the way Ollama's Go
decoder words them, because clients surface those messages to users. Only the fields routing
needs are read; the body itself is forwarded untouched.
"""

from __future__ import annotations

import json
import json.decoder
import json.scanner
from collections.abc import Callable
from typing import Any, NamedTuple

import gevent
from marshmallow import EXCLUDE, Schema, ValidationError
from marshmallow import fields as f

from pipeline.endpoints import Endpoint

# The Go struct each path's body decodes into, named in the decoder's messages; a bare name is
# in package ``api``.
GO_STRUCT = {
    "/api/generate": "GenerateRequest", "/v1/inference": "GenerateRequest",
    "/api/chat": "ChatRequest", "/api/embed": "EmbedRequest",
    "/api/embeddings": "EmbeddingRequest", "/api/show": "ShowRequest",
    "/api/push": "PushRequest", "/v1/chat/completions": "ChatCompletionRequest",
    "/v1/completions": "CompletionRequest", "/v1/embeddings": "EmbedRequest",
    "/v1/responses": "openai.ResponsesRequest", "/v1/messages": "anthropic.MessagesRequest",
}


def go_struct(endpoint: Endpoint) -> tuple[str, str]:
    """(the package-qualified struct name, the bare one), as Go's decoder names them: the
    first for a body of the wrong JSON type, the second for a field of the wrong type."""
    name = GO_STRUCT.get(endpoint.path, "GenerateRequest")
    qualified = name if "." in name else f"api.{name}"
    return qualified, qualified.rsplit(".", 1)[1]


def go_type(value: Any) -> str:
    """The JSON type name Go's decoder reports."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


class _Strict(f.Field):
    """A field that accepts exactly one JSON type (or null), as Go's decoder does."""

    py_type: type | tuple[type, ...] = object
    go_name = "string"

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, self.py_type) or (self.go_name != "bool" and isinstance(
                value, bool)):
            raise ValidationError(f"{go_type(value)}|{self.go_name}")
        return value


class StrictString(_Strict):
    py_type = str
    go_name = "string"


class StrictBool(_Strict):
    py_type = bool
    go_name = "bool"


class RequestFacts(Schema):
    """The few fields routing reads; everything else passes through unread."""

    class Meta:
        unknown = EXCLUDE

    model = StrictString(allow_none=True)
    name = StrictString(allow_none=True)
    stream = StrictBool(allow_none=True)


_FACTS = RequestFacts()


class BadRequest(ValueError):
    """The body is not what Ollama would accept; the message is Ollama's wording."""


#: bodies at least this large are parsed off the hub (see ``inspect_off_hub``)
OFF_HUB_BYTES = 1 << 20


class Facts(NamedTuple):
    """What routing needs from a body; the body itself is forwarded untouched. A NamedTuple:
    made once per request, where a frozen dataclass's ``__init__`` costs twice as much."""

    model_raw: str  # the model as the client wrote it ("" if none)
    stream: bool
    unload: bool  # empty prompt with keep_alive 0: sent to every node with the model
    prompt_chars: int


def inspect(endpoint: Endpoint, body: bytes,
            loads: Callable[[bytes], Any] = json.loads) -> Facts:
    """Parse and check a body once; raises BadRequest in Ollama's words."""
    payload = parse_body(endpoint, body, loads)
    facts = read_facts(endpoint, payload)
    raw = facts.get("model") or (facts.get("name") if endpoint.name_fallback else None) or ""
    stream = facts.get("stream")
    stream = (endpoint.stream_default if stream is None else bool(stream)) and endpoint.can_stream
    return Facts(raw, stream, endpoint.unloads and is_unload(payload),
                 prompt_length(payload) if raw else 0)


def _python_loads() -> Callable[[bytes], Any]:
    """json.loads on the pure-Python scanner: slower, but it runs bytecode, so a thread
    running it gives the GIL back to the hub every switch interval (the C scanner never does
    until it is done)."""
    decoder = json.JSONDecoder()
    decoder.parse_string = json.decoder.py_scanstring  # type: ignore[attr-defined]
    decoder.scan_once = json.scanner.py_make_scanner(decoder)  # type: ignore[attr-defined]

    def loads(body: bytes) -> Any:
        text = body.decode("utf-8") if isinstance(body, bytes) else body
        return decoder.decode(text)

    return loads


_PY_LOADS = _python_loads()


def inspect_off_hub(endpoint: Endpoint, body: bytes) -> Facts:
    """``inspect``, in a native thread for a large body, so other streams keep flowing.

    Parsing a 40 MB body of many small objects takes most of a second of CPU; done on the hub
    it would stall every stream for that long. Blocks only the calling greenlet.
    """
    if len(body) < OFF_HUB_BYTES:
        return inspect(endpoint, body)
    return gevent.get_hub().threadpool.apply(inspect, (endpoint, body, _PY_LOADS))


def parse_body(endpoint: Endpoint, body: bytes,
               loads: Callable[[bytes], Any] = json.loads) -> dict[str, Any]:
    """The body as a JSON object, with Go-worded errors for everything else."""
    if not body.strip():
        raise BadRequest("missing request body")
    try:
        payload = _plain_loads(body) if loads is json.loads else loads(body)
    except RecursionError:
        raise BadRequest("exceeded max depth") from None  # Go's decoder's words
    except UnicodeDecodeError:
        raise BadRequest("invalid character looking for beginning of value") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(_json_error(exc)) from None
    if not isinstance(payload, dict):
        raise BadRequest(f"json: cannot unmarshal {go_type(payload)} into Go value of type "
                         f"{go_struct(endpoint)[0]}")
    return payload


def read_facts(endpoint: Endpoint, payload: dict[str, Any]) -> dict[str, Any]:
    """model/name/stream, type-checked by the RequestFacts schema.

    The schema is the authority, but running it is mostly marshmallow's generic machinery
    (its cost is in tests/bench/performance.md), so bodies whose three fields already have the
    exact types the schema accepts (the common case) take a fast path that reaches the same result;
    ``tests/test_validation.py`` checks that both agree.
    """
    model, name, stream = payload.get("model"), payload.get("name"), payload.get("stream")
    if ((model is None or type(model) is str) and (name is None or type(name) is str)
            and (stream is None or type(stream) is bool)):
        return {k: v for k, v in (("model", model), ("name", name), ("stream", stream))
                if k in payload}
    return load_facts(endpoint, payload)


def load_facts(endpoint: Endpoint, payload: dict[str, Any]) -> dict[str, Any]:
    """The schema path: every body that is not obviously well-typed goes through here."""
    try:
        return _FACTS.load(payload)
    except ValidationError as exc:
        field, msgs = next(iter(exc.messages.items()))  # type: ignore[union-attr]
        got, want = str(msgs[0]).split("|", 1)
        struct = go_struct(endpoint)[1]
        raise BadRequest(f"json: cannot unmarshal {got} into Go struct field {struct}.{field} "
                         f"of type {want}") from None


_DECODE = json.JSONDecoder().decode


def _plain_loads(body: bytes) -> Any:
    """``json.loads`` without its encoding detection for a body that starts ``{`` followed by
    a non-zero byte: the detection answers UTF-8 for every such body, so the result and the
    errors are the same, for fewer calls on every request."""
    if type(body) is bytes and body[:1] == b"{" and body[1:2] != b"\x00":
        return _DECODE(body.decode("utf-8", "surrogatepass"))
    return json.loads(body)


def _json_error(exc: json.JSONDecodeError) -> str:
    if exc.pos >= len(exc.doc.rstrip()):
        return "unexpected end of JSON input"
    ch = exc.doc[exc.pos]
    return f"invalid character {ch!r} looking for beginning of value"


def _text_len(value: Any) -> int:
    """Characters of text in strings, lists and message/content-part dicts (no recursion:
    a body may nest as deep as the JSON parser allows)."""
    total, todo = 0, [value]
    while todo:
        item = todo.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, list):
            todo.extend(item)
        elif isinstance(item, dict):  # an OpenAI content part or a message
            for part in (item.get("text"), item.get("content")):
                if part is not None:
                    todo.append(part)
    return total


#: the fields of any endpoint's body that carry prompt text
PROMPT_FIELDS = ("prompt", "system", "messages", "input", "instructions")


def prompt_length(payload: dict[str, Any]) -> int:
    """Characters of prompt text in any endpoint's body (prompt, system, messages, input, and
    the Responses API's instructions). A plain string, the common field, is measured in place."""
    total = 0
    for field in PROMPT_FIELDS:
        value = payload.get(field)
        if type(value) is str:
            total += len(value)
        elif value is not None:
            total += _text_len(value)
    return total


ZERO_DURATIONS = {"0", "0s", "0m", "0h", "0ms", "-0"}


def is_unload(payload: dict[str, Any]) -> bool:
    """Empty prompt (or messages) with keep_alive 0: the client means "free this model"."""
    keep = payload.get("keep_alive")
    zero = (keep == 0 and not isinstance(keep, bool)) or (
        isinstance(keep, str) and keep.strip() in ZERO_DURATIONS)
    return zero and not payload.get("prompt") and not payload.get("messages")
