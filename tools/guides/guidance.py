"""Guidance rendered for the backend in use: guides, instructions, prompts and docs examples.

Texts are markdown with `{{NAME}}` values and `<!-- if FLAG -->` … `<!-- end -->` blocks (not nested).
On the embedded engine the values come from the images that exist (`tools.guides.catalog`), so every example
names a real image; flags: `local` or `cloud`, `python` (an image with Python exists), `packages` (an
image with a package manager exists). Examples an agent can run are fenced as ```calls: tool calls in
Python call syntax, `name = tool(...)` binding a result whose fields later calls use (`made.uuid`).
"""

from __future__ import annotations

import json
import re

import msgspec

from contree.api import Model
from tools.guides.catalog import Catalog, ImageInfo

_BLOCK = re.compile(r"<!-- if (!?[a-z]+) -->\n?(.*?)<!-- end -->\n?", re.S)
_VALUE = re.compile(r"\{\{([A-Z_]+)\}\}")

# What the cloud guides show: images a Contree account can import (they are not listed here).
CLOUD_SHELL_IMAGE = "alpine:3.20"
CLOUD_PYTHON_IMAGE = "python:3.12-slim"


class Guidance(Model):
    backend_kind: str = "contree"
    catalog: Catalog = msgspec.field(default_factory=Catalog)
    root: str = "/abs/path/project"  # a host directory rsync/upload/download may use

    @property
    def local(self) -> bool:
        return self.backend_kind == "local"

    def shell_image(self) -> str:
        found = self.catalog.with_shell()
        return found.tag if found else ("busybox:latest" if self.local else CLOUD_SHELL_IMAGE)

    def python_image(self) -> ImageInfo | None:
        return self.catalog.with_python()

    def values(self) -> dict[str, str]:
        python = self.python_image()
        packages = self.catalog.with_package_manager()
        pip = "has pip" if python and python.pip else "has no pip (its package manager installs python3-pip)"
        return {
            "SANDBOX": "sandbox" if self.local else "microVM",
            "SHELL_IMAGE": self.shell_image(),
            "PY_IMAGE": python.tag if python else CLOUD_PYTHON_IMAGE,
            "PY_PIP": pip if python else "",
            "PKG_IMAGE": packages.tag if packages else "",
            "PKG_INSTALL": (packages.install("curl") or "") if packages else "",
            "ROOT": self.root,
            "IMAGES_TABLE": self.catalog.table(),
        }

    def flags(self) -> set[str]:
        flags = {"local" if self.local else "cloud"}
        if self.python_image() is not None or not self.local:
            flags.add("python")
        if self.catalog.with_package_manager() is not None:
            flags.add("packages")
        return flags

    def render(self, text: str) -> str:
        flags = self.flags()

        def block(match: re.Match[str]) -> str:
            flag = match.group(1)
            wanted = flag[1:] not in flags if flag.startswith("!") else flag in flags
            return match.group(2) if wanted else ""

        values = self.values()
        return _VALUE.sub(lambda m: values[m.group(1)], _BLOCK.sub(block, text))


def literal(value: str) -> str:
    """A string as a literal in a ```calls example (valid JSON and Python alike)."""
    return json.dumps(value, ensure_ascii=False)


# One example per tool for the docs site (```calls notation, rendered per backend like the guides).
TOOL_EXAMPLES: dict[str, str] = {
    "list_images": "list_images(tagged=true)",
    "registry_token_obtain": 'registry_token_obtain(registry_url="ghcr.io")',
    "registry_auth": (
        '# needs network\nregistry_auth(registry_url="ghcr.io", username="me", token="<your PAT>")'
    ),
    "import_image": (
        "# needs network\n"
        'import_image(registry_url="docker://docker.io/library/alpine:3.20", tag="alpine:3.20", '
        "i_accept_that_anonymous_access_might_be_rate_limited=true)"
    ),
    "get_image": 'get_image(image="{{SHELL_IMAGE}}")',
    "set_tag": (
        'made = run(command="echo v1 > /version", image="{{SHELL_IMAGE}}", disposable=false)\n'
        'set_tag(image_uuid=made.result_image_uuid, tag="docs/example/base:1")'
    ),
    "run": 'run(command="uname -a && id", image="{{SHELL_IMAGE}}")',
    "rsync": 'rsync(source="{{ROOT}}", destination="/src")',
    "upload": 'upload(content="echo hello\\n")',
    "download": (
        'download(image="{{SHELL_IMAGE}}", path="/etc/passwd", destination="{{ROOT}}/contree-passwd.txt")'
    ),
    "get_operation": (
        'op = run(command="echo hi", image="{{SHELL_IMAGE}}", wait=false)\n'
        "get_operation(operation_id=op.operation_id)"
    ),
    "list_operations": 'list_operations(status="failed", since="1h")',
    "wait_operations": (
        'a = run(command="sleep 1", image="{{SHELL_IMAGE}}", wait=false)\n'
        'b = run(command="echo b", image="{{SHELL_IMAGE}}", wait=false)\n'
        "wait_operations(operation_ids=[a.operation_id, b.operation_id], timeout=60)"
    ),
    "cancel_operation": (
        'slow = run(command="sleep 60", image="{{SHELL_IMAGE}}", wait=false)\n'
        "cancel_operation(operation_id=slow.operation_id)"
    ),
    "whoami": "whoami()",
    "list_files": 'list_files(image="{{SHELL_IMAGE}}", path="/etc")',
    "read_file": 'read_file(image="{{SHELL_IMAGE}}", path="/etc/passwd")',
    "grep": 'grep(image="{{SHELL_IMAGE}}", pattern="^root:", path="/etc")',
    "get_guide": 'get_guide(section="workflow")',
    "delete_image": (
        'scratch = run(command="echo x > /x", image="{{SHELL_IMAGE}}", disposable=false)\n'
        "delete_image(image=scratch.result_image_uuid)"
    ),
    # long-lived sandboxes: each example stops the sandbox it started
    "start_sandbox": (
        'sb = start_sandbox(image="{{SHELL_IMAGE}}", env={"STAGE": "dev"}, ttl_seconds=600)\n'
        "stop_sandbox(sandbox_id=sb.sandbox_id)"
    ),
    "exec": (
        'sb = start_sandbox(image="{{SHELL_IMAGE}}")\n'
        'exec(sandbox_id=sb.sandbox_id, command="echo kept > /tmp/state")\n'
        'exec(sandbox_id=sb.sandbox_id, command="cat /tmp/state")\n'
        "stop_sandbox(sandbox_id=sb.sandbox_id)"
    ),
    "write_stdin": (
        'sb = start_sandbox(image="{{SHELL_IMAGE}}")\n'
        'p = exec(sandbox_id=sb.sandbox_id, command="cat", shell=false, background=true)\n'
        'write_stdin(sandbox_id=sb.sandbox_id, process_id=p.process_id, data="hello\\n", close=true)\n'
        "stop_sandbox(sandbox_id=sb.sandbox_id)"
    ),
    "signal_process": (
        'sb = start_sandbox(image="{{SHELL_IMAGE}}")\n'
        'p = exec(sandbox_id=sb.sandbox_id, command="sleep 600", background=true)\n'
        'signal_process(sandbox_id=sb.sandbox_id, process_id=p.process_id, signal="TERM")\n'
        "stop_sandbox(sandbox_id=sb.sandbox_id)"
    ),
    "get_process": (
        'sb = start_sandbox(image="{{SHELL_IMAGE}}")\n'
        'p = exec(sandbox_id=sb.sandbox_id, command="sleep 1; echo done", background=true)\n'
        "get_process(sandbox_id=sb.sandbox_id, process_id=p.process_id, wait=10)\n"
        "stop_sandbox(sandbox_id=sb.sandbox_id)"
    ),
    "expose_port": (
        'sb = start_sandbox(image="{{SHELL_IMAGE}}")\n'
        'web = exec(sandbox_id=sb.sandbox_id, command="mkdir -p /www && echo hi > /www/index.html && '
        'exec busybox httpd -f -p 8080 -h /www", background=true)\n'
        "expose_port(sandbox_id=sb.sandbox_id, port=8080)\n"
        "stop_sandbox(sandbox_id=sb.sandbox_id)"
    ),
    "snapshot_sandbox": (
        'sb = start_sandbox(image="{{SHELL_IMAGE}}")\n'
        'exec(sandbox_id=sb.sandbox_id, command="echo live > /state")\n'
        "snap = snapshot_sandbox(sandbox_id=sb.sandbox_id)\n"
        'read_file(image=snap.image, path="/state")\n'
        "stop_sandbox(sandbox_id=sb.sandbox_id)"
    ),
    "stop_sandbox": (
        'sb = start_sandbox(image="{{SHELL_IMAGE}}")\n'
        'exec(sandbox_id=sb.sandbox_id, command="echo v2 > /version")\n'
        "stop_sandbox(sandbox_id=sb.sandbox_id, commit=true)"
    ),
    "list_sandboxes": "list_sandboxes()",
}
