"""The sans-IO core on its own: bytes in, events out, plain calls, no event loop (the h11 model)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec

from protocol.events import Answer, Cancel, Dispatch, Event
from protocol.messages import CallToolResult
from protocol.session import Core, Session
from protocol.testing.conformance import build_registry
from protocol.types import Ask, Notify, Reply

ROOT = Path(__file__).resolve().parents[2]
INIT = (
    b'{"jsonrpc":"2.0","id":1,"method":"initialize",'
    b'"params":{"protocolVersion":"2025-03-26","capabilities":{}}}'
)


def _core(page_size: int = 2) -> Core:
    return Core(build_registry("1.2.3"), secret=b"k" * 32, clock=lambda: 1_000_000.0, page_size=page_size)


def _session(**kw: Any) -> Session:
    return Session(_core(), **kw)


def _reply(events: list[Event]) -> dict[str, Any]:
    [event] = events
    assert isinstance(event, Reply), events
    return msgspec.json.decode(event.data)  # type: ignore[no-any-return]


def test_the_core_imports_no_asyncio_no_aiohttp_and_no_os_level_io() -> None:
    """protocol/session.py and every protocol module it loads: no asyncio/aiohttp at all (checked in a fresh
    interpreter), and no module doing OS-level I/O imported by any of them (checked in their source)."""
    script = (
        "import sys, protocol.session as s\n"
        "print(','.join(sorted(m for m in sys.modules if m.startswith('protocol'))))\n"
        "print('asyncio' in sys.modules, 'aiohttp' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    modules, loaded = out.stdout.strip().splitlines()
    assert loaded == "False False", loaded
    banned = {"asyncio", "aiohttp", "os", "io", "socket", "subprocess", "threading", "select", "selectors",
              "signal", "shutil", "pathlib", "tempfile", "time", "secrets", "random"}  # fmt: skip
    core = modules.split(",")
    assert "protocol.session" in core and "protocol.server" not in core
    for name in core:
        path = ROOT / (name.replace(".", "/") + ".py")
        if not path.exists():
            path = ROOT / name.replace(".", "/") / "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert not roots & banned, f"{name} imports {roots & banned}"


def test_receive_classifies_each_message_kind() -> None:
    session = _session()
    assert isinstance(session.receive(b'{"jsonrpc":"2.0","id":1,"method":"ping"}')[0], Reply)
    assert session.receive(b'{"jsonrpc":"2.0","method":"n"}') == []
    assert session.receive(b'{"jsonrpc":"2.0","id":1,"result":{}}') == []  # nobody asked
    assert _reply(session.receive(b'{"jsonrpc":"2.0","id":1}'))["error"]["code"] == -32600


def test_initialize_sets_state_and_answers() -> None:
    session = _session()
    reply = _reply(session.receive(INIT))
    assert reply["result"]["protocolVersion"] == "2025-03-26"
    assert reply["result"]["serverInfo"]["version"] == "1.2.3"
    assert session.protocol_version == "2025-03-26"


def test_client_info_and_capabilities_are_kept() -> None:
    session = _session()
    session.receive(
        b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25",'
        b'"capabilities":{"sampling":{}},"clientInfo":{"name":"c","version":"2"}}}'
    )
    assert session.client_capabilities == {"sampling": {}}
    assert session.client_info == {"name": "c", "version": "2"}


def test_initialized_notification_is_recorded() -> None:
    session = _session()
    assert session.receive(b'{"jsonrpc":"2.0","method":"notifications/initialized"}') == []
    assert session.initialized


def test_a_call_is_dispatched_then_finished_into_its_reply() -> None:
    session = _session()
    session.receive(INIT)
    [event] = session.receive(b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"x"}}')
    assert isinstance(event, Dispatch)
    assert event.call.method == "tools/call" and event.call.params.name == "x"  # type: ignore[union-attr]
    assert 7 in session.inflight
    reply = _reply(session.finish(event.call, result=CallToolResult([])))
    assert reply == {"jsonrpc": "2.0", "id": 7, "result": {"content": []}}
    assert 7 not in session.inflight


def test_cancelled_notification_cancels_the_call_and_silences_its_reply() -> None:
    session = _session()
    session.receive(INIT)
    [dispatch] = session.receive(b'{"jsonrpc":"2.0","id":"a","method":"tools/call","params":{"name":"x"}}')
    assert isinstance(dispatch, Dispatch)
    events = session.receive(
        b'{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":"a"}}'
    )
    assert events == [Cancel("a")]
    assert session.finish(dispatch.call, result=CallToolResult([])) == []
    # Unknown or finished ids are ignored.
    assert (
        session.receive(b'{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":"a"}}')
        == []
    )


def test_batch_allowed_only_while_the_version_allows_it() -> None:
    session = _session()
    batch = b'[{"jsonrpc":"2.0","id":2,"method":"ping"}]'
    assert _reply(session.receive(batch)[0].events)["result"] == {}  # type: ignore[union-attr]  # before init
    session.receive(INIT)
    assert _reply(session.receive(batch)[0].events)["result"] == {}  # type: ignore[union-attr]  # 2025-03-26
    later = _session()
    later.receive(INIT.replace(b"2025-03-26", b"2025-06-18"))
    refused = later.receive(batch)
    assert _reply(refused)["error"]["code"] == -32600 and refused[0].status == 400  # type: ignore[union-attr]


def test_list_pages_are_cached_bytes() -> None:
    session = _session()
    session.receive(INIT)
    first = session.core.catalog.page("tools", "2025-03-26", None)
    assert session.core.catalog.page("tools", "2025-03-26", None) is first
    assert session.core.catalog.page("tools", "2025-11-25", None) is not first


def test_log_threshold() -> None:
    session = _session()
    assert not session.log_enabled("emergency")
    session.set_level("warning")
    assert session.log_enabled("error") and not session.log_enabled("info")


def test_progress_is_strictly_increasing_and_stops_with_the_reply() -> None:
    session = _session()
    session.receive(INIT)
    [dispatch] = session.receive(
        b'{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"x","_meta":{"progressToken":"t"}}}'
    )
    assert isinstance(dispatch, Dispatch)
    call = dispatch.call
    first = session.progress(call, 1, None, "one")
    assert isinstance(first, Notify) and first.related == 3
    assert msgspec.json.decode(first.data)["params"] == {
        "progressToken": "t",
        "progress": 1,
        "message": "one",
    }
    assert session.progress(call, 1, None, None) is None
    assert session.progress(call, 0.5, None, None) is None
    session.finish(call, result=CallToolResult([]))
    assert session.progress(call, 2, None, None) is None


def test_server_to_client_requests_need_the_capability_and_route_answers() -> None:
    session = _session()
    session.receive(
        b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25",'
        b'"capabilities":{"sampling":{}}}}'
    )
    [dispatch] = session.receive(b'{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"x"}}')
    assert isinstance(dispatch, Dispatch)
    ask = session.ask(dispatch.call, "sampling/createMessage", {"maxTokens": 1})
    assert isinstance(ask, Ask) and ask.related == 5
    assert msgspec.json.decode(ask.data)["method"] == "sampling/createMessage"
    answer = session.receive(b'{"jsonrpc":"2.0","id":%d,"result":{"ok":1}}' % ask.id)
    assert answer == [Answer(ask.id, {"ok": 1}, None)]
    assert session.receive(b'{"jsonrpc":"2.0","id":%d,"result":{}}' % ask.id) == []  # answered once only
