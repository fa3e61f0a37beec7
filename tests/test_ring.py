"""The ring: ordering, batching, wrap-around, rejection, errors, crashes, wait strategies."""

from __future__ import annotations

import gevent
import pytest

from pipeline.errors import RingFullError
from pipeline.ring import RingBuffer
from pipeline.wait import WAIT_STRATEGY_NAMES, create_wait_strategy
from pipeline.wiring import Disruptor
from tests.waiting import wait_until


class Event:
    __slots__ = ("error", "seen", "value")

    def __init__(self) -> None:
        self.value = -1
        self.seen: list[str] = []
        self.error: Exception | None = None


_made: list[Disruptor] = []


@pytest.fixture(autouse=True)
def halt_every_disruptor():
    """Stop the stage greenlets each test started, and check they really ended."""
    yield
    while _made:
        d = _made.pop()
        d.halt()
        gevent.joinall([s.greenlet for s in d.stages], timeout=2)
        assert all(s.greenlet.dead for s in d.stages)


def make(size: int = 8, strategy: str = "blocking", handlers=None):
    ring = RingBuffer(size, Event, create_wait_strategy(strategy))
    log: list[tuple[str, int]] = []

    def record(name):
        def handler(ev: Event) -> None:
            ev.seen.append(name)
            log.append((name, ev.value))
        return (name, handler)

    def on_error(ev: Event, stage: str, exc: Exception) -> None:
        ev.error = exc
        log.append((f"error:{stage}", ev.value))

    names = handlers or ["a", "b", "c"]
    d = Disruptor(ring, on_error).handle_events_with(record(names[0]))
    for n in names[1:]:
        d = d.then(record(n) if isinstance(n, str) else n)
    crashes: list[BaseException] = []
    d.start(lambda stage, exc: crashes.append(exc))
    _made.append(d)
    return ring, d, log, crashes


def publish(ring, value: int) -> None:
    seq = ring.try_claim()
    try:
        ring.get(seq).value = value
        ring.get(seq).seen = []
    finally:
        ring.publish(seq)


def drain(ring, d, timeout=2.0):
    with gevent.Timeout(timeout):
        while d.stages[-1].sequence.value < ring.cursor.value:
            gevent.sleep(0.001)


@pytest.mark.parametrize("strategy", WAIT_STRATEGY_NAMES)
def test_every_stage_sees_every_slot_in_order_after_the_stage_before(strategy):
    ring, d, log, _ = make(8, strategy)
    for i in range(50):
        publish_when_free(ring, i)
    drain(ring, d)
    d.halt()
    for name in "abc":
        assert [v for n, v in log if n == name] == list(range(50))
    position = {entry: i for i, entry in enumerate(log)}
    for i in range(50):
        assert position[("a", i)] < position[("b", i)] < position[("c", i)]


def publish_when_free(ring, value):
    while True:
        try:
            return publish(ring, value)
        except RingFullError:
            gevent.sleep(0.001)


def test_ring_wraps_around_many_times_with_reused_slots():
    ring, d, log, _ = make(4)
    slots = {id(ring.get(i)) for i in range(4)}
    for i in range(100):
        publish_when_free(ring, i)
    drain(ring, d)
    assert [v for n, v in log if n == "c"] == list(range(100))
    assert {id(ring.get(i)) for i in range(100)} == slots  # never recreated


def test_ring_full_rejects_at_once_without_blocking():
    gate = gevent.event.Event()
    entered = []

    def stuck(ev):
        entered.append(ev.value)
        gate.wait()

    ring, d, _log, _ = make(4, handlers=["a", ("stuck", stuck)])
    for i in range(4):
        publish(ring, i)
    # the stages run: "a" has handled every slot, "stuck" holds the first one
    assert wait_until(lambda: d.stages[0].processed == 4 and entered == [0], 2)
    with gevent.Timeout(0.5), pytest.raises(RingFullError):  # would hang if it blocked
        ring.try_claim()
    assert ring.remaining() == 0
    gate.set()
    drain(ring, d)
    assert ring.remaining() == 4
    publish(ring, 99)  # room again


def test_stage_processes_everything_available_in_one_batch():
    ring, d, _log, _ = make(64)
    for i in range(40):  # no yield between publishes
        publish(ring, i)
    drain(ring, d)
    assert d.stages[0].batches == 1 and d.stages[0].processed == 40


def test_an_exception_in_a_stage_is_recorded_on_the_slot_and_the_stage_goes_on():
    def fails_on_3(ev):
        if ev.value == 3:
            raise ValueError("bad slot")

    ring, d, log, crashes = make(8, handlers=["a", ("b", fails_on_3), "c"])
    for i in range(6):
        publish(ring, i)
    drain(ring, d)
    assert ("error:b", 3) in log
    assert [v for n, v in log if n == "c"] == list(range(6))
    assert not crashes and all(not s.greenlet.dead for s in d.stages)


@pytest.mark.parametrize("strategy", WAIT_STRATEGY_NAMES)
def test_a_stage_followed_by_two_hands_on_to_both_and_the_join_waits_for_both(strategy):
    """a -> (b1, b2) -> c: a stage that parks after releasing work switches to one parked
    follower and wakes the other; c runs a slot only once both have."""
    ring = RingBuffer(8, Event, create_wait_strategy(strategy))
    log: list[tuple[str, int]] = []

    def record(name):
        return (name, lambda ev: log.append((name, ev.value)))

    d = (Disruptor(ring, lambda ev, stage, exc: None).handle_events_with(record("a"))
         .then(record("b1"), record("b2")).then(record("c")))
    d.start(lambda stage, exc: None)
    _made.append(d)
    for i in range(40):
        publish_when_free(ring, i)
        if i % 3 == 0:
            gevent.sleep(0)  # let the stages park between some publishes
    drain(ring, d)
    position = {entry: n for n, entry in enumerate(log)}
    for i in range(40):
        assert position[("a", i)] < position[("b1", i)] < position[("c", i)]
        assert position[("b2", i)] < position[("c", i)]


def test_a_stage_stopped_while_it_holds_its_parked_follower_still_passes_it_on():
    """The first stage is stopped while its handler runs; it has claimed the parked
    second stage when it finishes, and must resume it rather than leave it asleep."""
    gate = gevent.event.Event()

    def slow(ev):
        gate.wait()

    ring = RingBuffer(8, Event, create_wait_strategy("blocking"))
    log: list[tuple[str, int]] = []
    d = (Disruptor(ring, lambda ev, stage, exc: None).handle_events_with(("slow", slow))
         .then(("b", lambda ev: log.append(("b", ev.value)))))
    d.start(lambda stage, exc: None)
    _made.append(d)
    publish(ring, 7)
    assert wait_until(lambda: d.stages[1].barrier.parked and d.stages[0].processed == 0, 2)
    d.stages[0].halt()  # only the first stage: the second must go on by itself
    gate.set()
    assert wait_until(lambda: d.stages[0].greenlet.dead, 2)
    assert wait_until(lambda: ("b", 7) in log, 2)  # the second stage was resumed and ran
    assert not d.stages[1].greenlet.dead


class StageBug(BaseException):
    """Escapes the per-slot ``except Exception``, as a bug in the loop itself would."""


def test_a_crashed_stage_greenlet_is_reported_not_a_silent_stall(greenlet_errors):
    _ring, d, _log, crashes = make(8)
    d.stages[1].greenlet.kill(StageBug("boom"), block=True)
    gevent.sleep(0)
    assert len(crashes) == 1 and isinstance(crashes[0], StageBug)
    assert d.stages[1].crashed is not None
    greenlet_errors.clear()  # this crash is the one under test


@pytest.mark.parametrize("strategy", WAIT_STRATEGY_NAMES)
def test_idle_stages_never_starve_other_greenlets(strategy):
    ring, d, _log, _ = make(8, strategy)
    ticks = []

    def ticker():
        for _ in range(20):
            ticks.append(1)
            gevent.sleep(0.001)

    g = gevent.spawn(ticker)
    with gevent.Timeout(2):
        g.join()
    assert len(ticks) == 20
    publish(ring, 1)
    drain(ring, d)
    d.halt()
    assert wait_until(lambda: all(s.greenlet.dead for s in d.stages), 2)  # parked ones too


def test_ring_size_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        RingBuffer(1000, Event, create_wait_strategy("blocking"))


def test_unknown_wait_strategy_lists_the_valid_ones():
    with pytest.raises(ValueError, match="blocking, yielding, sleeping, busy-spin"):
        create_wait_strategy("spinny")
