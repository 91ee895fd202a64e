"""The operation resources refuse an operation of the other kind (one kind check serves all three)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from protocol.errors import ResourceNotFound
from tests.tools.fakes import FakeBackend, FakeContext, make_registry


async def test_operation_resources_check_the_kind(tmp_path: Path) -> None:
    backend = FakeBackend()
    reg, state = make_registry(backend, tmp_path)
    run = backend.add_op("SUCCESS", "instance")
    imp = backend.add_op("SUCCESS", "image_import")
    cases = [
        (
            f"contree://operations/instance/{imp}",
            f"Operation {imp} is not an instance operation (kind=image_import)",
        ),
        (f"contree://operations/instance/{imp}/stdout", f"Operation {imp} is not an instance operation"),
        (f"contree://operations/import/{run}", f"Operation {run} is not an import operation (kind=instance)"),
    ]
    for uri, message in cases:
        with pytest.raises(ResourceNotFound, match=re.escape(message)):
            await reg.read_resource(uri, FakeContext())  # type: ignore[arg-type]
    body = await reg.read_resource(f"contree://operations/import/{imp}", FakeContext())  # type: ignore[arg-type]
    assert "STATE: SUCCESS" in str(body)
    await state.close()
