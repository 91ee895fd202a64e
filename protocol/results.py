"""Result shapes per revision: what initialize answers, how a handler's result is carried by the request's
revision, and the input_required result of a stateless call that must ask the client first."""

from __future__ import annotations

from typing import Any

from protocol import mrtr, versions
from protocol.content import for_version
from protocol.errors import InputRequired
from protocol.events import Call
from protocol.messages import (
    CallToolResult,
    CompleteResult,
    Completion,
    GetPromptResult,
    Implementation,
    InitializeResult,
    InputRequest,
    InputRequiredResult,
    PromptMessage,
    ReadResourceResult,
    encode,
    with_fields,
)
from protocol.registry import ReadOutcome, Registry
from protocol.stateless import NO_CACHE, ResultEnvelope, wire_input

COMPLETION_LIMIT = 100


def initialize_result(r: Registry, version: str) -> InitializeResult:
    """initialize's answer: the capabilities and server identity the negotiated revision can carry."""
    changes = r.announce_list_changes
    capabilities: dict[str, Any] = {
        "tools": {"listChanged": changes},
        "resources": {"subscribe": True, "listChanged": changes},
        "prompts": {"listChanged": changes},
        "logging": {},
    }
    if versions.has_annotations(version):
        capabilities["completions"] = {}
    newest = versions.has_icons(version)
    info = Implementation(
        name=r.name,
        version=r.version or "0.0.0",
        title=r.title if versions.has_structured(version) else None,
        description=r.description if newest else None,
        website_url=r.website_url if newest else None,
    )
    return InitializeResult(version, capabilities, info, r.instructions)


def shape(call: Call, result: Any, envelope: ResultEnvelope) -> bytes:
    """A handler's result as the request's revision carries it: content the revision lacks becomes text,
    structured content only from 2025-06-18, completions capped; a stateless result gets its envelope."""
    version = call.version
    method = call.method
    hint = None
    if method == "tools/call":
        r: CallToolResult = result
        result = CallToolResult(
            for_version(r.content, version),
            r.structured_content if versions.has_structured(version) else None,
            r.is_error,
        )
    elif method == "resources/read":
        outcome: ReadOutcome = result
        result = ReadResourceResult(outcome.contents)
        # A result that depends on answers given in this exchange must not be cached (SEP-2549).
        hint = outcome.cache if not call.answers else NO_CACHE
    elif method == "prompts/get":
        prompt: GetPromptResult = result
        result = GetPromptResult(
            [PromptMessage(pm.role, for_version([pm.content], version)[0]) for pm in prompt.messages],
            prompt.description,
        )
    else:  # completion/complete
        values: list[str] = result
        result = CompleteResult(
            Completion(values[:COMPLETION_LIMIT], len(values), len(values) > COMPLETION_LIMIT)
        )
    body = encode(result)
    if call.modern:
        return envelope.wrap(body, hint)
    return body


def input_required(
    call: Call,
    asked: InputRequired,
    envelope: ResultEnvelope,
    secret: bytes,
    now: float,
    principal: str | None,
) -> bytes:
    """The input_required result: what the handler asked, and the answers so far sealed in requestState."""
    target, arguments = mrtr.binding(call.params)
    state = mrtr.seal(
        secret,
        method=call.method,
        target=target,
        arguments=arguments,
        principal=principal,
        now=now,
        answers=call.answers,
    )
    requests = {k: InputRequest(m, wire_input(m, p)) for k, (m, p) in asked.requests.items()}
    body = encode(InputRequiredResult("input_required", input_requests=requests, request_state=state))
    return with_fields(envelope.meta_member, body)
