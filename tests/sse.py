"""Reading a Server-Sent Events reply as clients do: (event name, parsed data) per event."""

from __future__ import annotations

import json
from typing import Any

import requests


def sse_events(response: requests.Response) -> list[tuple[str | None, dict[str, Any]]]:
    """(event name, data) for each SSE event of a streamed reply; fails if it ends mid-event."""
    events, name, data = [], None, []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            data.append(line[len("data: "):])
        elif not line and (name or data):
            events.append((name, json.loads("\n".join(data))))
            name, data = None, []
    assert name is None and not data, "the stream ended inside an event"
    return events
