"""The life of one image import: from EXECUTING to its `completion` event.

`ImportRun.execute()` is the queue's runner: it runs `contree.oci.importer.import_image` into the store
under the request's timeout (capped by `images_import_max_timeout`), stops it on a cancel, and finishes
the operation through `OperationLog.finish` with the result image and tag, or the reason it failed.
"""

from __future__ import annotations

import asyncio
import contextlib

import msgspec

from contree import api
from contree.engine.operations import Job
from contree.engine.oplog import CANCELLED, EXECUTING, FAILED, SUCCESS
from contree.engine.parts import EngineParts
from contree.errors import BackendError
from contree.oci import importer


class ImportRun:
    """One image import; `roots` bound the local sources (`oci-archive:` …) it may read (None: any)."""

    def __init__(self, parts: EngineParts, *, request: api.ImageImportRequest,
                 roots: tuple[str, ...] | None) -> None:
        self.parts = parts
        self.request = request
        self.roots = roots

    async def execute(self, job: Job) -> None:
        parts = self.parts
        oplog = parts.oplog
        record = oplog.get(job.op_uuid)
        oplog.transition(record, EXECUTING)
        oplog.open_log(record.uuid)  # followers attach now; `finish` writes its completion
        timeout = min(self.request.timeout, parts.limits.images_import_max_timeout)
        options = msgspec.structs.replace(importer.default_options(), local_roots=self.roots)
        task = asyncio.create_task(
            importer.import_image(parts.store, self.request, operation_id=record.uuid, options=options)
        )
        cancel = asyncio.create_task(job.cancelled.wait())
        outcome: tuple[api.TerminalStatus, str | None] = (CANCELLED, "cancelled")
        try:
            done, _ = await asyncio.wait({task, cancel}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                image = task.result()
                record.result_image_uuid = image.uuid
                record.result_tag = image.tag
                record.image_size = image.total_size
                outcome = (SUCCESS, None)
            elif cancel not in done:
                outcome = (FAILED, f"import timed out after {timeout} s")
        except Exception as exc:
            outcome = (FAILED, error_text(exc))
        finally:
            cancel.cancel()
            if not task.done():  # a cancel, the timeout, or this runner cancelled (the engine closes)
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            status, error = outcome
            oplog.finish(record, status, error=error)


def error_text(exc: BaseException) -> str:
    if isinstance(exc, BackendError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"
