"""`RemoteBackend`'s side of the embedded engine's long-lived sandboxes (beyond the Contree API): the
`/v1/sandboxes` extension (`contree.sandbox_api.SandboxHost`) and the subprocess long poll (`?wait=`).

A base of `contree.client.RemoteBackend`, beside `OperationEvents`: both on `ApiTransport`'s requests.
"""

from __future__ import annotations

import asyncio

from contree import api
from contree.client_transport import ApiTransport
from contree.sandbox_api import (
    PortForward,
    PortRequest,
    SandboxInfo,
    SandboxList,
    SandboxRequest,
    SandboxSnapshot,
    StopSandboxRequest,
    process_exited,
)

WAIT_STEP = 60  # seconds one long poll of a subprocess waits at most (well inside the request timeout)
WAIT_POLL = 0.5  # seconds between polls of a server without long polls


class SandboxClient(ApiTransport):
    async def wait_subprocess(self, operation_id: str, spid: int, wait: float) -> api.InstanceResult:
        """`get_subprocess` once the process exited or `wait` seconds passed (`?wait=`, a long poll of the
        embedded engine; a server without it answers at once, so this polls)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        url = self._url("operations", self._operation(operation_id), "subprocesses", str(spid))
        while True:
            left = deadline - loop.time()
            step = max(0, min(WAIT_STEP, int(left + 0.999)))
            started = loop.time()
            result = await self._json(api.InstanceResult, "GET", url, params={"wait": str(step)})
            if process_exited(result) or left <= 0:
                return result
            if loop.time() - started < min(step, 0.5):  # not a long poll: poll gently
                await asyncio.sleep(min(WAIT_POLL, max(0.0, deadline - loop.time())))

    async def start_sandbox(self, request: SandboxRequest) -> SandboxInfo:
        return await self._json(SandboxInfo, "POST", self._url("sandboxes"), payload=request,
                                idempotent=False, ok=(201, 200))

    async def list_sandboxes(self) -> list[SandboxInfo]:
        return (await self._json(SandboxList, "GET", self._url("sandboxes"))).sandboxes

    async def get_sandbox(self, sandbox_id: str) -> SandboxInfo:
        return await self._json(SandboxInfo, "GET", self._url("sandboxes", self._operation(sandbox_id)))

    async def expose_port(self, sandbox_id: str, port: int) -> PortForward:
        url = self._url("sandboxes", self._operation(sandbox_id), "ports")
        return await self._json(PortForward, "POST", url, payload=PortRequest(port=port), ok=(200, 201))

    async def close_port(self, sandbox_id: str, port: int) -> None:
        url = self._url("sandboxes", self._operation(sandbox_id), "ports", str(port))
        await self._empty("DELETE", url, ok=(204, 200))

    async def snapshot_sandbox(self, sandbox_id: str) -> SandboxSnapshot:
        url = self._url("sandboxes", self._operation(sandbox_id), "snapshot")
        return await self._json(SandboxSnapshot, "POST", url, idempotent=False, ok=(201, 200))

    async def stop_sandbox(self, sandbox_id: str, request: StopSandboxRequest) -> SandboxInfo:
        url = self._url("sandboxes", self._operation(sandbox_id), "stop")
        return await self._json(SandboxInfo, "POST", url, payload=request, idempotent=False)
