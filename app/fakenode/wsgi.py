"""The simulated Ollama node's HTTP surface: a plain WSGI app with Ollama's exact shapes.

Plain WSGI rather than Flask: as the "direct" baseline in benchmarks it must cost as little as
possible, so that the appliance's overhead is what the numbers show.

Fault knobs (``FakeNode.set_fault``), for the chaos tests: ``hang`` (never answer),
``reset`` (RST before headers), ``reset-mid-stream``, ``error-mid-stream``,
``stall-mid-stream`` (stops sending after two tokens), ``500``, ``503``,
``malformed`` (invalid JSON), ``flap`` (alternates healthy and reset every ``flap_period``
seconds, health checks included). ``refuse`` is a server-level state (see server.py).
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

import gevent

from app.fakenode.sim import Loaded, Profile, ServerBusy, Simulator, embedding_for
from app.netutil import abort
from pipeline.modelname import canonical, display, namespace

StartResponse = Callable[..., Any]
JSON = "application/json; charset=utf-8"
BUSY = "server busy, please try again.  maximum pending requests exceeded"
INFERENCE = {"/api/generate", "/api/chat", "/api/embed", "/api/embeddings",
             "/v1/chat/completions", "/v1/completions", "/v1/embeddings"}
FAULTS = ("none", "hang", "reset", "reset-mid-stream", "error-mid-stream", "stall-mid-stream",
          "500", "503", "malformed", "flap", "refuse")
STATUS_TEXT = {200: "OK", 201: "Created", 400: "Bad Request", 403: "Forbidden",
               404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error",
               503: "Service Unavailable"}


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def local_time(ts: float) -> str:
    return datetime.fromtimestamp(ts).astimezone().isoformat()


_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def parse_keep_alive(value: Any) -> float | None:
    """Seconds from a JSON number or a Go duration string; None when absent."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise HTTPError(400, "json: cannot unmarshal bool into Go value of type api.Duration")
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip()
    if text in ("0", "-0"):
        return 0.0
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text.replace("+", ""):
        if re.fullmatch(r"-?\d+(\.\d+)?", text):
            raise HTTPError(400, f'time: missing unit in duration "{text}"')
        raise HTTPError(400, f'time: invalid duration "{text}"')
    sign = -1 if text.startswith("-") else 1
    return sign * sum(abs(float(n)) * _UNIT[u] for n, u in parts)


class FakeNode:
    """The node: a simulator, a fault switch, and WSGI handlers."""

    def __init__(self, models: Iterable[str], profile: Profile, version: str = "0.12.6",
                 fault: str = "none", flap_period: float = 2.0) -> None:
        self.sim = Simulator(list(models), profile)
        self.version = version
        self.fault = fault
        self.fault_count: int | None = None  # fail only this many more requests
        self.flap_period = flap_period
        self.routes: dict[tuple[str, str], Callable[..., Any]] = {
            ("POST", "/api/generate"): self.generate, ("POST", "/api/chat"): self.chat,
            ("POST", "/api/embed"): self.embed, ("POST", "/api/embeddings"): self.embeddings,
            ("POST", "/api/show"): self.show, ("POST", "/api/push"): self.push,
            ("POST", "/api/pull"): self.pull, ("DELETE", "/api/delete"): self.delete,
            ("POST", "/api/copy"): self.copy, ("POST", "/api/create"): self.create,
            ("GET", "/api/tags"): self.tags, ("GET", "/api/ps"): self.ps,
            ("GET", "/api/version"): self.version_reply, ("GET", "/"): self.root,
            ("POST", "/v1/chat/completions"): self.v1_chat,
            ("POST", "/v1/completions"): self.v1_completions,
            ("POST", "/v1/embeddings"): self.v1_embeddings, ("GET", "/v1/models"): self.v1_models,
            ("GET", "/_fake/stats"): self.stats_reply,
            ("POST", "/_fake/fault"): self.fault_reply,
        }
        self.known_paths = {p for _, p in self.routes}
        self.blobs: set[str] = set()

    @property
    def stats(self) -> Any:
        return self.sim.stats

    def set_fault(self, mode: str, count: int | None = None) -> None:
        if mode not in FAULTS:
            raise ValueError(f"unknown fault {mode!r}; valid: {', '.join(FAULTS)}")
        self.fault = mode
        self.fault_count = count

    def _active_fault(self, path: str) -> str:
        mode = self.fault
        if mode == "none" or path.startswith("/_fake"):
            return "none"
        if mode == "flap":
            return "reset" if int(time.time() / self.flap_period) % 2 else "none"
        if path not in INFERENCE:
            return "none"
        if self.fault_count is not None:
            if self.fault_count <= 0:
                return "none"
            self.fault_count -= 1
        return mode

    # --- WSGI ---------------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO", "/")
        stats = self.sim.stats
        stats.requests += 1
        stats.by_path[path] = stats.by_path.get(path, 0) + 1
        stats.hosts.add(environ.get("HTTP_HOST", ""))
        lookup = "GET" if method == "HEAD" else method
        handler = self.routes.get((lookup, path))
        if handler is None and lookup == "GET" and path.startswith("/v1/models/"):
            handler = self.v1_model
        if handler is None and path.startswith("/api/blobs/") and method in ("HEAD", "POST"):
            return self.blob(environ, start_response, method, path[len("/api/blobs/"):])
        if handler is None:
            if path in self.known_paths:
                return _text(start_response, 405, "405 method not allowed")
            return _text(start_response, 404, "404 page not found")
        fault = self._active_fault(path)
        if fault == "reset":
            abort(environ.get("ollama_lb.socket"))
            return []
        if fault == "hang":
            gevent.sleep(3600)
        if fault == "500":
            return _json(start_response, 500, {"error": "llama runner process has terminated: "
                                               "exit status 2"})
        if fault == "503":
            return _json(start_response, 503, {"error": BUSY})
        environ["ollama_lb.fault"] = fault
        try:
            body = _read_json(environ) if method in ("POST", "DELETE") else {}
            stats.last_body = environ.get("ollama_lb.body", b"")
            return handler(environ, start_response, body)
        except HTTPError as exc:
            if path.startswith("/v1/"):
                return _json(start_response, exc.status, openai_error(exc.status, exc.message))
            return _json(start_response, exc.status, {"error": exc.message})
        except ServerBusy:
            return _json(start_response, 503, {"error": BUSY})

    # --- helpers ------------------------------------------------------------------------------

    def _model(self, body: dict[str, Any], missing_404: bool, style: str = "single",
               fallback_name: bool = False) -> str:
        model = body.get("model") or (body.get("name") if fallback_name else None) or ""
        if not isinstance(model, str):
            raise HTTPError(400, "json: cannot unmarshal number into Go struct field "
                                 "Request.model of type string")
        if not model:
            if missing_404:
                raise HTTPError(404, "model '' not found")
            raise HTTPError(400, "model is required")
        if not self.sim.has(model):
            if style == "pull":
                raise HTTPError(404, f'model "{model}" not found, try pulling it first')
            raise HTTPError(404, f"model '{model}' not found")
        return model

    def _infer(self, model: str, text: str, keep_alive: Any, options: dict[str, Any]
               ) -> tuple[Loaded, dict[str, Any], int]:
        """Load, take a slot, prefill. Returns the runner, timing so far, tokens to make."""
        start = time.monotonic()
        runner, load_s = self.sim.ensure_loaded(model, parse_keep_alive(keep_alive))
        self.sim.begin(runner)
        self._enter()
        n_prompt, prefill_s = self.sim.prefill(text)
        n = options.get("num_predict") if isinstance(options, dict) else None
        n = int(n) if isinstance(n, int) and n >= 0 else self.sim.profile.tokens
        timing = {"start": start, "load_duration": int(load_s * 1e9),
                  "prompt_eval_count": n_prompt, "prompt_eval_duration": int(prefill_s * 1e9)}
        return runner, timing, n

    def _enter(self) -> None:
        s = self.sim.stats
        s.active += 1
        s.max_active = max(s.max_active, s.active)

    def _leave(self, runner: Loaded) -> None:
        self.sim.stats.active -= 1
        self.sim.end(runner)

    @staticmethod
    def _final_metrics(timing: dict[str, Any], count: int, eval_s: float) -> dict[str, Any]:
        return {"total_duration": int((time.monotonic() - timing["start"]) * 1e9),
                "load_duration": timing["load_duration"],
                "prompt_eval_count": timing["prompt_eval_count"],
                "prompt_eval_duration": timing["prompt_eval_duration"],
                "eval_count": count, "eval_duration": max(1, int(eval_s * 1e9))}

    def _tokens(self, environ: dict[str, Any], text: str, n: int) -> Iterator[str]:
        """The decode loop, with the mid-stream faults."""
        fault = environ.get("ollama_lb.fault", "none")
        for i, tok in enumerate(self.sim.decode(text, n)):
            if i == 2 and fault == "reset-mid-stream":
                abort(environ.get("ollama_lb.socket"))
                raise StreamReset()
            if i == 2 and fault == "stall-mid-stream":
                gevent.sleep(3600)
            if i == 2 and fault == "error-mid-stream":
                raise MidStreamError("an error was encountered while running the model")
            yield tok

    def _stream(self, environ: dict[str, Any], start_response: StartResponse, ctype: str,
                lines: Iterator[bytes], runner: Loaded) -> Iterator[bytes]:
        """Send lines as they are made; count disconnects; always give the slot back."""
        stats = self.sim.stats
        start_response("200 OK", [("Content-Type", ctype)])
        stats.streams_open += 1
        finished = False
        try:
            yield from lines
            finished = True
        except MidStreamError as exc:
            finished = True
            yield json.dumps({"error": str(exc)}).encode() + b"\n"
        except StreamReset:
            finished = True
        finally:
            stats.streams_open -= 1
            if not finished:
                stats.disconnects += 1
            self._leave(runner)

    # --- native endpoints ---------------------------------------------------------------------

    def root(self, environ: dict[str, Any], start_response: StartResponse, _: Any) -> list[bytes]:
        return _text(start_response, 200, "Ollama is running")

    def version_reply(self, environ: dict[str, Any], sr: StartResponse, _: Any) -> list[bytes]:
        return _json(sr, 200, {"version": self.version})

    def generate(self, environ: dict[str, Any], sr: StartResponse, body: dict[str, Any]
                 ) -> Iterable[bytes]:
        model = self._model(body, missing_404=True)
        if self.sim.is_embedding(model):
            raise HTTPError(400, f'"{model}" does not support generate')
        text = str(body.get("system") or "") + str(body.get("prompt") or "")
        if not body.get("prompt"):
            return self._load_or_unload(sr, body, model, {"response": ""})
        runner, timing, n = self._infer(model, text, body.get("keep_alive"),
                                        body.get("options") or {})
        context = list(range(1, timing["prompt_eval_count"] + n + 1))

        def chunk(tok: str) -> dict[str, Any]:
            return {"model": model, "created_at": now_rfc3339(), "response": tok, "done": False}

        def final(text_out: str, eval_s: float, count: int) -> dict[str, Any]:
            return {"model": model, "created_at": now_rfc3339(), "response": text_out,
                    "done": True, "done_reason": "length" if "num_predict" in (
                        body.get("options") or {}) else "stop", "context": context,
                    **self._final_metrics(timing, count, eval_s)}

        return self._reply(environ, sr, body, runner, text, n, chunk, final)

    def chat(self, environ: dict[str, Any], sr: StartResponse, body: dict[str, Any]
             ) -> Iterable[bytes]:
        model = self._model(body, missing_404=False)
        messages = body.get("messages") or []
        if not isinstance(messages, list):
            raise HTTPError(400, "json: cannot unmarshal into Go struct field "
                                 "ChatRequest.messages of type []api.Message")
        if not messages:
            return self._load_or_unload(sr, body, model,
                                        {"message": {"role": "assistant", "content": ""}})
        text = "\n".join(str(m.get("content") or "") for m in messages if isinstance(m, dict))
        runner, timing, n = self._infer(model, text, body.get("keep_alive"),
                                        body.get("options") or {})

        def chunk(tok: str) -> dict[str, Any]:
            return {"model": model, "created_at": now_rfc3339(),
                    "message": {"role": "assistant", "content": tok}, "done": False}

        def final(text_out: str, eval_s: float, count: int) -> dict[str, Any]:
            return {"model": model, "created_at": now_rfc3339(),
                    "message": {"role": "assistant", "content": text_out}, "done": True,
                    "done_reason": "stop", **self._final_metrics(timing, count, eval_s)}

        return self._reply(environ, sr, body, runner, text, n, chunk, final)

    def _reply(self, environ: dict[str, Any], sr: StartResponse, body: dict[str, Any],
               runner: Loaded, text: str, n: int, chunk: Callable[[str], dict[str, Any]],
               final: Callable[[str, float, int], dict[str, Any]]) -> Iterable[bytes]:
        stream = body.get("stream", True) is not False
        if stream:
            def lines() -> Iterator[bytes]:
                t0 = time.monotonic()
                count = 0
                for tok in self._tokens(environ, text, n):
                    count += 1
                    yield json.dumps(chunk(tok)).encode() + b"\n"
                if environ.get("ollama_lb.fault") == "malformed":
                    yield b'{"model": "broken\n'
                yield json.dumps(final("", time.monotonic() - t0, count)).encode() + b"\n"
            return self._stream(environ, sr, "application/x-ndjson", lines(), runner)
        try:
            t0 = time.monotonic()
            toks = list(self._tokens(environ, text, n))
        except MidStreamError as exc:
            self._leave(runner)
            raise HTTPError(500, str(exc)) from None
        except BaseException:
            self._leave(runner)
            raise
        self._leave(runner)
        if environ.get("ollama_lb.fault") == "malformed":
            return _raw(sr, 200, JSON, b'{"model": "x", "response": "trunc')
        return _json(sr, 200, final("".join(toks), time.monotonic() - t0, len(toks)))

    def _load_or_unload(self, sr: StartResponse, body: dict[str, Any], model: str,
                        extra: dict[str, Any]) -> list[bytes]:
        keep = parse_keep_alive(body.get("keep_alive"))
        if keep == 0:
            self.sim.unload(model)
            reason = "unload"
        else:
            self.sim.ensure_loaded(model, keep)
            reason = "load"
        return _json(sr, 200, {"model": model, "created_at": now_rfc3339(), **extra,
                               "done_reason": reason, "done": True})

    def embed(self, environ: dict[str, Any], sr: StartResponse, body: dict[str, Any]
              ) -> list[bytes]:
        model = self._model(body, missing_404=True, style="pull")
        inputs = body.get("input", "")
        if isinstance(inputs, str):
            inputs = [inputs] if inputs else []
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            raise HTTPError(400, "invalid input type")
        vectors = self._embed_many(model, inputs, body)
        reply: dict[str, Any] = {"model": model, "embeddings": vectors}
        if inputs:
            reply.update(total_duration=14143917, load_duration=1019500,
                         prompt_eval_count=sum(max(1, len(i) // 4) for i in inputs))
        return _json(sr, 200, reply)

    def _embed_many(self, model: str, inputs: list[str], body: dict[str, Any]
                    ) -> list[list[float]]:
        runner, _ = self.sim.ensure_loaded(model, parse_keep_alive(body.get("keep_alive")))
        self.sim.begin(runner)
        self._enter()
        try:
            if self.sim.profile.embed_s and inputs:
                gevent.sleep(self.sim.profile.embed_s)
            dims = body.get("dimensions") if isinstance(body.get("dimensions"), int) else 16
            return [embedding_for(i, dims) for i in inputs]
        finally:
            self._leave(runner)

    def embeddings(self, environ: dict[str, Any], sr: StartResponse, body: dict[str, Any]
                   ) -> list[bytes]:
        model = self._model(body, missing_404=False, style="pull")
        prompt = body.get("prompt") or ""
        if not prompt:
            self.sim.ensure_loaded(model, None)
            return _json(sr, 200, {"embedding": []})
        self._embed_many(model, [], body)
        return _json(sr, 200, {"embedding": embedding_for(prompt, 16, normalise=False)})

    def _details(self, model: str) -> dict[str, Any]:
        family = display(model).split(":")[0].split("/")[-1]
        return {"parent_model": "", "format": "gguf", "family": family, "families": [family],
                "parameter_size": "3.2B", "quantization_level": "Q4_K_M"}

    def _entry(self, key: str) -> dict[str, Any]:
        name = self.sim.installed[key]
        import hashlib
        digest = hashlib.sha256(key.encode()).hexdigest()
        return {"name": name, "model": name, "modified_at": local_time(self.sim.modified[key]),
                "size": 2019393189, "digest": digest, "details": self._details(name)}

    def tags(self, environ: dict[str, Any], sr: StartResponse, _: Any) -> list[bytes]:
        models = [self._entry(k) for k in sorted(self.sim.installed,
                                                 key=lambda k: -self.sim.modified[k])]
        return _json(sr, 200, {"models": models})

    def ps(self, environ: dict[str, Any], sr: StartResponse, _: Any) -> list[bytes]:
        self.sim.expire()
        out = []
        for key, runner in self.sim.loaded.items():
            entry = self._entry(key)
            entry.pop("modified_at")
            expires = time.time() + runner.keep_alive_s if runner.busy else runner.expires_at
            entry.update(expires_at=local_time(expires), size_vram=entry["size"],
                         context_length=4096)
            out.append(entry)
        out.sort(key=lambda e: e["expires_at"], reverse=True)
        return _json(sr, 200, {"models": out})

    def show(self, environ: dict[str, Any], sr: StartResponse, body: dict[str, Any]
             ) -> list[bytes]:
        model = self._model(body, missing_404=False, fallback_name=True)
        caps = ["embedding"] if self.sim.is_embedding(model) else ["completion"]
        return _json(sr, 200, {
            "license": "", "modelfile": f"FROM {display(model)}\n",
            "parameters": "stop \"<|eot_id|>\"", "template": "{{ .Prompt }}",
            "details": self._details(model),
            "model_info": {"general.architecture": "llama", "general.parameter_count": 3212749888,
                           "llama.context_length": 131072},
            "capabilities": caps,
            "modified_at": local_time(self.sim.modified[canonical(model)])})

    def push(self, environ: dict[str, Any], sr: StartResponse, body: dict[str, Any]
             ) -> Iterable[bytes]:
        self._model(body, missing_404=False, fallback_name=True)
        steps = [{"status": "retrieving manifest"},
                 {"status": "pushing manifest"}, {"status": "success"}]
        return self._progress(sr, body, steps)

    def pull(self, environ: dict[str, Any], sr: StartResponse, body: dict[str, Any]
             ) -> Iterable[bytes]:
        model = body.get("model") or body.get("name") or ""
        if not model:
            raise HTTPError(400, "invalid model name")
        key = canonical(model)
        self.sim.installed.setdefault(key, display(model))
        self.sim.modified.setdefault(key, time.time())
        steps = [{"status": "pulling manifest"}, {"status": "verifying sha256 digest"},
                 {"status": "writing manifest"}, {"status": "success"}]
        return self._progress(sr, body, steps)

    def _progress(self, sr: StartResponse, body: dict[str, Any], steps: list[dict[str, Any]]
                  ) -> Iterable[bytes]:
        if body.get("stream", True) is False:
            return _json(sr, 200, steps[-1])
        sr("200 OK", [("Content-Type", "application/x-ndjson")])
        return [json.dumps(s).encode() + b"\n" for s in steps]

    def delete(self, environ: dict[str, Any], sr: StartResponse, body: dict[str, Any]
               ) -> list[bytes]:
        model = self._model(body, missing_404=False, fallback_name=True)
        self.sim.installed.pop(canonical(model), None)
        self.sim.unload(model)
        return _raw(sr, 200, JSON, b"")

    def copy(self, environ: dict[str, Any], sr: StartResponse, body: dict[str, Any]
             ) -> list[bytes]:
        src, dst = body.get("source") or "", body.get("destination") or ""
        if not self.sim.has(src):
            raise HTTPError(404, f'model "{src}" not found')
        if not dst:
            raise HTTPError(400, "invalid model name")
        self.sim.installed[canonical(dst)] = display(dst)
        self.sim.modified[canonical(dst)] = time.time()
        return _raw(sr, 200, JSON, b"")

    def create(self, environ: dict[str, Any], sr: StartResponse, body: dict[str, Any]
               ) -> Iterable[bytes]:
        model = body.get("model") or body.get("name") or ""
        source = body.get("from")
        if not model:
            raise HTTPError(400, "model is required")
        if source and not self.sim.has(str(source)):
            raise HTTPError(404, f"model '{source}' not found")
        self.sim.installed[canonical(model)] = display(model)
        self.sim.modified[canonical(model)] = time.time()
        steps = [{"status": "using existing layer"}, {"status": "writing manifest"},
                 {"status": "success"}]
        return self._progress(sr, body, steps)

    def blob(self, environ: dict[str, Any], sr: StartResponse, method: str, digest: str
             ) -> list[bytes]:
        import hashlib
        if not re.fullmatch(r"sha256[:-][0-9a-f]{64}", digest):
            return _json(sr, 400, {"error": "invalid digest format"})
        if method == "HEAD":
            return _raw(sr, 200 if digest in self.blobs else 404, JSON, b"")
        length = int(environ.get("CONTENT_LENGTH") or 0)
        data = environ["wsgi.input"].read(length) if length else environ["wsgi.input"].read()
        got = "sha256:" + hashlib.sha256(data).hexdigest()
        if got.replace(":", "-") != digest.replace(":", "-"):
            return _json(sr, 400, {"error": f'digest mismatch, expected "{digest}", got '
                                   f'"{got}"'})
        existed = digest in self.blobs
        self.blobs.add(digest)
        return _raw(sr, 200 if existed else 201, JSON, b"")

    # --- OpenAI-compatible endpoints ----------------------------------------------------------

    def v1_chat(self, environ: dict[str, Any], sr: StartResponse, body: dict[str, Any]
                ) -> Iterable[bytes]:
        model = self._model(body, missing_404=False)
        messages = body.get("messages")
        if not messages:
            raise HTTPError(400, "[] is too short - 'messages'")
        text = "\n".join(_content_text(m.get("content")) for m in messages
                         if isinstance(m, dict))
        opts = {"num_predict": body["max_tokens"]} if isinstance(body.get("max_tokens"),
                                                                 int) else {}
        runner, timing, n = self._infer(model, text, None, opts)
        cid = f"chatcmpl-{random.randrange(999)}"
        created = int(time.time())
        reason = "length" if opts else "stop"

        def frame(delta: dict[str, Any], finish: str | None) -> bytes:
            obj = {"id": cid, "object": "chat.completion.chunk", "created": created,
                   "model": model, "system_fingerprint": "fp_ollama",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        if body.get("stream"):
            def lines() -> Iterator[bytes]:
                count = 0
                for i, tok in enumerate(self._tokens(environ, text, n)):
                    count += 1
                    delta = {"role": "assistant", "content": tok} if i == 0 else {"content": tok}
                    yield frame(delta, None)
                yield frame({}, reason)
                if (body.get("stream_options") or {}).get("include_usage"):
                    usage = _usage(timing["prompt_eval_count"], count)
                    yield b"data: " + json.dumps({
                        "id": cid, "object": "chat.completion.chunk", "created": created,
                        "model": model, "system_fingerprint": "fp_ollama", "choices": [],
                        "usage": usage}).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
            return self._stream(environ, sr, "text/event-stream", lines(), runner)
        try:
            toks = list(self._tokens(environ, text, n))
        finally:
            self._leave(runner)
        return _json(sr, 200, {
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": "fp_ollama",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(toks)},
                         "finish_reason": reason}],
            "usage": _usage(timing["prompt_eval_count"], len(toks))})

    def v1_completions(self, environ: dict[str, Any], sr: StartResponse, body: dict[str, Any]
                       ) -> Iterable[bytes]:
        model = self._model(body, missing_404=True)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise HTTPError(400, "invalid prompt")
        opts = {"num_predict": body["max_tokens"]} if isinstance(body.get("max_tokens"),
                                                                 int) else {}
        runner, timing, n = self._infer(model, prompt, None, opts)
        cid, created = f"cmpl-{random.randrange(999)}", int(time.time())

        def obj(text: str, finish: str | None) -> dict[str, Any]:
            return {"id": cid, "object": "text_completion", "created": created, "model": model,
                    "system_fingerprint": "fp_ollama",
                    "choices": [{"text": text, "index": 0, "finish_reason": finish}]}

        if body.get("stream"):
            def lines() -> Iterator[bytes]:
                toks = list(self._tokens(environ, prompt, n)) or [""]
                for i, tok in enumerate(toks):
                    finish = ("length" if opts else "stop") if i == len(toks) - 1 else None
                    yield b"data: " + json.dumps(obj(tok, finish)).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"
            return self._stream(environ, sr, "text/event-stream", lines(), runner)
        try:
            toks = list(self._tokens(environ, prompt, n))
        finally:
            self._leave(runner)
        reply = obj("".join(toks), "length" if opts else "stop")
        reply["usage"] = _usage(timing["prompt_eval_count"], len(toks))
        return _json(sr, 200, reply)

    def v1_embeddings(self, environ: dict[str, Any], sr: StartResponse, body: dict[str, Any]
                      ) -> list[bytes]:
        model = self._model(body, missing_404=True, style="pull")
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not inputs or not isinstance(inputs, list):
            raise HTTPError(400, "invalid input")
        vectors = self._embed_many(model, [str(i) for i in inputs], body)
        tokens = sum(max(1, len(str(i)) // 4) for i in inputs)
        return _json(sr, 200, {"object": "list", "model": model,
                               "data": [{"object": "embedding", "embedding": v, "index": i}
                                        for i, v in enumerate(vectors)],
                               "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    def v1_models(self, environ: dict[str, Any], sr: StartResponse, _: Any) -> list[bytes]:
        data = [{"id": name, "object": "model", "created": int(self.sim.modified[k]),
                 "owned_by": namespace(name)} for k, name in self.sim.installed.items()]
        return _json(sr, 200, {"object": "list", "data": data})

    def v1_model(self, environ: dict[str, Any], sr: StartResponse, _: Any) -> list[bytes]:
        name = environ["PATH_INFO"][len("/v1/models/"):]
        if not self.sim.has(name):
            return _json(sr, 404, openai_error(404, f"model '{name}' not found"))
        return _json(sr, 200, {"id": name, "object": "model",
                               "created": int(self.sim.modified[canonical(name)]),
                               "owned_by": namespace(name)})

    # --- test control -------------------------------------------------------------------------

    def stats_reply(self, environ: dict[str, Any], sr: StartResponse, _: Any) -> list[bytes]:
        data = self.sim.stats.as_dict()
        data["loaded"] = sorted(r.name for r in self.sim.loaded.values())
        data["fault"] = self.fault
        return _json(sr, 200, data)

    def fault_reply(self, environ: dict[str, Any], sr: StartResponse, body: dict[str, Any]
                    ) -> list[bytes]:
        try:
            self.set_fault(str(body.get("mode", "none")), body.get("count"))
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from None
        return _json(sr, 200, {"fault": self.fault})


class MidStreamError(Exception):
    """The model failed after the stream started."""


class StreamReset(Exception):
    """The connection was reset mid-stream by the reset-mid-stream fault."""


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def openai_error(status: int, message: str) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def _read_json(environ: dict[str, Any]) -> dict[str, Any]:
    length = int(environ.get("CONTENT_LENGTH") or 0)
    raw = environ["wsgi.input"].read(length) if length else environ["wsgi.input"].read()
    environ["ollama_lb.body"] = raw
    if not raw.strip():
        raise HTTPError(400, "missing request body")
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise HTTPError(400, f"invalid character looking for beginning of value: {exc}"
                        ) from None
    if not isinstance(data, dict):
        raise HTTPError(400, "json: cannot unmarshal array into Go value of type api.Request")
    return data


def _raw(sr: StartResponse, status: int, ctype: str, body: bytes) -> list[bytes]:
    sr(f"{status} {STATUS_TEXT.get(status, 'Error')}",
       [("Content-Type", ctype), ("Content-Length", str(len(body)))])
    return [body]


def _json(sr: StartResponse, status: int, obj: Any) -> list[bytes]:
    return _raw(sr, status, JSON, json.dumps(obj).encode())


def _text(sr: StartResponse, status: int, text: str) -> list[bytes]:
    return _raw(sr, status, "text/plain; charset=utf-8", text.encode())
