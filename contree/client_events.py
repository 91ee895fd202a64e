"""`OperationEvents`: an operation's event stream (SSE, `GET /operations/{id}/events`) read with
transparent resumption — reconnects from the last event id after drops, `sse_error` frames and a 410
while the durable log is not ready — and, for the engine's own clients, the record after `completion`.

A base of `contree.client.RemoteBackend` (which supplies `get_operation`) over `ApiTransport`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, cast

import msgspec

from contree import api
from contree.client_transport import ApiTransport
from contree.errors import BackendError, Unavailable
from contree.rest.sse import RECORD_EVENT, SseParser

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("contree.client")

HEALTHY_STREAM_SECONDS = 5.0
STREAM_END_SECONDS = 1.0  # how long a finished event stream may take to end (else its connection closes)
_event_decoder = msgspec.json.Decoder(api.OperationEvent)
_operation_decoder = msgspec.json.Decoder(api.OperationResponse)


async def _read_to_end(response: aiohttp.ClientResponse) -> None:
    """The end of a stream past `completion` (the server closes it right after, the record at most in
    between). Read, the connection goes back to the pool for the next request; released before its end,
    it would be closed. Also when the reader left early (the generator's clean-up runs then)."""
    import aiohttp

    if response.content.is_eof():
        return
    try:
        async with asyncio.timeout(STREAM_END_SECONDS):
            while await response.content.readany():
                pass
    except (aiohttp.ClientError, TimeoutError):
        pass



class OperationEvents(ApiTransport):
    async def get_operation(self, operation_id: str, *, inflight: bool = False) -> api.OperationResponse:
        raise NotImplementedError  # the endpoint, in RemoteBackend: asked when a follow stream ends early

    def events(
        self, operation_id: str, *, follow: bool = False, spid: int | None = None, since: int | None = None
    ) -> AsyncIterator[api.OperationEvent]:
        # Arguments are checked on first iteration, like a generator-based Backend would.
        stream = self._follow_events(operation_id, follow=follow, spid=spid, since=since, record=False)
        return cast(AsyncIterator[api.OperationEvent], stream)  # record=False: events only

    async def _follow_events(
        self, operation_id: str, *, follow: bool, spid: int | None, since: int | None, record: bool
    ) -> AsyncIterator[api.OperationEvent | api.OperationResponse]:
        """Events with transparent resumption: reconnects from the last id after drops and `sse_error`.
        `record`: ask the server (the embedded engine) to end a stream that reached `completion` with the
        operation's record, and yield it last."""
        import aiohttp

        self._operation(operation_id)
        last_id = since
        failures = 0
        while True:
            response = await self._open_event_stream(
                operation_id, follow=follow, spid=spid, last_id=last_id, record=record
            )
            opened = time.monotonic()
            broken = completed = False
            try:
                parser = SseParser()
                async for chunk in response.content.iter_any():
                    for frame in parser.feed(chunk):
                        if frame.event == "sse_error":
                            log.debug("event stream of %s: server error: %s", operation_id, frame.data)
                            broken = True
                            continue
                        if record and completed and frame.event == RECORD_EVENT:
                            try:
                                yield _operation_decoder.decode(frame.data)
                            except msgspec.MsgspecError:
                                log.debug("event stream of %s: undecodable record skipped", operation_id)
                            continue
                        try:
                            event = _event_decoder.decode(frame.data)
                        except msgspec.MsgspecError:
                            log.debug("event stream of %s: undecodable frame skipped", operation_id)
                            continue
                        if last_id is not None and event.id <= last_id:
                            continue  # a replay after reconnecting
                        last_id = event.id
                        failures = 0
                        completed = completed or event.type == "completion"
                        yield event
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.debug("event stream of %s dropped: %s", operation_id, exc or type(exc).__name__)
                broken = True
            finally:
                try:
                    if completed:
                        await _read_to_end(response)
                finally:
                    response.release()
            if completed or (not broken and not follow):
                return
            if not broken:
                # A follow stream closed without `completion` (spid filter, proxy cut): finish only once
                # the operation is terminal, after one last non-follow read of the retained tail.
                status = (await self.get_operation(operation_id)).status
                if status in api.TERMINAL_STATUSES:
                    follow = False
                    continue
                if time.monotonic() - opened >= HEALTHY_STREAM_SECONDS:
                    failures = 0  # a long quiet stream cut by a proxy is not a failing server
            failures += 1
            if failures > self.retries:
                raise Unavailable(f"event stream of {operation_id} keeps failing; last event id {last_id}")
            await asyncio.sleep(self._delay(failures - 1, None))

    async def _open_event_stream(
        self, operation_id: str, *, follow: bool, spid: int | None, last_id: int | None, record: bool = False
    ) -> aiohttp.ClientResponse:
        """One SSE request; `_request` retries 425 and 5xx, and 410 is retried here after Retry-After."""
        params: dict[str, str] = {}
        if follow:
            params["follow"] = "1"
        if spid is not None:
            params["spid"] = str(spid)
        if record:
            params["record"] = "1"
        headers = {"Accept": "text/event-stream"}
        if last_id is not None:
            headers["Last-Event-Id"] = str(last_id)
        url = self._url("operations", operation_id, "events")
        attempt = 0
        while True:
            try:
                return await self._request(
                    "GET", url, params=params, idempotent=True, stream=True, headers=headers
                )
            except BackendError as exc:
                # 410 on events = live stream over, durable log not ready yet (§14 #19): retry later.
                if exc.status != 410 or attempt >= self.retries:
                    raise
                await asyncio.sleep(self._delay(attempt, exc.retry_after))
                attempt += 1
