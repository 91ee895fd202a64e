"""The ten prompts of COMPAT §7: numbered instruction lists built from the arguments.

Multi-line arguments are inserted inside fenced blocks or indented, so they never break the list."""

from __future__ import annotations

import re
import textwrap

from protocol.registry import PromptArgument, Registry, RequestContext
from tools.state import ServerState

PROMPTS: list[tuple[str, str, list[tuple[str, str, str | None]]]] = [
    (
        "prepare-environment",
        "Prepare a container environment for a task, checking for existing images first.",
        [
            ("task", "What the environment is for.", None),
            ("base", "Base image reference.", "python:3.11-slim"),
            ("project", "Project scope for the tag (else 'common').", ""),
            ("packages", "Packages to install, separated by spaces.", ""),
        ],
    ),
    ("run-python", "Run Python code in an isolated container.", [("code", "Python source to run.", None)]),
    (
        "run-shell",
        "Run a shell command in an isolated container.",
        [("command", "Shell command to run.", None), ("image", "Image to run it in.", "ubuntu:noble")],
    ),
    (
        "sync-and-run",
        "Sync local files to container and run a command.",
        [
            ("source", "Absolute host directory to sync.", None),
            ("command", "Command to run in /app.", None),
            ("image", "Image to run it in.", "alpine:latest"),
        ],
    ),
    (
        "install-packages",
        "Install packages and create a reusable image.",
        [("packages", "Packages to install.", None), ("image", "Base image.", "ubuntu:noble")],
    ),
    (
        "parallel-tasks",
        "Run multiple tasks in parallel.",
        [("tasks", "Commands, one per line.", None), ("image", "Image to run them in.", "ubuntu:noble")],
    ),
    (
        "build-project",
        "Build a project: install dependencies and run tests.",
        [
            ("source", "Absolute host directory of the project.", None),
            ("install_cmd", "Dependency installation command.", "pip install -e ."),
            ("test_cmd", "Test command.", "pytest"),
        ],
    ),
    (
        "debug-failure",
        "Diagnose a failed command and suggest fixes.",
        [("operation_id", "The failed operation.", None)],
    ),
    ("inspect-image", "Explore the contents of a container image.", [("image", "Image to explore.", None)]),
    (
        "multi-stage-build",
        "Multi-stage build with rollback points.",
        [
            ("source", "Absolute host directory of the project.", None),
            ("install_cmd", "Dependency installation command.", "pip install -e ."),
            ("build_cmd", "Build command.", "python -m build"),
            ("test_cmd", "Test command.", "pytest"),
        ],
    ),
]


def fence(text: str, lang: str = "") -> str:
    """A fenced block indented under a list item; the fence outgrows any backticks inside."""
    ticks = "`" * max(3, max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    body = textwrap.indent(text.strip("\n"), "   ")
    return f"   {ticks}{lang}\n{body}\n   {ticks}"


def inline(text: str) -> str:
    """One-line rendering of a value used inside a sentence or a call."""
    return " ".join(text.split())


def q(text: str) -> str:
    """A double-quoted string literal for tool-call examples."""
    return '"' + inline(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


def purpose_from(packages: str) -> str:
    words = packages.split()
    if not words:
        return "custom-env"
    first = re.split(r"[=<>!~\[;@ ]", words[0], maxsplit=1)[0].strip().lower()
    first = re.sub(r"[^a-z0-9_-]", "-", first).strip("-")
    return f"{first}-env" if first else "custom-env"


def image_name(image: str) -> str:
    return inline(image).split(":", 1)[0]


def prepare_environment(task: str, base: str, project: str, packages: str) -> str:
    scope = inline(project) or "common"
    purpose = purpose_from(packages)
    tag = f"{scope}/{purpose}/{inline(base)}"
    pkgs = inline(packages)
    install = (
        f"run(command={q('pip install ' + pkgs)}, image=<base image>, disposable=false)"
        if pkgs
        else "run(command=<install what the task needs>, image=<base image>, disposable=false)"
    )
    return f"""Prepare a reusable environment for this task, reusing existing images wherever possible.

Task:
{fence(task)}

1. Look for an existing environment: list_images(tag_prefix="{scope}/"). If "{tag}" exists, use it and stop
   here.
2. Look for a base image: list_images(tag_prefix="{image_name(base)}") and list_images(tag_prefix="common/").
3. If no Python image exists but an Ubuntu/Debian one does, install Python there once with disposable=false
   and tag it (e.g. "common/python/ubuntu:noble").
4. Only as a last resort: import_image(registry_url="docker://docker.io/library/{inline(base)}",
   tag="{inline(base)}").
5. Install the packages: {install}.
   Check exit_code before going on.
6. Tag the result: set_tag(image_uuid=<result_image>, tag="{tag}").
7. Use it: run(command=..., image="tag:{tag}").

Tagging rules: {{scope}}/{{purpose}}/{{base}}; letters, digits, '_' and '-' separated by ':', '/' or '.'.
"""


def run_python(code: str) -> str:
    return f"""Run this Python code in an isolated sandbox.

1. Find a Python image: list_images(tag_prefix="common/python"), then list_images(tag_prefix="python").
2. If none, look for list_images(tag_prefix="ubuntu") and install Python once:
   run(command="apt-get update && apt-get install -y python3", image=<ubuntu image>, disposable=false),
   then set_tag(image_uuid=<result_image>, tag="common/python/ubuntu:22.04").
3. Last resort: import_image(registry_url="docker://docker.io/library/ubuntu:22.04", tag="ubuntu:22.04").
4. Upload the code with upload(content=<the code>) and run it:
   run(command="python3 /tmp/main.py", image=<python image>, files={{"/tmp/main.py": "<uuid>"}}).

Code:
{fence(code, "python")}
"""


def run_shell(command: str, image: str = "ubuntu:noble") -> str:
    img = inline(image)
    return f"""Run a shell command in an isolated sandbox.

1. Find the image: list_images(tag_prefix="{image_name(img)}").
2. Use its UUID, or image="tag:{img}" when it is tagged.
3. Last resort: import_image(registry_url="docker://docker.io/library/{img}", tag="{img}").
4. Run the command with run(command=<the command>, image=<image>) and report exit_code, stdout and stderr.

Command:
{fence(command, "bash")}
"""


def sync_and_run(source: str, command: str, image: str = "alpine:latest") -> str:
    img = inline(image)
    return f"""Sync local files into a sandbox and run a command there.

1. rsync(source={q(source)}, destination="/app", exclude=["__pycache__", ".git", "node_modules", ".venv"])
   → directory_state_id.
2. Pick an image that has what the command needs: list_images(tag_prefix="common/"); the default
   "{img}" is a minimal image (no Python): prefer a Python image when the command runs Python.
3. run(command=<the command>, image=<image>, directory_state_id=<id>, cwd="/app").

Command:
{fence(command, "bash")}
"""


def install_packages(packages: str, image: str = "ubuntu:noble") -> str:
    img = inline(image)
    return f"""Install packages and keep the result as a reusable image.

1. Find the base image: list_images(tag_prefix="{image_name(img)}").
2. run(command={q("pip install " + inline(packages))}, image=<base image>, disposable=false); check exit_code.
3. Use result_image directly, or tag it: set_tag(image_uuid=<result_image>, tag=...),
   e.g. "common/python/ubuntu:noble" (format {{scope}}/{{purpose}}/{{base}}).
"""


def parallel_tasks(tasks: str, image: str = "ubuntu:noble") -> str:
    lines = [t.strip() for t in tasks.splitlines() if t.strip()]
    listed = "\n".join(f"   - {q(t)}" for t in lines) or "   (no tasks given)"
    return f"""Run these tasks in parallel, each in its own sandbox.

1. Make sure the image exists: list_images(tag_prefix="{image_name(image)}").
2. Start every task with run(command=<task>, image=<image>, wait=false) and keep the operation_ids:
{listed}
3. wait_operations(operation_ids=[...], mode="all") and report each exit_code and output.
"""


def build_project(source: str, install_cmd: str = "pip install -e .", test_cmd: str = "pytest") -> str:
    return f"""Build the project and run its tests.

1. rsync(source={q(source)}, destination="/app") → directory_state_id.
2. Pick an image with the right toolchain: list_images(tag_prefix="common/").
3. Install dependencies: run(command={q(install_cmd)}, image=<image>, directory_state_id=<id>, cwd="/app",
   disposable=false) → result_image (tag it if you will reuse it).
4. Test on the dependencies image: run(command={q(test_cmd)}, image=<result_image>, cwd="/app").
"""


def debug_failure(operation_id: str) -> str:
    return f"""Diagnose the failed operation {q(operation_id)}.

1. get_operation(operation_id={q(operation_id)}).
2. status FAILED: the operation could not run; read 'error' (image missing, spawn failure, permissions).
   status SUCCESS with exit_code != 0: the command failed; read stderr, then stdout.
3. timed_out=true: the command hit its timeout; raise 'timeout' or split the work.
4. stdout_truncated/stderr_truncated=true: read the full streams from stdout_resource/stderr_resource.
5. Suggest fixes: missing packages (install with disposable=false), wrong cwd, missing files (rsync/upload),
   missing environment variables (env={{...}}).
"""


def inspect_image(image: str) -> str:
    return f"""Explore the image {q(image)}.

1. Prefer the free tools: list_files(image={q(image)}, path="/"), read_file(...) and grep(...).
2. Only if you need to run something: run(command=..., image={q(image)}, disposable=true).
"""


def multi_stage_build(
    source: str,
    install_cmd: str = "pip install -e .",
    build_cmd: str = "python -m build",
    test_cmd: str = "pytest",
) -> str:
    return f"""Build in stages, keeping every stage as a rollback point.

1. rsync(source={q(source)}, destination="/app") → directory_state_id.
2. Install: run(command={q(install_cmd)}, image=<image>, directory_state_id=<id>, cwd="/app",
   disposable=false)
   → image A.
3. Build: run(command={q(build_cmd)}, image=<A>, cwd="/app", disposable=false) → image B.
4. Test: run(command={q(test_cmd)}, image=<B>, cwd="/app").
5. Keep A and B: if a later stage fails, fix it and rerun from the previous image instead of starting over.
"""


RENDERERS = {
    "prepare-environment": prepare_environment,
    "run-python": run_python,
    "run-shell": run_shell,
    "sync-and-run": sync_and_run,
    "install-packages": install_packages,
    "parallel-tasks": parallel_tasks,
    "build-project": build_project,
    "debug-failure": debug_failure,
    "inspect-image": inspect_image,
    "multi-stage-build": multi_stage_build,
}


def render(name: str, arguments: dict[str, str]) -> str:
    spec = next(p for p in PROMPTS if p[0] == name)
    values = {arg: arguments.get(arg) or (default or "") for arg, _, default in spec[2]}
    return RENDERERS[name](**values)  # type: ignore[operator]


def register(registry: Registry, state: ServerState) -> None:
    for name, description, args in PROMPTS:
        arguments = [
            PromptArgument(arg, f"{desc}" + (f" Default: {default}." if default else ""), default is None)
            for arg, desc, default in args
        ]

        def make(prompt_name: str):
            async def handler(ctx: RequestContext, **kwargs: str) -> str:
                return render(prompt_name, kwargs)

            return handler

        registry.prompt(name, description=description, arguments=arguments)(make(name))
