"""The inference path every API shares: find the model, load, take a slot, prefill, decode.

Native chat, OpenAI chat, the Responses API and Anthropic's Messages API all translate around
this one path, as Ollama's own /v1 layers translate around its chat handler, so one timing
model (cold load, time to first token, tokens/s, parallel slots) holds for every API.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent

from app.fakenode.sim import Loaded, Simulator, embedding_for
from app.fakenode.sockets import peer_closed, reset
from app.fakenode.wire import Call, HTTPError, ndjson_line, parse_keep_alive

MODEL_FAILED = "an error was encountered while running the model"


class MidStreamError(Exception):
    """The model failed after the stream started."""


class StreamReset(Exception):
    """The connection was reset mid-stream by the reset-mid-stream fault."""


def native_error_line(message: str) -> bytes:
    """What Ollama writes when a stream fails: one line holding only ``error``."""
    return ndjson_line({"error": message})


class Engine:
    """Inference on a simulator, with the mid-stream faults and the node's counters."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    def model(self, body: dict[str, Any], missing_404: bool, style: str = "single",
              fallback_name: bool = False) -> str:
        """The requested model, checked in the calling endpoint's words."""
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

    def infer(self, model: str, text: str, keep_alive: Any, options: dict[str, Any]
              ) -> tuple[Loaded, dict[str, Any], int]:
        """Load, take a slot, prefill. Returns the runner, timing so far, tokens to make."""
        start = time.monotonic()
        runner, load_s = self.sim.ensure_loaded(model, parse_keep_alive(keep_alive))
        self.sim.begin(runner)
        self.enter()
        n_prompt, prefill_s = self.sim.prefill(text)
        n = options.get("num_predict") if isinstance(options, dict) else None
        n = int(n) if isinstance(n, int) and n >= 0 else self.sim.profile.tokens
        timing = {"start": start, "load_duration": int(load_s * 1e9),
                  "prompt_eval_count": n_prompt, "prompt_eval_duration": int(prefill_s * 1e9)}
        return runner, timing, n

    def reply_length(self, limit: Any) -> tuple[int, bool]:
        """Tokens a reply gets under a client's token limit, and whether the limit cut it.

        The model's own reply is ``profile.tokens`` long; a smaller limit truncates it. Used
        where the limit is mandatory or large (Anthropic's ``max_tokens``), so that a client
        asking for up to 1024 tokens gets a natural-length answer, as from a real model.
        """
        natural = self.sim.profile.tokens
        if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit <= natural:
            return limit, True
        return natural, False

    def enter(self) -> None:
        s = self.sim.stats
        s.active += 1
        if s.active > s.max_active:  # when each new peak came: to set it beside logs
            s.max_active = s.active
            s.peaks.append((time.time(), s.active))

    def leave(self, runner: Loaded) -> None:
        self.sim.stats.active -= 1
        self.sim.end(runner)

    @staticmethod
    def final_metrics(timing: dict[str, Any], count: int, eval_s: float) -> dict[str, Any]:
        return {"total_duration": int((time.monotonic() - timing["start"]) * 1e9),
                "load_duration": timing["load_duration"],
                "prompt_eval_count": timing["prompt_eval_count"],
                "prompt_eval_duration": timing["prompt_eval_duration"],
                "eval_count": count, "eval_duration": max(1, int(eval_s * 1e9))}

    def tokens(self, call: Call, text: str, n: int) -> Iterator[str]:
        """The decode loop, with the mid-stream faults striking at the third token."""
        fault = call.fault
        for i, tok in enumerate(self.sim.decode(text, n)):
            if i == 2 and fault == "reset-mid-stream":
                reset(call.socket)
                raise StreamReset()
            if i == 2 and fault == "stall-mid-stream":
                gevent.sleep(3600)
            if i == 2 and fault == "error-mid-stream":
                raise MidStreamError(MODEL_FAILED)
            yield tok

    def collect(self, call: Call, text: str, n: int, runner: Loaded) -> list[str]:
        """A whole reply for ``stream:false``; the slot is given back whatever happens.

        Nothing is written until the end, so the client leaving is watched for between
        tokens: Ollama cancels the generation and frees the slot when its client goes.
        """
        watch = bool(self.sim.profile.decode_tps)  # instant decoding has nothing to cancel
        out: list[str] = []
        try:
            for tok in self.tokens(call, text, n):
                out.append(tok)
                if watch and peer_closed(call.socket):
                    self.sim.stats.disconnects += 1
                    raise HTTPError(499, "request canceled")
            return out
        except MidStreamError as exc:
            raise HTTPError(500, str(exc)) from None
        finally:
            self.leave(runner)

    def stream(self, call: Call, ctype: str, lines: Iterator[bytes], runner: Loaded,
               error_frame: Callable[[str], bytes] = native_error_line,
               headers: list[tuple[str, str]] | None = None) -> Iterator[bytes]:
        """Send frames as they are made; count disconnects; always give the slot back.

        ``error_frame`` renders a mid-stream failure in the API's stream format (b"" sends
        nothing: the stream just ends, as Ollama's translated streams do).
        """
        stats = self.sim.stats
        call.start_response("200 OK", [("Content-Type", ctype), *(headers or [])])
        stats.streams_open += 1
        finished = False
        try:
            yield from lines
            finished = True
        except MidStreamError as exc:
            finished = True
            frame = error_frame(str(exc))
            if frame:
                yield frame
        except StreamReset:
            finished = True
        finally:
            stats.streams_open -= 1
            if not finished:
                stats.disconnects += 1
            self.leave(runner)

    def embed_many(self, model: str, inputs: list[str], body: dict[str, Any]
                   ) -> list[list[float]]:
        """Embeddings take the same load and slot path as generation."""
        runner, _ = self.sim.ensure_loaded(model, parse_keep_alive(body.get("keep_alive")))
        self.sim.begin(runner)
        self.enter()
        try:
            if self.sim.profile.embed_s and inputs:
                gevent.sleep(self.sim.profile.embed_s)
            dims = body.get("dimensions") if isinstance(body.get("dimensions"), int) else 16
            return [embedding_for(i, dims) for i in inputs]
        finally:
            self.leave(runner)
