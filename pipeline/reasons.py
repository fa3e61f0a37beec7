"""Why a node could not be talked to, in an operator's words, for management errors.

``upstream.describe`` words transport failures; one case is fixed here: urllib3's
``NewConnectionError`` (a refused or failed connect) is a subclass of ``ConnectTimeoutError``,
so it reads "connect timed out" there although nothing timed out. A pull that names a node
that is down must say "connection refused".
"""

from __future__ import annotations

from urllib3.exceptions import NewConnectionError

from pipeline.upstream import describe


def reason(exc: BaseException) -> str:
    if isinstance(exc, NewConnectionError):
        return "connection refused" if "refused" in str(exc).lower() else "cannot connect"
    return describe(exc)
