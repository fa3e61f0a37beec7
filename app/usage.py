"""Usage per principal: requests, errors and tokens, for today (UTC) and since the start.

Accounts of API keys are kept by key name, so a key's usage survives a reload and a rotated
hash; they are what ``GET /admin/usage`` reports and what ``app/usagestore.py`` persists.
Without keys, accounts of client addresses carry the per-address limits; they are bounded
(``MAX_CLIENTS``): idle ones are forgotten first when there are too many.

Charges accumulate per day in ``pending`` until the store takes them (write-behind), so the
request path only adds integers.
"""

from __future__ import annotations

import time
from typing import Any

from app.limits import Allowance

MAX_CLIENTS = 10_000  # client-address accounts remembered while no keys are configured


def utc_day(wall: float | None = None) -> int:
    """Days since the epoch, UTC: cheap to compute per request, shown as a date."""
    return int((time.time() if wall is None else wall) // 86400)


def day_name(day: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(day * 86400))


class Tally:
    __slots__ = ("errors", "requests", "tokens_in", "tokens_out")

    def __init__(self, requests: int = 0, errors: int = 0, tokens_in: int = 0,
                 tokens_out: int = 0) -> None:
        self.requests = requests
        self.errors = errors
        self.tokens_in = tokens_in
        self.tokens_out = tokens_out

    def add(self, requests: int, errors: int, tokens_in: int, tokens_out: int) -> None:
        self.requests += requests
        self.errors += errors
        self.tokens_in += tokens_in
        self.tokens_out += tokens_out

    def merge(self, other: Tally) -> None:
        self.add(other.requests, other.errors, other.tokens_in, other.tokens_out)

    def as_dict(self) -> dict[str, int]:
        return {"requests": self.requests, "errors": self.errors, "tokensIn": self.tokens_in,
                "tokensOut": self.tokens_out, "tokens": self.tokens_in + self.tokens_out}


class Account:
    """One principal's usage, and its limit state."""

    __slots__ = ("allowance", "day", "name", "pending", "today", "total")

    def __init__(self, name: str) -> None:
        self.name = name
        self.day = utc_day()
        self.today = Tally()
        self.total = Tally()
        self.pending: dict[int, Tally] = {}  # per day: not yet written to the store
        self.allowance = Allowance()

    def roll(self, day: int) -> None:
        if day != self.day:
            self.day = day
            self.today = Tally()

    def used_today(self, day: int) -> int:
        self.roll(day)
        return self.today.tokens_in + self.today.tokens_out

    def charge(self, requests: int, errors: int, tokens_in: int, tokens_out: int,
               day: int | None = None) -> None:
        """Every request's end: the three tallies added to in place (no call per tally);
        ``day``: the UTC day charged, today's unless given."""
        if day is None:
            day = int(time.time() // 86400)  # utc_day(), without a call per request
        if day != self.day:
            self.roll(day)
        pending = self.pending
        if day not in pending:
            pending[day] = Tally()
        for tally in (self.today, self.total, pending[day]):
            tally.requests += requests
            tally.errors += errors
            tally.tokens_in += tokens_in
            tally.tokens_out += tokens_out

    def report(self) -> dict[str, Any]:
        self.roll(utc_day())
        return {"today": self.today.as_dict(), "total": self.total.as_dict(),
                "inFlight": self.allowance.in_flight}


class UsageBook:
    """Every account: API keys by name, client addresses (bounded)."""

    def __init__(self) -> None:
        self.keys: dict[str, Account] = {}
        self.clients: dict[str, Account] = {}
        self.since = time.time()  # what "total" counts from (the store may move it back)

    def key(self, name: str) -> Account:
        account = self.keys.get(name)
        if account is None:
            account = self.keys[name] = Account(name)
        return account

    def client(self, address: str, now: float) -> Account:
        account = self.clients.get(address)
        if account is None:
            if len(self.clients) >= MAX_CLIENTS:
                self._forget_idle(now)
            account = self.clients[address] = Account(address)
        return account

    def _forget_idle(self, now: float) -> None:
        """Make room: idle addresses without tokens today first, then any idle one."""
        today = utc_day()
        idle = [a for a in self.clients.values() if a.allowance.idle(now)]
        idle.sort(key=lambda a: (a.day == today and a.today.tokens_in + a.today.tokens_out))
        for account in idle[: max(1, len(self.clients) // 10)]:
            del self.clients[account.name]

    def take_pending(self) -> list[tuple[str, int, Tally]]:
        """What the store must add: ``(key, day, tally)``, handed over (write-behind)."""
        out = []
        for account in self.keys.values():
            if account.pending:
                pending, account.pending = account.pending, {}
                out.extend((account.name, day, tally) for day, tally in pending.items())
        return out

    def give_back(self, rows: list[tuple[str, int, Tally]]) -> None:
        """A write failed: keep its rows for the next one."""
        for name, day, tally in rows:
            pending = self.key(name).pending
            pending.setdefault(day, Tally()).merge(tally)

    def restore(self, name: str, today: Tally, total: Tally, day: int) -> None:
        """Totals read from the store at start: counted before, not charged again."""
        account = self.key(name)
        account.roll(day)
        account.today.merge(today)
        account.total.merge(total)

    def report(self, names: list[str]) -> dict[str, Any]:
        """``GET /admin/usage``: the configured keys (and client addresses without keys)."""
        doc: dict[str, Any] = {
            "day": day_name(utc_day()),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since)),
            "keys": {name: self.key(name).report() for name in names}}
        if not names:
            doc["clients"] = {a: acc.report() for a, acc in self.clients.items()}
        return doc
