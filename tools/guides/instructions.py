"""Server instructions (`initialize.instructions`), describing the active backend truthfully."""

from __future__ import annotations

from tools.guides import GUIDES
from tools.guides.guidance import Guidance

_GUIDE_WHEN = {
    "workflow": "before the first run: the agent protocol and rules",
    "reference": "looking up a tool, parameter or resource",
    "quickstart": "copy-paste examples and defaults",
    "state": "images, disposable, lineage, rollback, cleanup",
    "async": "wait=false, wait_operations, operation states",
    "tagging": "naming images for reuse",
    "errors": "a run failed, timed out or its output was cut",
    "sandboxes": "state between commands: servers, REPLs, exec, ports, live snapshots",
}

_TEXT = """# Contree: isolated sandboxes with immutable, branchable images

Tool calls are stateless. Each `run` starts an isolated {{SANDBOX}} from an **immutable image**; a run with
`disposable=false` saves its filesystem changes as a **new image UUID**. There are no sessions: the image UUID
is the state, and any UUID can be reused, branched or rolled back to.
<!-- if local -->
This server runs sandboxes on this machine with its embedded engine (crun + overlayfs): no account
needed; each sandbox gets its own network namespace with outbound NAT (`networking=false` removes it);
images live in the engine's home directory.

## Images here
When the server started this engine had these tagged images (`list_images(tagged=true)` for the current list):

{{IMAGES_TABLE}}

More: `import_image(registry_url="docker://docker.io/library/<name>:<tag>", tag="<name>:<tag>")` from a
registry, or `registry_url="oci-archive:/abs/image.tar"` / `"docker-archive:/abs/image.tar"` for an image
archive on this machine (inside the server's allowed roots).
<!-- end -->
<!-- if cloud -->
This server uses a Contree API (cloud or self-hosted): each run is a microVM on the backend.
<!-- end -->

## Read the guides first
`get_guide(section="workflow")` or the resource `contree://guide/workflow` (sections below).

## Quick start
<!-- if local -->
1. Pick an image from the table above, e.g. `{{SHELL_IMAGE}}`.
<!-- end -->
<!-- if cloud -->
1. Search: `list_images(tag_prefix="common/")`, `list_images(tagged=true)`.
<!-- end -->
2. Inspect for free (no {{SANDBOX}}): `list_files`, `read_file`, `grep`.
3. Stage files: `rsync(source="{{ROOT}}", destination="/app")` → `directory_state_id`; or `upload(...)` →
   file uuid.
4. One mutating step per `run` with `disposable=false`; check `exit_code` (status SUCCESS only means it ran).
5. Tag useful results at once: `set_tag(image_uuid=<result_image_uuid>, tag="project/purpose/base:tag")`.

## Rules
- Check `list_images` before `import_image`.
- Use `env={...}` for variables (`export` does not carry over between runs); `cwd=""` is the image default.
- `run` defaults: `disposable=true`, `wait=true`, `timeout=30`, `truncate_output_at=8000`, `shell=true`.
- Results stay small (about 64 KiB): a cut stream is flagged (`stdout_truncated`), its last bytes are in
  `stdout_tail` and `hint` says how to read every byte: `contree://operations/instance/<uuid>/stdout`
  (`?offset=&limit=`) or `get_operation(operation_id=<uuid>, stream="stdout", offset=...)`.
- `rsync`, `upload` and `download` only touch host paths inside the server's allowed roots.

## Command map
| Group | Tools |
|---|---|
| Images | `list_images`, `get_image`, `set_tag`, `delete_image`, `import_image` |
| Registries | `registry_token_obtain`, `registry_auth` |
| Execution | `run`, `get_operation`, `list_operations`, `wait_operations`, `cancel_operation` |
| Files | `rsync`, `upload`, `download` |
| Inspection (free) | `list_files`, `read_file`, `grep` |
| Long-lived sandboxes | `start_sandbox`, `exec`, `get_process`, `write_stdin`, `signal_process` |
| Sandbox lifecycle | `list_sandboxes`, `expose_port`, `snapshot_sandbox`, `stop_sandbox` |
| Info | `whoami`, `get_guide` |

## State and lineage
A chain of `disposable=false` runs forms a lineage (`contree://image/<uuid>/lineage`: parent, children,
ancestors, and what made each). Roll back by running from an earlier UUID; branch by starting several runs
from the same UUID.
<!-- if local -->
Images stay until deleted: `delete_image` removes an untagged one nothing needs; `whoami()` shows
`disk_usage`.
<!-- end -->
<!-- if cloud -->
Untagged images may be garbage-collected by the service: tag what you keep.
<!-- end -->

## Detached operations
`run(..., wait=false)` returns `{"operation_id": ...}` at once. Join with
`wait_operations(operation_ids=[...], mode="all"|"any", timeout=...)`: operations still running at the
deadline are listed in `pending` (`timed_out: true`) and keep running; nothing is cancelled unless
`cancel_pending=true`. Operations run in the engine, not in this session: they outlive it, and a later
session joins them by id. States: PENDING, ASSIGNED, EXECUTING, SUCCESS, FAILED, CANCELLED.

## Long-lived sandboxes
When commands need state that lives between them (a dev server or database to test against, a REPL),
`start_sandbox` keeps a {{SANDBOX}} running and `exec` runs commands in it; it stops after `ttl_seconds`
idle or with `stop_sandbox`. See `get_guide(section="sandboxes")`.

## Server version
`whoami()` reports `mcp_version` (and `mcp_upgrade`, always null here: this server never checks for updates).

## Built-in guides
| Resource | Tool call | Read when |
|---|---|---|
"""


def instructions(guidance: Guidance) -> str:
    guides = "\n".join(
        f'| `contree://guide/{s}` | `get_guide(section="{s}")` | {_GUIDE_WHEN[s]} |' for s in GUIDES
    )
    return guidance.render(_TEXT) + guides + "\n"
