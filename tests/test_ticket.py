"""The ticket a caller waits on: woken once per outcome, never where it no longer waits."""

from __future__ import annotations

import time
import traceback

import gevent
import pytest
from gevent.event import Event

from pipeline.errors import ErrorCode, PipelineError
from pipeline.request import InferenceRequest, InferenceResponse, Ticket

REPLY = InferenceResponse(200, "application/json", b"{}", "n0", 1)


class Left(Exception):
    """Thrown into a caller parked in ``result()``, as a killed handler greenlet sees it."""


def ticket() -> Ticket:
    return Ticket(InferenceRequest.of_prompt("m", "hi"), time.monotonic() + 30)


def outcome(t: Ticket) -> object:
    """What ``result()`` returned or raised (a greenlet that dies of an error fails the test)."""
    try:
        return t.result()
    except PipelineError as err:
        return err


def test_a_reply_from_another_greenlet_wakes_the_caller():
    t = ticket()
    caller = gevent.spawn(t.result)
    gevent.sleep(0)  # the caller is parked in result()
    assert t.waiting and not t.done()
    assert t.set(REPLY)
    assert caller.get(timeout=5) is REPLY
    assert not t.set(REPLY)  # resolved once


def test_a_reply_that_lands_as_the_caller_leaves_does_not_wake_it_where_it_waits_next():
    """The reply's wake-up is queued in the hub right behind what makes the caller leave; the
    caller then waits on something else, which that stale wake-up must not end."""
    t = ticket()
    waited: list[bool] = []

    def caller() -> None:
        try:
            t.result()
        except Left:
            waited.append(Event().wait(0.05))  # raises InvalidSwitchError if woken by t

    g = gevent.spawn(caller)
    gevent.sleep(0)
    assert t.waiting
    g.kill(Left, block=False)  # queued first
    t.set(REPLY)  # its wake-up queued second
    g.join(timeout=5)
    assert g.dead and g.exception is None and waited == [False]


def test_a_handed_call_runs_in_the_caller_and_its_reply_is_returned():
    t = ticket()
    ran_in: list[object] = []

    def run(tk: Ticket, lease: object) -> None:
        ran_in.append(gevent.getcurrent())
        tk.set(REPLY)

    caller = gevent.spawn(t.result)
    gevent.sleep(0)
    assert t.hand(run, object(), lambda tk, lease: None)
    assert caller.get(timeout=5) is REPLY and ran_in == [caller]


def test_an_abandoned_caller_gets_cancelled_and_a_timed_out_one_timeout():
    gone = ticket()
    caller = gevent.spawn(outcome, gone)
    gevent.sleep(0)
    gone.abandon()
    error = caller.get(timeout=5)
    assert isinstance(error, PipelineError) and error.code == ErrorCode.CANCELLED
    assert gone.done()

    late = ticket()
    with pytest.raises(PipelineError) as err:
        late.result(timeout=0.01)
    assert err.value.code == ErrorCode.TIMEOUT and late.done()
    assert not late.set(REPLY)  # a reply after the timeout changes nothing


def test_an_error_is_raised_without_the_frames_it_was_first_raised_in():
    """The error a node call raised is stored on the ticket; raising it from ``result()``
    must not carry that call's frames (and their locals: leases, connections) along, nor
    grow with every call, as gevent's AsyncResult never did."""
    t = ticket()

    def node_call() -> None:
        raise PipelineError(ErrorCode.TIMEOUT, "node timed out")

    try:
        node_call()
    except PipelineError as err:
        t.fail(err)
    for _ in range(2):
        with pytest.raises(PipelineError) as info:
            t.result()
        names = [f.name for f in traceback.extract_tb(info.value.__traceback__)]
        assert "node_call" not in names and names.count("result") == 1, names
