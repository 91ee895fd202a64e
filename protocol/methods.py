"""Which methods each protocol era knows, and what answering them takes (the tables the session routes by)."""

from __future__ import annotations

# Handshake-era methods answered at once from session state.
SYNC_METHODS = frozenset(
    {
        "ping",
        "initialize",
        "logging/setLevel",
        "tools/list",
        "resources/list",
        "resources/templates/list",
        "prompts/list",
        "resources/subscribe",
        "resources/unsubscribe",
    }
)
# Methods whose answer needs a handler (both eras).
HANDLER_METHODS = frozenset({"tools/call", "resources/read", "prompts/get", "completion/complete"})
# 2026-07-28 methods answered at once; `initialize`, `ping`, `logging/setLevel`, `resources/(un)subscribe`,
# `tasks/result` and `tasks/list` do not exist there.
MODERN_SYNC = frozenset(
    {
        "server/discover",
        "tools/list",
        "resources/list",
        "resources/templates/list",
        "prompts/list",
        "tasks/get",
        "tasks/update",
        "tasks/cancel",
    }
)
MODERN_METHODS = MODERN_SYNC | HANDLER_METHODS | {"subscriptions/listen"}
# Methods that may answer with input_required (SEP-2322).
MRTR_METHODS = frozenset({"tools/call", "resources/read", "prompts/get"})
LIST_KINDS = {
    "tools/list": "tools",
    "resources/list": "resources",
    "resources/templates/list": "resources/templates",
    "prompts/list": "prompts",
}
CAPABILITY_FOR = {
    "sampling/createMessage": "sampling",
    "elicitation/create": "elicitation",
    "roots/list": "roots",
}
LIST_CHANGED = {
    "tools": "notifications/tools/list_changed",
    "resources": "notifications/resources/list_changed",
    "prompts": "notifications/prompts/list_changed",
}
