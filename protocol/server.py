"""Server: owns sessions and the asyncio side of dispatch (handler tasks, cancellation, client requests).

Transports call `ServerSession.parse(bytes)` then `await ServerSession.dispatch(frame, sink)`; all protocol
rules live in the sans-IO `protocol.session.Session`.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from protocol import versions
from protocol.catalog import Catalog
from protocol.content import for_version
from protocol.context import RequestContext
from protocol.errors import (
    INTERNAL_ERROR,
    METHOD_NOT_FOUND,
    REQUEST_TIMEOUT,
    ClientRequestError,
    InvalidParams,
    McpError,
)
from protocol.messages import (
    CompleteResult,
    Completion,
    Invalid,
    Notification,
    PromptMessage,
    ReadResourceResult,
    Request,
    RequestId,
    Response,
    encode_error,
    encode_notification,
    encode_request,
    encode_result,
)
from protocol.registry import Registry
from protocol.session import SYNC_METHODS, Frame, Session

__all__ = ["Frame", "Server", "ServerSession", "Sink"]

Sink = Callable[[bytes], Awaitable[None]]
log = logging.getLogger("protocol.server")

_CAPABILITY_FOR = {
    "sampling/createMessage": "sampling",
    "elicitation/create": "elicitation",
    "roots/list": "roots",
}
_LIST_CHANGED = {
    "tools": "notifications/tools/list_changed",
    "resources": "notifications/resources/list_changed",
    "prompts": "notifications/prompts/list_changed",
}
MAX_PENDING_CLIENT_REQUESTS = 64
DEFAULT_SINK_BUFFER = 256


class Server:
    def __init__(self, registry: Registry, *, page_size: int = 100) -> None:
        self.registry = registry
        self.catalog = Catalog(registry, page_size)
        self.sessions: dict[str, ServerSession] = {}
        self._announcements: set[asyncio.Task[None]] = set()
        registry.add_listener(self._list_changed)

    def create_session(self, *, transport: str, principal: str | None = None) -> ServerSession:
        session = ServerSession(self, transport=transport, principal=principal)
        self.sessions[session.session_id] = session
        return session

    def get_session(self, session_id: str) -> ServerSession | None:
        return self.sessions.get(session_id)

    async def resource_updated(self, uri: str) -> None:
        """notifications/resources/updated to every session subscribed to `uri` (on its default sink)."""
        message = encode_notification("notifications/resources/updated", {"uri": uri})
        for session in list(self.sessions.values()):
            if uri in session.core.subscriptions:
                await session.send_unrelated(message)

    def _list_changed(self, kind: str) -> None:
        """Registry listener: announce the change to initialized sessions, if the registry declares it."""
        if not self.registry.announce_list_changes or kind not in _LIST_CHANGED:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # registration before serving: nobody to tell yet
        message = encode_notification(_LIST_CHANGED[kind])
        for session in list(self.sessions.values()):
            if session.core.protocol_version is not None:
                task = loop.create_task(session.send_unrelated(message))
                self._announcements.add(task)
                task.add_done_callback(self._announcements.discard)

    async def close(self) -> None:
        for session in list(self.sessions.values()):
            await session.close()


class ServerSession:
    def __init__(self, server: Server, *, transport: str, principal: str | None) -> None:
        self.server = server
        self.transport = transport
        self.principal = principal
        # 192 bits from the CSPRNG; urlsafe base64 is visible ASCII (valid as Mcp-Session-Id).
        self.session_id = base64.urlsafe_b64encode(os.urandom(24)).decode()
        self.core = Session(server.registry, server.catalog)
        self.closed = False
        self._default_sink: Sink | None = None
        self._buffer: collections.deque[bytes] = collections.deque(maxlen=DEFAULT_SINK_BUFFER)
        self._flush_lock = asyncio.Lock()
        self._pending: dict[RequestId, asyncio.Future[Response]] = {}
        self._next_id = 0
        self._flush_task: asyncio.Task[None] | None = None  # referenced so it is not collected mid-flight

    @property
    def protocol_version(self) -> str | None:
        return self.core.protocol_version

    def parse(self, data: bytes) -> Frame:
        return self.core.parse(data)

    # ------------------------------------------------------------ dispatch

    async def dispatch(self, frame: Frame, sink: Sink) -> None:
        if frame.error_reply is not None:
            await sink(frame.error_reply)
            return
        if not frame.batch:
            reply = await self._one(frame.messages[0], sink)
            if reply is not None:
                await sink(reply)
            return
        replies = await asyncio.gather(*(self._one(m, sink) for m in frame.messages))
        answered = [r for r in replies if r is not None]
        if answered:
            await sink(b"[" + b",".join(answered) + b"]")

    async def _one(self, m: Any, sink: Sink) -> bytes | None:
        t = type(m)
        if t is Request:
            core = self.core
            error = core.precheck(m)
            if error is not None:
                return error
            if m.method in SYNC_METHODS:
                return core.handle_sync(m)
            return await self._run(m, sink)
        if t is Notification:
            cancel_id = self.core.notification(m)
            if cancel_id is not None:
                self._cancel(cancel_id)
            return None
        if t is Response:
            future = self._pending.pop(m.id, None)
            if future is not None and not future.done():
                future.set_result(m)
            return None
        assert t is Invalid
        return m.reply

    async def _run(self, req: Request, sink: Sink) -> bytes | None:
        params = req.params or {}
        meta = params.get("_meta")
        token = meta.get("progressToken") if type(meta) is dict else None
        if type(token) is not str and type(token) is not int:
            token = None
        ctx = RequestContext(self, req.id, token, sink)
        task = asyncio.get_running_loop().create_task(self._handle(req, params, ctx))
        self.core.inflight[req.id] = (task, ctx)
        try:
            reply = await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if (ctx.cancelled.is_set() or self.closed) and (current is None or not current.cancelling()):
                return None  # cancelled by the client, or the session closed: no response at all
            raise
        finally:
            ctx.done = True
            if self.core.inflight.get(req.id, (None,))[0] is task:
                del self.core.inflight[req.id]
        if ctx._cancelled is not None and ctx._cancelled.is_set():
            return None
        return reply

    def _cancel(self, request_id: RequestId) -> None:
        entry = self.core.inflight.get(request_id)
        if entry is None:
            return  # unknown or finished: races are tolerated
        task, ctx = entry
        ctx.cancelled.set()
        task.cancel()

    async def _handle(self, req: Request, params: dict[str, Any], ctx: RequestContext) -> bytes:
        registry = self.server.registry
        version = self.core.protocol_version or versions.LATEST
        try:
            method = req.method
            if method == "tools/call":
                name = params.get("name")
                arguments = params.get("arguments")
                if type(name) is not str:
                    raise InvalidParams('Invalid params: "name" must be a string')
                if arguments is None:
                    arguments = {}
                elif type(arguments) is not dict:
                    raise InvalidParams('Invalid params: "arguments" must be an object')
                result = await registry.call_tool(name, arguments, ctx)
                result.content = for_version(result.content, version)
                if not versions.has_structured(version):
                    result.structured_content = None
                return encode_result(req.id, result)
            if method == "resources/read":
                uri = params.get("uri")
                if type(uri) is not str:
                    raise InvalidParams('Invalid params: "uri" must be a string')
                return encode_result(req.id, ReadResourceResult(await registry.read_resource(uri, ctx)))
            if method == "prompts/get":
                name = params.get("name")
                arguments = params.get("arguments") or {}
                if type(name) is not str:
                    raise InvalidParams('Invalid params: "name" must be a string')
                if type(arguments) is not dict or not all(type(v) is str for v in arguments.values()):
                    raise InvalidParams('Invalid params: "arguments" must map names to strings')
                prompt = await registry.get_prompt(name, arguments, ctx)
                prompt.messages = [
                    PromptMessage(pm.role, for_version([pm.content], version)[0]) for pm in prompt.messages
                ]
                return encode_result(req.id, prompt)
            # completion/complete
            values = await self._complete(params, ctx)
            return encode_result(
                req.id, CompleteResult(Completion(values[:100], len(values), len(values) > 100))
            )
        except McpError as exc:
            return encode_error(req.id, exc.code, exc.message, exc.data)
        except Exception:
            log.exception("%s failed", req.method)
            return encode_error(req.id, INTERNAL_ERROR, "Internal error")

    async def _complete(self, params: dict[str, Any], ctx: RequestContext) -> list[str]:
        ref = params.get("ref")
        argument = params.get("argument")
        if type(ref) is not dict or type(argument) is not dict:
            raise InvalidParams('Invalid params: "ref" and "argument" must be objects')
        ref_type = ref.get("type")
        ref_name = ref.get("name") if ref_type == "ref/prompt" else ref.get("uri")
        arg_name = argument.get("name")
        value = argument.get("value", "")
        if type(ref_type) is not str or type(ref_name) is not str or type(arg_name) is not str:
            raise InvalidParams("Invalid params: ref and argument name are required")
        if type(value) is not str:
            raise InvalidParams('Invalid params: "argument.value" must be a string')
        context = params.get("context")
        raw_args = context.get("arguments") if type(context) is dict else None
        context_args = {k: v for k, v in raw_args.items() if type(v) is str} if type(raw_args) is dict else {}
        return await self.server.registry.complete(ref_type, ref_name, arg_name, value, context_args, ctx)

    # ------------------------------------------------------------ server → client

    async def client_request(
        self,
        method: str,
        params: dict[str, Any],
        timeout: float,  # noqa: ASYNC109
        sink: Sink,
    ) -> dict[str, Any]:
        capability = _CAPABILITY_FOR.get(method)
        if capability is not None and capability not in self.core.client_capabilities:
            raise ClientRequestError(f"the client does not support {capability}", code=METHOD_NOT_FOUND)
        if self.closed:
            raise ClientRequestError("the session is closed")
        if len(self._pending) >= MAX_PENDING_CLIENT_REQUESTS:
            raise ClientRequestError("too many pending requests to the client")
        self._next_id += 1
        rid = self._next_id
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            await sink(encode_request(rid, method, params))
            try:
                response = await asyncio.wait_for(future, timeout)
            except TimeoutError:
                raise ClientRequestError(
                    f"{method}: no answer within {timeout:g} s", code=REQUEST_TIMEOUT
                ) from None
        finally:
            self._pending.pop(rid, None)
        if response.error is not None:
            err = response.error
            code = err.get("code")
            raise ClientRequestError(
                str(err.get("message", "client error")), code=code if type(code) is int else None
            )
        result = response.result
        return result if type(result) is dict else {"result": result}

    # ------------------------------------------------------------ messages unrelated to a request

    def set_default_sink(self, sink: Sink | None) -> None:
        self._default_sink = sink
        if sink is not None and self._buffer:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop yet: the buffer goes out with the next unrelated message
            self._flush_task = loop.create_task(self._flush())

    async def send_unrelated(self, message: bytes) -> None:
        """list_changed, resources/updated, logs outside a call: the GET stream / stdout, else buffered."""
        self._buffer.append(message)
        await self._flush()

    async def log(self, level: str, data: Any, logger: str | None = None) -> None:
        if self.core.log_enabled(level):
            params: dict[str, Any] = {"level": level, "data": data}
            if logger is not None:
                params["logger"] = logger
            await self.send_unrelated(encode_notification("notifications/message", params))

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

    # ------------------------------------------------------------ shutdown

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.sessions.pop(self.session_id, None)
        tasks = [task for task, _ctx in self.core.inflight.values()]
        for task in tasks:
            task.cancel()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ClientRequestError("the session is closed"))
        self._pending.clear()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
