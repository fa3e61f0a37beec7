"""The ring's event: one reusable record per ring position.

Declared with one comment per field, as gevent's pywsgi declares per-request state. Stages
write facts here; the caller never reads a slot (it reads its Ticket), so a slot is reset and
reused as soon as the final stage releases it.
"""

from __future__ import annotations

from typing import Any

from pipeline.endpoints import Endpoint
from pipeline.errors import PipelineError
from pipeline.lease import Lease
from pipeline.node import Node
from pipeline.request import InferenceRequest, Ticket


class Slot:
    __slots__ = ("endpoint", "error", "fanout", "handed_off", "lease", "model", "model_raw",
                 "node", "payload", "queued", "request", "stream", "ticket")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        #: the request being carried (plain data)
        self.request: InferenceRequest | None = None
        #: the caller's handle, resolved by completion (errors) or dispatch (replies)
        self.ticket: Ticket | None = None
        #: facts about the path
        self.endpoint: Endpoint | None = None
        #: the parsed JSON body (validation)
        self.payload: dict[str, Any] | None = None
        #: the model as the client wrote it, and its canonical form
        self.model_raw: str = ""
        self.model: str = ""
        #: whether the reply streams
        self.stream: bool = False
        #: the node picked by selection
        self.node: Node | None = None
        #: the lease on a node slot taken by capacity, handed to dispatch
        self.lease: Lease | None = None
        #: True once the request waits for node capacity outside the ring
        self.queued: bool = False
        #: True once dispatch has started the call: the dispatcher answers the request now
        self.handed_off: bool = False
        #: True for an unload (keep_alive 0, nothing to generate): sent to every node
        self.fanout: bool = False
        #: the first error any stage recorded; later stages skip the slot
        self.error: PipelineError | None = None
