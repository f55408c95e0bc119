"""The admin API of a NIM test server (``/_admin/*``): drive a server in another process.

``GET``/``POST /_admin/config`` (settings), ``GET``/``POST``/``DELETE
/_admin/fault`` (faults), ``GET /_admin/stats``, ``GET /_admin/requests``,
``POST /_admin/ready`` and ``POST /_admin/reset``.  Admin requests are never
recorded and never take a fault.  :class:`RemoteNimServer` is the client.
"""

from __future__ import annotations

import json
from typing import Any

from nimpipe.testing.nim_server.faults import Fault
from nimpipe.testing.nim_server.replies import error_body
from nimpipe.testing.nim_server.state import ServerState

__all__ = ["admin_answer"]


def admin_answer(state: ServerState, method: str, path: str, raw_body: bytes) -> tuple[int, Any]:
    """The answer to an admin request, as (status, JSON payload); bad input is a 400."""
    body: Any = {}
    if raw_body:
        try:
            body = json.loads(raw_body)
        except ValueError:
            body = None
    route = (method, path)
    try:
        if route == ("GET", "/_admin/config"):
            return 200, {"settings": state.settings.to_dict()}
        if route == ("POST", "/_admin/config"):
            if not isinstance(body, dict):
                raise ValueError("expected a JSON object of settings")
            return 200, {"settings": state.configure(**body).to_dict()}
        if route == ("GET", "/_admin/fault"):
            return 200, {"faults": [f.to_dict() for f in state.faults]}
        if route == ("POST", "/_admin/fault"):
            items = body.get("faults", [body]) if isinstance(body, dict) else body
            if not isinstance(items, list):
                raise ValueError("expected a fault object, a list, or {'faults': [...]}")
            faults = [Fault.from_dict(item) for item in items]
            state.queue_faults(faults)
            return 200, {"queued": len(faults), "faults": [f.to_dict() for f in state.faults]}
        if route == ("DELETE", "/_admin/fault"):
            state.clear_faults()
            return 200, {"faults": []}
        if route == ("GET", "/_admin/stats"):
            counts = {f"{m} {p}": n for (m, p), n in state.stats().items()}
            return 200, {
                "counts": counts,
                "total": sum(counts.values()),
                "in_flight": state.in_flight,
                "ready": state.ready,
            }
        if route == ("GET", "/_admin/requests"):
            return 200, {"requests": [r.to_dict() for r in state.requests]}
        if route == ("POST", "/_admin/ready"):
            ready = body.get("ready") if isinstance(body, dict) else body
            if ready is not None and not isinstance(ready, bool):
                raise ValueError("'ready' must be true, false or null")
            state.set_ready(ready)
            return 200, {"ready": state.ready}
        if route == ("POST", "/_admin/reset"):
            state.reset()
            return 200, {"reset": True}
    except (TypeError, ValueError, KeyError) as exc:
        return 400, error_body(400, str(exc))
    return 404, {"detail": "Not Found"}
