"""The asyncio shell around the sans-IO core: handler tasks, cancellation, tasks that outlive their request,
server→client requests, and messages that belong to no request.

Transports call `ServerSession.receive(bytes)` (core events) and `await ServerSession.run(events, sink)`;
`handle` does both. Every protocol decision is the core's (`protocol.session`): this module only moves
its events and runs handlers.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import logging
import os
import time
from collections.abc import Coroutine
from typing import Any, Protocol, runtime_checkable

from protocol.context import RequestContext
from protocol.errors import ClientRequestError, InputRequired, McpError
from protocol.events import Answer, Batch, Call, Cancel, Dispatch, Event, Listen, Provide, StopTask
from protocol.headers import HttpHeaders
from protocol.messages import CallToolParams, CompleteParams, GetPromptParams, ReadResourceParams
from protocol.registry import Registry
from protocol.session import Core, Session
from protocol.types import Ask, Notify, Outgoing, Reply, RequestId, Sink

__all__ = ["Server", "ServerSession", "Sink", "StreamSink"]

log = logging.getLogger("protocol.server")

DEFAULT_SINK_BUFFER = 256
# A task-capable 2026-07-28 call still running after this many seconds answers with a task.
TASK_AFTER = 1.0


@runtime_checkable
class StreamSink(Protocol):
    """A sink that can end its stream early for the client to resume (SSE polling, SEP-1699)."""

    async def __call__(self, message: Outgoing, /) -> None: ...
    async def close_stream(self, retry_ms: int) -> None: ...


class _Work:
    """A running handler: its asyncio task, the sink its messages go to, and its promotion to a task."""

    __slots__ = ("call", "promote", "promoted", "session", "sink", "status", "task", "task_id")

    def __init__(self, session: ServerSession, call: Call, sink: Sink) -> None:
        self.session = session
        self.call = call
        self.sink = sink
        self.task: asyncio.Task[Any] | None = None
        self.promote: asyncio.Event | None = None  # set by RequestContext.run_as_task
        self.promoted: asyncio.Future[bool] | None = None
        self.status: str | None = None
        self.task_id: str | None = None


class Server:
    def __init__(self, registry: Registry, *, page_size: int = 100, task_after: float = TASK_AFTER) -> None:
        self.registry = registry
        self.core = Core(registry, secret=os.urandom(32), clock=time.time, page_size=page_size)
        self.catalog = self.core.catalog
        self.task_after = task_after
        self.sessions: dict[str, ServerSession] = {}
        self._tasks: dict[str, _Work] = {}  # task id → the work it runs (outlives its request's session)
        self._waiters: dict[tuple[str, str], asyncio.Future[dict[str, Any]]] = {}  # (task id, key) → answer
        self._background: set[asyncio.Task[Any]] = set()
        registry.add_listener(self._list_changed)

    def create_session(
        self, *, transport: str, principal: str | None = None, http: bool = False, register: bool = True
    ) -> ServerSession:
        """A new session; `register=False` for one that may live only as long as one HTTP request (it is
        registered later with `register` if it turns into a handshake session or a listen stream)."""
        session = ServerSession(self, transport=transport, principal=principal, http=http)
        if register:
            self.register(session)
        return session

    def register(self, session: ServerSession) -> None:
        self.sessions[session.session_id] = session

    def get_session(self, session_id: str) -> ServerSession | None:
        return self.sessions.get(session_id)

    # ------------------------------------------------------------ messages that belong to no request

    async def resource_updated(self, uri: str) -> None:
        """notifications/resources/updated to every session subscribed to `uri`."""
        for session in list(self.sessions.values()):
            for note in session.core.resource_updated(uri):
                await session.deliver(note)

    def _list_changed(self, kind: str) -> None:
        """Registry listener: announce the change to sessions and listen streams that want it."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # registration before serving: nobody to tell yet
        for session in list(self.sessions.values()):
            for note in session.core.list_changed(kind):
                self.spawn(loop, session.deliver(note))

    def task_changed(self, task_id: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        for session in list(self.sessions.values()):
            for note in session.core.task_notice(task_id):
                self.spawn(loop, session.deliver(note))

    def spawn(self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any]) -> None:
        task = loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------ tasks (2026-07-28 extension)

    def adopt(self, task_id: str, work: _Work) -> None:
        """A call became a task: its work now belongs to the server, not to the request that started it."""
        work.task_id = task_id
        self._tasks[task_id] = work
        assert work.task is not None
        work.task.add_done_callback(lambda t: self._task_done(work, t))

    def _task_done(self, work: _Work, task: asyncio.Task[Any]) -> None:
        error: BaseException | None
        result: Any = None
        if task.cancelled():
            error = asyncio.CancelledError()
        else:
            error = task.exception()
            if error is None:
                result = task.result()
            elif isinstance(error, Exception) and not isinstance(error, McpError):
                log.error("task %s failed", work.task_id, exc_info=error)
        work.session.core.finish(work.call, result=result, error=error)
        assert work.task_id is not None
        self._tasks.pop(work.task_id, None)
        for key in [k for k in self._waiters if k[0] == work.task_id]:
            self._waiters.pop(key).cancel()
        self.task_changed(work.task_id)

    def provide(self, event: Provide) -> None:
        for key, answer in event.answers.items():
            waiter = self._waiters.pop((event.task_id, key), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(answer)
        self.task_changed(event.task_id)

    def stop_task(self, task_id: str) -> None:
        work = self._tasks.get(task_id)
        if work is not None and work.task is not None:
            work.task.cancel()
        self.task_changed(task_id)

    async def wait_answers(self, task_id: str, keys: dict[str, str]) -> dict[str, dict[str, Any]]:
        loop = asyncio.get_running_loop()
        futures = {
            key: self._waiters.setdefault((task_id, wire), loop.create_future()) for key, wire in keys.items()
        }
        self.task_changed(task_id)  # input_required
        return {key: await future for key, future in futures.items()}

    async def close(self) -> None:
        for session in list(self.sessions.values()):
            await session.close()
        works = list(self._tasks.values())
        for work in works:
            if work.task is not None:
                work.task.cancel()
        await asyncio.gather(*(w.task for w in works if w.task is not None), return_exceptions=True)


class ServerSession:
    """One connection's shell: runs what its core asks for and implements RequestContext's Host."""

    def __init__(self, server: Server, *, transport: str, principal: str | None, http: bool = False) -> None:
        self.server = server
        self.transport = transport
        self.principal = principal
        self._session_id: str | None = None
        self.core = Session(server.core, principal=principal, http=http)
        self.closed = False
        self._default_sink: Sink | None = None
        self._buffer: collections.deque[Outgoing] = collections.deque(maxlen=DEFAULT_SINK_BUFFER)
        self._flush_lock = asyncio.Lock()
        self._flush_task: asyncio.Task[None] | None = None  # referenced so it is not collected mid-flight
        self._works: dict[int, _Work] = {}  # serial → running handler
        self._by_id: dict[RequestId, _Work] = {}
        self._pending: dict[int, asyncio.Future[Answer]] = {}
        self._listen_sinks: dict[RequestId, Sink] = {}

    @property
    def session_id(self) -> str:
        if self._session_id is None:
            # 192 bits from the CSPRNG; urlsafe base64 is visible ASCII (valid as Mcp-Session-Id).
            self._session_id = base64.urlsafe_b64encode(os.urandom(24)).decode()
        return self._session_id

    @property
    def protocol_version(self) -> str | None:
        return self.core.protocol_version

    def receive(self, data: bytes, headers: HttpHeaders | None = None) -> list[Event]:
        return self.core.receive(data, headers)

    async def handle(self, data: bytes, sink: Sink, headers: HttpHeaders | None = None) -> None:
        await self.run(self.core.receive(data, headers), sink)

    # ------------------------------------------------------------ carrying out events

    async def run(self, events: list[Event], sink: Sink) -> None:
        for event in events:
            t = type(event)
            if t is Reply or t is Notify or t is Ask:
                await sink(event)  # type: ignore[arg-type]
            elif t is Dispatch:
                await self._serve(event.call, sink)  # type: ignore[union-attr]
            elif t is Batch:
                await self._batch(event, sink)  # type: ignore[arg-type]
            else:
                self._act(event, sink)

    def _act(self, event: Event, sink: Sink) -> None:
        if isinstance(event, Cancel):
            work = self._by_id.get(event.id)
            if work is not None and work.task is not None:
                work.task.cancel()
        elif isinstance(event, Answer):
            future = self._pending.pop(event.id, None)
            if future is not None and not future.done():
                future.set_result(event)
        elif isinstance(event, Listen):
            self._listen_sinks[event.id] = sink
        elif isinstance(event, Provide):
            self.server.provide(event)
        elif isinstance(event, StopTask):
            self.server.stop_task(event.task_id)

    async def _batch(self, batch: Batch, sink: Sink) -> None:
        replies: list[bytes] = []

        async def collect(message: Outgoing) -> None:
            if type(message) is Reply:
                replies.append(message.data)
            else:
                await sink(message)

        await asyncio.gather(*(self.run([e], collect) for e in batch.events))
        if replies:
            await sink(Reply(None, b"[" + b",".join(replies) + b"]"))

    async def _serve(self, call: Call, sink: Sink) -> None:
        work = _Work(self, call, sink)
        ctx = RequestContext(self, call)
        loop = asyncio.get_running_loop()
        work.task = task = loop.create_task(self._invoke(call, ctx))
        self._works[call.serial] = work
        self._by_id[call.id] = work
        try:
            if call.modern and call.task_support != "forbidden" and await self._becomes_task(work):
                return  # answered with a task; the work runs on, owned by the server
            events = await self._outcome(call, task)
        finally:
            self._works.pop(call.serial, None)
            if self._by_id.get(call.id) is work:
                del self._by_id[call.id]
        for event in events:
            await self._send(sink, event)

    async def _becomes_task(self, work: _Work) -> bool:
        """Wait for the handler, run_as_task() or TASK_AFTER; promote on either of the last two."""
        assert work.task is not None
        loop = asyncio.get_running_loop()
        work.promote = asyncio.Event()
        work.promoted = loop.create_future()
        asked = loop.create_task(work.promote.wait())
        try:
            await asyncio.wait(
                {work.task, asked}, timeout=self.server.task_after, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            asked.cancel()
        if work.task.done():
            if not work.promoted.done():
                work.promoted.set_result(False)
            return False
        reply = self.core.promote(work.call, work.status)
        if reply is None:
            work.promoted.set_result(False)
            return False
        record = self.core.task_of(work.call)
        assert record is not None
        self.server.adopt(record.task_id, work)
        work.promoted.set_result(True)
        await self._send(work.sink, reply)
        return True

    async def _invoke(self, call: Call, ctx: RequestContext) -> Any:
        registry = self.server.registry
        params = call.params
        if type(params) is CallToolParams:
            return await registry.call_tool(params.name, params.arguments or {}, ctx)
        if type(params) is ReadResourceParams:
            return await registry.read(params.uri, ctx)
        if type(params) is GetPromptParams:
            return await registry.get_prompt(params.name, params.arguments or {}, ctx)
        assert type(params) is CompleteParams
        ref = params.ref
        name = ref.name if ref.type == "ref/prompt" else ref.uri
        assert name is not None
        arg = params.argument
        return await registry.complete(ref.type, name, arg.name, arg.value, params.context_arguments(), ctx)

    async def _outcome(self, call: Call, task: asyncio.Task[Any]) -> list[Event]:
        try:
            result = await task
        except asyncio.CancelledError as exc:
            current = asyncio.current_task()
            outer = current is not None and current.cancelling() > 0
            if (self.core.cancelled(call) or self.closed) and not outer:
                return self.core.finish(call, error=exc)  # cancelled by the client or closed: no response
            self.core.finish(call, error=exc)
            raise
        except (McpError, InputRequired) as exc:
            return self.core.finish(call, error=exc)
        except Exception as exc:
            log.exception("%s failed", call.method)
            return self.core.finish(call, error=exc)
        return self.core.finish(call, result=result)

    async def _send(self, sink: Sink, message: Any) -> None:
        try:
            await sink(message)
        except Exception:
            # A vanished stream is not a cancellation: the work goes on (MCP-PROTOCOL.md §4.3).
            pass

    # ------------------------------------------------------------ RequestContext's Host

    def client_capabilities(self, call: Call) -> dict[str, Any]:
        return self.core.capabilities(call)

    def client_info(self, call: Call) -> dict[str, Any]:
        return self.core.client_identity(call)

    def is_task(self, call: Call) -> bool:
        return self.core.task_of(call) is not None

    def cancel_requested(self, call: Call) -> bool:
        return self.core.cancel_requested(call)

    async def send_progress(
        self, call: Call, progress: float, total: float | None, message: str | None
    ) -> None:
        note = self.core.progress(call, progress, total, message)
        if note is not None:
            await self._send(self._sink_of(call), note)

    async def send_log(self, call: Call, level: str, data: Any, logger: str | None) -> None:
        note = self.core.log(call, level, data, logger)
        if note is not None:
            await self._send(self._sink_of(call), note)

    async def become_task(self, call: Call, status: str | None) -> bool:
        work = self._works.get(call.serial) or self._task_work(call)
        if work is None or work.promote is None or work.promoted is None:
            return False
        if work.promoted.done():
            return work.promoted.result()
        work.status = status
        work.promote.set()
        return await asyncio.shield(work.promoted)

    async def close_stream(self, call: Call, retry_ms: int) -> bool:
        work = self._works.get(call.serial)
        if work is None or self.core.cancelled(call) or not isinstance(work.sink, StreamSink):
            return False
        await work.sink.close_stream(retry_ms)
        return True

    async def resource_updated(self, uri: str) -> None:
        await self.server.resource_updated(uri)

    async def ask(
        self,
        call: Call,
        requests: dict[str, tuple[str, dict[str, Any]]],
        timeout: float,  # noqa: ASYNC109
    ) -> dict[str, dict[str, Any]]:
        """Answers to server→client requests, in the way the call's era and state allow."""
        core = self.core
        core.require(call, [method for method, _ in requests.values()])
        if not call.modern:
            keys = list(requests)
            answers = await asyncio.gather(*(self._ask_one(call, *requests[k], timeout) for k in keys))
            return dict(zip(keys, answers, strict=True))
        record = core.task_of(call)
        if record is not None:
            return await self.server.wait_answers(record.task_id, core.park(call, requests))
        missing = {k: v for k, v in requests.items() if k not in call.answers}
        if missing:
            raise InputRequired(missing)
        return {k: call.answers[k] for k in requests}

    async def _ask_one(
        self,
        call: Call,
        method: str,
        params: dict[str, Any],
        timeout: float,  # noqa: ASYNC109
    ) -> dict[str, Any]:
        if self.closed:
            raise ClientRequestError("the session is closed")
        ask = self.core.ask(call, method, params)
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._pending[ask.id] = future
        try:
            await self._sink_of(call)(ask)
            try:
                answer = await asyncio.wait_for(future, timeout)
            except TimeoutError:
                raise ClientRequestError(f"{method}: no answer within {timeout:g} s") from None
        finally:
            self._pending.pop(ask.id, None)
            self.core.forget(ask.id)
        if answer.error is not None:
            err = answer.error
            code = err.get("code")
            raise ClientRequestError(
                str(err.get("message", "client error")), code=code if type(code) is int else None
            )
        result = answer.result
        return result if type(result) is dict else {"result": result}

    def _sink_of(self, call: Call) -> Sink:
        work = self._works.get(call.serial) or self._task_work(call)
        return work.sink if work is not None else _discard

    def _task_work(self, call: Call) -> _Work | None:
        record = self.core.task_of(call)
        return self.server._tasks.get(record.task_id) if record is not None else None

    # ------------------------------------------------------------ messages unrelated to a request

    def set_default_sink(self, sink: Sink | None) -> None:
        self._default_sink = sink
        if sink is not None and self._buffer:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop yet: the buffer goes out with the next unrelated message
            self._flush_task = loop.create_task(self._flush())

    async def deliver(self, note: Notify) -> None:
        """A notification that belongs to no request: to its listen stream, else the default stream."""
        if note.related is None:
            await self.send_unrelated(note)
            return
        sink = self._listen_sinks.get(note.related)
        if sink is not None:
            await self._send(sink, note)

    async def send_unrelated(self, message: Outgoing | bytes) -> None:
        """list_changed, resources/updated, logs outside a call: the GET stream / stdout, else buffered."""
        self._buffer.append(Notify(message) if isinstance(message, bytes) else message)
        await self._flush()

    async def log(self, level: str, data: Any, logger: str | None = None) -> None:
        note = self.core.log(None, level, data, logger)
        if note is not None:
            await self.send_unrelated(note)

    async def _flush(self) -> None:
        async with self._flush_lock:
            while self._buffer and self._default_sink is not None:
                message = self._buffer[0]
                try:
                    await self._default_sink(message)
                except Exception:
                    return  # keep it buffered until a new sink is set
                if self._buffer and self._buffer[0] is message:
                    self._buffer.popleft()

    async def end_listen(self, listen_id: RequestId) -> None:
        """The transport lost a listen stream (client gone): forget the subscription."""
        self.core.listens.pop(listen_id, None)
        self._listen_sinks.pop(listen_id, None)

    # ------------------------------------------------------------ shutdown

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._session_id is not None:
            self.server.sessions.pop(self._session_id, None)
        for event in self.core.close():
            if type(event) is Reply:
                sink = self._listen_sinks.get(event.id)  # type: ignore[arg-type]
                if sink is not None:
                    await self._send(sink, event)  # a listen stream ends gracefully
            elif type(event) is Cancel:
                self._act(event, _discard)
        self._listen_sinks.clear()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ClientRequestError("the session is closed"))
        self._pending.clear()
        tasks = [w.task for w in self._works.values() if w.task is not None and w.task_id is None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


async def _discard(message: Outgoing) -> None:
    return None
