"""The sans-IO core on its own: plain calls, no event loop (the h11 model)."""

from __future__ import annotations

import msgspec

from protocol.catalog import Catalog
from protocol.conformance import build_registry
from protocol.messages import Invalid, Notification, Request, Response
from protocol.session import Session

INIT = (
    b'{"jsonrpc":"2.0","id":1,"method":"initialize",'
    b'"params":{"protocolVersion":"2025-03-26","capabilities":{}}}'
)


def _session() -> Session:
    registry = build_registry()
    return Session(registry, Catalog(registry, page_size=2))


def _answer(session: Session, data: bytes) -> dict[str, object]:
    frame = session.parse(data)
    [message] = frame.messages
    assert isinstance(message, Request)
    reply = session.precheck(message) or session.handle_sync(message)
    return msgspec.json.decode(reply)  # type: ignore[no-any-return]


def test_parse_classifies_each_message_kind() -> None:
    session = _session()
    assert isinstance(session.parse(b'{"jsonrpc":"2.0","id":1,"method":"ping"}').messages[0], Request)
    assert isinstance(session.parse(b'{"jsonrpc":"2.0","method":"n"}').messages[0], Notification)
    assert isinstance(session.parse(b'{"jsonrpc":"2.0","id":1,"result":{}}').messages[0], Response)
    assert isinstance(session.parse(b'{"jsonrpc":"2.0","id":1}').messages[0], Invalid)


def test_initialize_sets_state_and_answers_bytes() -> None:
    session = _session()
    reply = _answer(session, INIT)
    assert reply["result"]["protocolVersion"] == "2025-03-26"  # type: ignore[index]
    assert session.protocol_version == "2025-03-26"


def test_client_info_and_capabilities_are_kept() -> None:
    session = _session()
    _answer(
        session,
        b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25",'
        b'"capabilities":{"sampling":{}},"clientInfo":{"name":"c","version":"2"}}}',
    )
    assert session.client_capabilities == {"sampling": {}}
    assert session.client_info == {"name": "c", "version": "2"}


def test_initialized_notification_is_recorded() -> None:
    session = _session()
    [note] = session.parse(b'{"jsonrpc":"2.0","method":"notifications/initialized"}').messages
    assert isinstance(note, Notification)
    assert session.notification(note) is None and session.initialized


def test_cancelled_notification_names_the_request() -> None:
    session = _session()
    [note] = session.parse(
        b'{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":"a"}}'
    ).messages
    assert isinstance(note, Notification)
    assert session.notification(note) == "a"


def test_batch_allowed_only_while_the_version_allows_it() -> None:
    session = _session()
    batch = b'[{"jsonrpc":"2.0","id":2,"method":"ping"}]'
    assert session.parse(batch).error_reply is None  # before initialize: version unknown
    _answer(session, INIT)
    assert session.parse(batch).error_reply is None  # 2025-03-26 must accept
    later = _session()
    _answer(later, INIT.replace(b"2025-03-26", b"2025-06-18"))
    assert later.parse(batch).error_reply is not None


def test_list_pages_are_cached_bytes() -> None:
    session = _session()
    _answer(session, INIT)
    first = session.catalog.page("tools", "2025-03-26", None)
    assert session.catalog.page("tools", "2025-03-26", None) is first
    assert session.catalog.page("tools", "2025-11-25", None) is not first


def test_log_threshold() -> None:
    session = _session()
    assert not session.log_enabled("emergency")
    session.set_level("warning")
    assert session.log_enabled("error") and not session.log_enabled("info")
