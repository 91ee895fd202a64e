"""Server instructions (`initialize.instructions`), describing the active backend truthfully."""

from __future__ import annotations

from tools.guides import GUIDES

_GUIDE_WHEN = {
    "workflow": "before the first run: the agent protocol and rules",
    "reference": "looking up a tool, parameter or resource",
    "quickstart": "copy-paste examples and defaults",
    "state": "images, disposable, lineage, rollback",
    "async": "wait=false, wait_operations, operation states",
    "tagging": "naming images for reuse",
    "errors": "a run failed or timed out",
}


def instructions(backend_kind: str) -> str:
    word = "sandbox" if backend_kind == "local" else "microVM"
    where = (
        "This server runs sandboxes on this machine with its embedded engine (crun + overlayfs): no account "
        "needed; each sandbox gets its own network namespace with outbound NAT (`networking=false` removes "
        "it); images live in the engine's home directory."
        if backend_kind == "local"
        else "This server uses a Contree API (cloud or self-hosted): each run is a microVM on the backend."
    )
    guides = "\n".join(
        f'| `contree://guide/{s}` | `get_guide(section="{s}")` | {_GUIDE_WHEN[s]} |' for s in GUIDES
    )
    return f"""# Contree: isolated sandboxes with immutable, branchable images

Tool calls are stateless. Each `run` starts an isolated {word} from an **immutable image**; a run with
`disposable=false` saves its filesystem changes as a **new image UUID**. There are no sessions: the image UUID
is the state, and any UUID can be reused, branched or rolled back to.
{where}

## Read the guides first
`get_guide(section="workflow")` or the resource `contree://guide/workflow` (sections below).

## Quick start
1. Search: `list_images(tag_prefix="common/")`, `list_images(tagged=true)`.
2. Inspect for free (no {word}): `list_files`, `read_file`, `grep`.
3. Stage files: `rsync(source="/abs/dir", destination="/app")` → `directory_state_id`; or `upload(...)` →
   file uuid.
4. One mutating step per `run` with `disposable=false`; check `exit_code` (status SUCCESS only means it ran).
5. Tag useful results at once: `set_tag(image_uuid=<result_image>, tag="project/purpose/base:tag")`.

## Rules
- Check `list_images` before `import_image`.
- Use `env={{...}}` for variables (`export` does not carry over between runs); `cwd=""` is the image default.
- `run` defaults: `disposable=true`, `wait=true`, `timeout=30`, `truncate_output_at=8000`, `shell=true`.
- Truncated output is flagged (`stdout_truncated`, `stderr_truncated`); the full streams are at
  `contree://operations/instance/<operation_id>/stdout` and `/stderr`.
- `rsync`, `upload` and `download` only touch host paths inside the server's allowed roots.

## Command map
| Group | Tools |
|---|---|
| Images | `list_images`, `get_image`, `set_tag`, `import_image`, `registry_token_obtain`, `registry_auth` |
| Execution | `run`, `get_operation`, `list_operations`, `wait_operations`, `cancel_operation` |
| Files | `rsync`, `upload`, `download` |
| Inspection (free) | `list_files`, `read_file`, `grep` |
| Info | `whoami`, `get_guide` |

## State and lineage
A chain of `disposable=false` runs forms a lineage (`contree://image/<uuid>/lineage`: parent, children,
ancestors, root, depth). Roll back by running from an earlier UUID; branch by starting several runs from the
same UUID. Untagged images may be garbage-collected: tag what you keep.

## Detached operations
`run(..., wait=false)` returns `{{"operation_id": ...}}` at once. Join with
`wait_operations(operation_ids=[...], mode="all"|"any", timeout=...)`: operations still running at the
deadline are listed in `pending` (`timed_out: true`) and keep running; nothing is cancelled unless
`cancel_pending=true`. Operations run in the engine, not in this session: they outlive it, and a later
session joins them by id. States: PENDING, ASSIGNED, EXECUTING, SUCCESS, FAILED, CANCELLED.

## Server version
`whoami()` reports `mcp_version` (and `mcp_upgrade`, always null here: this server never checks for updates).

## Built-in guides
| Resource | Tool call | Read when |
|---|---|---|
{guides}
"""
