"""The JSON-over-HTTP client of the remote guardrails backends, and reading their replies."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from nimpipe.errors import BackendUnavailable
from nimpipe.stage import register_secret
from nimpipe_contrib.guardrails.backends.base import excerpt

__all__ = ["JsonClient", "chat_reply", "error_text"]


@attrs.define
class JsonClient:
    """An ``httpx.AsyncClient`` made on first use (on the backend loop)."""

    backend: str
    timeout: float
    api_key: str | None = attrs.field(default=None, repr=False)
    _client: Any = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        if self.api_key:
            register_secret(self.api_key)

    def client(self) -> Any:
        """The ``httpx.AsyncClient`` (made on first use, so that ``httpx`` loads late)."""
        if self._client is None:
            import httpx

            headers = {"accept": "application/json"}
            if self.api_key:
                headers["authorization"] = f"Bearer {self.api_key}"
            self._client = httpx.AsyncClient(timeout=self.timeout, headers=headers, trust_env=False)
        return self._client

    async def post_json(self, url: str, body: Mapping[str, Any]) -> tuple[int, Any]:
        """POST ``body``; returns the status and the parsed JSON (``None`` if not JSON)."""
        import httpx

        try:
            response = await self.client().post(url, json=body)
        except httpx.TimeoutException as exc:
            raise BackendUnavailable(self.backend, f"timed out: {url}") from exc
        except httpx.HTTPError as exc:
            raise BackendUnavailable(self.backend, f"{type(exc).__name__}: {url}: {exc}") from exc
        try:
            data = response.json()
        except ValueError:
            data = None
        return response.status_code, data

    async def aclose(self) -> None:
        """Close the client (if it was made)."""
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


def error_text(data: Any) -> str:
    """The error message of a service's JSON answer (or the answer), quoted and scrubbed."""
    if isinstance(data, Mapping):
        error = data.get("error", data.get("detail"))
        if isinstance(error, Mapping):
            return excerpt(str(error.get("message", error)), 500)
        if error is not None:
            return excerpt(str(error), 500)
    return excerpt(data)


def chat_reply(backend: str, status: int, data: Any) -> str:
    """The assistant text of a chat completion, or :class:`BackendUnavailable`."""
    if status != 200:
        raise BackendUnavailable(backend, f"HTTP {status}: {error_text(data)}")
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise BackendUnavailable(backend, f"not a chat completion: {excerpt(data)}") from None
    if not isinstance(content, str):
        raise BackendUnavailable(backend, "the reply has no text")
    return content
