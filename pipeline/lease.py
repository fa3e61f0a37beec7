"""A lease: one request's hold on one unit of a node's concurrency cap.

Taking a lease (``Node.try_acquire``) counts the request on the node and takes a circuit
breaker permit (the half-open trial, when the node is on trial). A lease is given back exactly
once, from a ``finally`` (``NodeRegistry.release``); giving it back returns the node slot and,
unless the request recorded a verdict (``succeeded``/``failed``), the breaker permit, so that
neither a node slot nor a trial can stay out whatever way the request ends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.node import Node


class Lease:
    __slots__ = ("node", "permit", "released", "shared", "verdict")

    def __init__(self, node: Node, permit: int) -> None:
        self.node = node
        self.permit = permit  # the breaker's permit number
        self.verdict = False  # a success or failure was recorded for this request
        self.released = False
        self.shared: str | None = None  # the Redis lease id (sharedState), if any

    def succeeded(self, first_byte_s: float | None = None) -> None:
        self.verdict = True
        self.node.record_success(first_byte_s)

    def failed(self, reason: str) -> None:
        self.verdict = True
        self.node.record_failure(reason, live=True)

    def release(self) -> bool:
        """Give the slot (and an unjudged permit) back; False if already given back."""
        if self.released:
            return False
        self.released = True
        self.node.give_back(self)
        return True
