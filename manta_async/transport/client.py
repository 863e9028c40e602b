"""The HTTP client that hands one batch to the store and says what the store answered."""

from __future__ import annotations

import email.utils
import io
import logging
import time
from typing import Literal

import aiohttp
import orjson

from manta_async import __version__
from manta_async.config import StoreConfig
from manta_async.errors import RejectedError, StateError, TransportError

log = logging.getLogger(__name__)

Applied = Literal["applied", "duplicate"]


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


class StoreClient:
    """A session with the store; an async context manager."""

    def __init__(self, config: StoreConfig, agent: str) -> None:
        self.config = config
        self.agent = agent
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> StoreClient:
        headers = {"User-Agent": f"manta-async/{__version__}"}
        if self.config.token:
            headers["Authorization"] = f"Bearer {self.config.token}"
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
        self._session = aiohttp.ClientSession(headers=headers, timeout=timeout)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise StateError("The store client is closed; use it inside 'async with'.")
        return self._session

    async def send(self, table: str, seq: int, payload: bytes) -> Applied:
        """POST one batch; return whether the store applied it now or had already."""
        url = f"{self.config.url}/v1/agents/{self.agent}/batches"
        where = f"batch {seq} of table {table!r} to {self.config.url}"
        try:
            # A file-like body: aiohttp warns that large raw bytes may block the event loop.
            async with self.session.post(
                url, data=io.BytesIO(payload), headers={"Content-Type": "application/json"}
            ) as response:
                body = await response.read()
                return self._answer(response, body, where)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise TransportError(f"could not send {where}: {_reason(exc)}") from exc
        except RejectedError as exc:
            if exc.status != 409:
                raise
            # The store lost batches, or this agent's index was reset: only a full resend
            # brings the two together again.
            raise RejectedError(
                f"{exc}; the store and this agent disagree on the table's sequence: send it "
                f"again in full with 'manta-async resync {table}'",
                exc.status,
                fatal=False,
            ) from exc

    async def health(self) -> None:
        """Raise TransportError or RejectedError unless the store answers and takes the token."""
        url = f"{self.config.url}/v1/agents/{self.agent}/tables"
        try:
            async with self.session.get(url) as response:
                body = await response.read()
                if response.status != 200:
                    self._refused(response, body, f"a request to {self.config.url}")
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise TransportError(
                f"the store at {self.config.url} does not answer: {_reason(exc)}"
            ) from exc

    def _answer(self, response: aiohttp.ClientResponse, body: bytes, where: str) -> Applied:
        if response.status == 200:
            status = orjson.loads(body).get("status")
            if status in ("applied", "duplicate"):
                return status  # type: ignore[no-any-return]
            raise TransportError(f"the store answered {where} with an unknown status {status!r}")
        self._refused(response, body, where)
        raise AssertionError("unreachable")

    def _refused(self, response: aiohttp.ClientResponse, body: bytes, where: str) -> None:
        status = response.status
        detail = _error_text(body)
        if status in (408, 429) or status >= 500:
            wait_s = retry_after_s(response.headers.get("Retry-After"))
            raise TransportError(f"the store answered {status} to {where}: {detail}", wait_s)
        if status in (401, 403):
            raise RejectedError(
                f"the store refused the token ({status}) for {where}; check [store] token",
                status,
                fatal=True,
            )
        if status == 404:
            raise RejectedError(
                f"the store has no such endpoint ({status}) for {where}; check [store] url",
                status,
                fatal=True,
            )
        raise RejectedError(f"the store refused {where} with {status}: {detail}", status, False)


def _reason(exc: BaseException) -> str:
    # aiohttp's timeouts carry no message: the class name is the reason.
    name = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
    return f"{name}: {exc}" if str(exc) else name


def _error_text(body: bytes) -> str:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:200].decode("utf-8", "replace") or "(no body)"
    if isinstance(parsed, dict) and "error" in parsed:
        return str(parsed["error"])
    return body[:200].decode("utf-8", "replace")
