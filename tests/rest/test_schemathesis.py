"""schemathesis: the REST server, run against `contree-openapi.yaml`, shows no schema or status violations.

The server runs in its own thread (schemathesis calls are synchronous) in front of the in-memory fake,
seeded with the spec's example UUID so the spec's own examples reach real 200 paths, not only 404s.
Known deliberate deviations (README, "REST API deviations") are listed in DEVIATIONS and nothing else
is tolerated.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from aiohttp import web
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from contree import api
from contree.rest import build_app
from tests.rest.fake_backend import FakeBackend

SPEC = Path(__file__).with_name("contree-openapi.yaml")
EXAMPLE_UUID = "12345678-9abc-baba-deda-0123456789ab"
TOKEN = "schema-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}", "Project": "project-1"}
MAX_EXAMPLES = 25
CHECKS = (
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
)

# (method, path template, status): spawning from an image that does not exist answers 404 like every
# other lookup of a missing image; the spec lists only 400/401/403 for POST /instances.
DEVIATIONS = {("POST", "/instances", 404)}


def seeded_backend() -> FakeBackend:
    fake = FakeBackend()
    image = fake.images.pop(fake.base_uuid)
    tree = fake.trees.pop(fake.base_uuid)
    image.uuid = EXAMPLE_UUID
    fake.images[EXAMPLE_UUID] = image
    fake.trees[EXAMPLE_UUID] = {**tree, "/etc/ssh": None, "/etc/ssh/sshd_config": b"#PermitRootLogin no\n"}
    fake.base_uuid = EXAMPLE_UUID
    fake.ops[EXAMPLE_UUID] = api.OperationResponse(uuid=EXAMPLE_UUID, kind="instance", status="SUCCESS")
    fake.op_events[EXAMPLE_UUID] = []
    return fake


@pytest.fixture(scope="module")
def live_url() -> Iterator[str]:
    started = threading.Event()
    state: dict[str, Any] = {}
    loop = asyncio.new_event_loop()

    async def start() -> None:
        runner = web.AppRunner(build_app(seeded_backend(), token=TOKEN, keepalive=0.2), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        state["runner"] = runner
        state["port"] = runner.addresses[0][1]

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield f"http://127.0.0.1:{state['port']}/v1"
    finally:
        asyncio.run_coroutine_threadsafe(state["runner"].cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def operations() -> list[str]:
    schema = schemathesis.from_path(str(SPEC))
    found = []
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]  # an Err would raise: the spec must parse
        found.append(f"{operation.method.upper()} {operation.path}")
    return found


@pytest.mark.parametrize("operation", operations())
def test_operation_conforms(live_url: str, operation: str) -> None:
    method, path = operation.split(" ", 1)
    schema = schemathesis.from_path(str(SPEC), base_url=live_url)
    op = schema[path][method]
    failures: list[str] = []
    logging.getLogger("aiohttp").setLevel(logging.CRITICAL)  # generated garbage headers are logged otherwise

    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    )
    @hypothesis.given(case=op.as_strategy())
    def run(case: schemathesis.Case) -> None:
        response = case.call(headers=HEADERS, allow_redirects=False, timeout=10)
        # HEAD responses carry no body, so there is no JSON error body to validate.
        checks = tuple(c for c in CHECKS if not (method == "HEAD" and c is response_schema_conformance))
        try:
            case.validate_response(response, checks=checks)
        except AssertionError as exc:
            if (method, path, response.status_code) in DEVIATIONS:
                return
            failures.append(
                f"{response.status_code} for {case.path_parameters} {case.query} {case.body!r}: {exc}"
            )

    run()
    assert not failures, "\n".join(sorted(set(failures))[:5])
