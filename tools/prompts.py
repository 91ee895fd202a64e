"""The ten prompts of COMPAT §7 and ours after them: numbered instruction lists built from the arguments.

Multi-line arguments are inserted inside fenced blocks or indented, so they never break the list."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Awaitable, Callable

from protocol.registry import PromptArgument, Registry, RequestContext
from tools.guides.guidance import Guidance, literal
from tools.state import ServerState

IMAGE_ARGS = ("image", "base")  # arguments naming an image: picked from the engine's images by default

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
    (
        "serve-and-test",
        "Start a server in a long-lived sandbox, test it from inside and from this machine, snapshot it.",
        [
            ("serve_cmd", "Command that starts the server (it keeps running).", None),
            ("port", "TCP port the server listens on.", None),
            ("test_cmd", "Command that tests the running server from inside the sandbox.", ""),
            ("image", "Image to run it in.", "ubuntu:noble"),
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


def calls(*lines: str, network: bool = False) -> str:
    """A ```calls block (tool calls an agent can make as printed) indented under a list item."""
    body = ["# needs network"] if network else []
    return fence("\n".join(body + list(lines)), "calls")


def pick_image(g: Guidance, given: str, default: str, *, python: bool = False, packages: bool = False) -> str:
    """The image a prompt uses: the caller's, else (on the embedded engine) one that exists here and has
    what the task needs, else the reference's default."""
    if given:
        return inline(given)
    if g.local:
        found = (g.python_image() if python else None) or (
            g.catalog.with_package_manager() if packages else None
        )
        return found.tag if found else g.shell_image()
    return default


def install_command(g: Guidance, image: str, packages: str) -> str:
    """How `packages` get into `image`: pip where there is pip, else the image's package manager."""
    info = next((i for i in g.catalog.images if i.tag == image), None)
    if info is not None and not info.pip:
        return info.install(packages) or f"pip install {packages}"
    return f"pip install {packages}"


def images_note(g: Guidance) -> str:
    if not g.local:
        return ""
    return f"Images on this engine (what each contains):\n\n{g.catalog.table()}\n\n"


def not_here(g: Guidance, image: str) -> str:
    """A line telling how to get `image` when the engine does not have it."""
    if not g.local or any(i.tag == image for i in g.catalog.images):
        return ""
    return (
        f"   `{image}` is not on this engine yet: import it first with import_image(registry_url="
        f'"docker://docker.io/library/{image}", tag="{image}"), or pick one from the table above.\n'
    )


def prepare_environment(g: Guidance, task: str, base: str, project: str, packages: str) -> str:
    scope = inline(project) or "common"
    purpose = purpose_from(packages)
    pkgs = inline(packages)
    image = pick_image(g, base, "python:3.11-slim", python="pip" in pkgs, packages=bool(pkgs))
    tag = f"{scope}/{purpose}/{image}"
    look = calls(f"made = list_images(tag_prefix={literal(f'{scope}/{purpose}/')})")
    see = calls(f'bins = list_files(image={literal(image)}, path="/usr/bin")')
    if pkgs:
        block = calls(
            f"env = run(command={literal(install_command(g, image, pkgs))}, image={literal(image)}, "
            "disposable=false, timeout=600)",
            f"set_tag(image_uuid=env.result_image_uuid, tag={literal(tag)})",
            network=True,
        )
        install = f"4. Install the packages (check exit_code) and tag the result:\n{block}"
    else:
        install = (
            "4. Install what the task needs with disposable=false, one step per run, then tag the result:\n"
            f"   set_tag(image_uuid=<result_image_uuid>, tag={literal(tag)})."
        )
    return f"""Prepare a reusable environment for this task, reusing existing images wherever possible.

Task:
{fence(task)}

{images_note(g)}1. Look for an environment made before; if "{tag}" is listed, use it and stop here:
{look}
2. Otherwise start from `{image}`.
{not_here(g, image)}3. See what it already has (free, no sandbox):
{see}
{install}
5. Use it: run(command=..., image="tag:{tag}").

Tagging rules: {{scope}}/{{purpose}}/{{base}}; letters, digits, '_' and '-' separated by ':', '/' or '.'.
"""


IMPORT_PYTHON = (
    'imported = import_image(registry_url="docker://docker.io/library/python:3.12-slim", '
    'tag="python:3.12-slim", i_accept_that_anonymous_access_might_be_rate_limited=true)'
)


def run_python(g: Guidance, code: str) -> str:
    steps = [f"code = upload(content={literal(code)})"]
    python = g.python_image()
    if g.local and python is not None:
        image, network, intro = python.tag, False, f"`{python.tag}` has Python {python.python}."
    else:
        image, network = "python:3.12-slim", True
        steps.insert(0, IMPORT_PYTHON)
        intro = (
            "No image on this engine has Python yet: import one (once), then run the code."
            if g.local
            else 'Find a Python image with list_images(tag_prefix="common/python"); if there is none, '
            "import python:3.12-slim as below."
        )
    steps.append(
        f'ran = run(command="python3 /tmp/main.py", image={literal(image)}, '
        'files={"/tmp/main.py": code.uuid})'
    )
    return f"""Run this Python code in an isolated sandbox.

{intro}
1. Upload the code and run it; report exit_code, stdout and stderr:
{calls(*steps, network=network)}

Code:
{fence(code, "python")}
"""


def run_shell(g: Guidance, command: str, image: str = "") -> str:
    img = pick_image(g, image, "ubuntu:noble")
    block = calls(f"result = run(command={literal(command)}, image={literal(img)})")
    return f"""Run a shell command in an isolated sandbox.

{images_note(g)}1. Run it in `{img}` and report exit_code, stdout and stderr:
{not_here(g, img)}{block}
2. Exit code 127 means the image lacks a command: pick an image that has it.

Command:
{fence(command, "bash")}
"""


def sync_and_run(g: Guidance, source: str, command: str, image: str = "") -> str:
    img = pick_image(g, image, "alpine:latest")
    has_python = any(i.tag == img and i.python for i in g.catalog.images)
    minimal = "" if has_python else f"\n   `{img}` has no Python: for Python, pick an image that has it."
    block = calls(
        f'src = rsync(source={literal(inline(source))}, destination="/app", '
        'exclude=["__pycache__", ".git", "node_modules", ".venv"])',
        f'result = run(command={literal(command)}, image={literal(img)}, directory_state_id=src, cwd="/app")',
    )
    return f"""Sync local files into a sandbox and run a command there.

{images_note(g)}1. Sync the directory, then run the command in it:{minimal}
{not_here(g, img)}{block}
2. Report exit_code, stdout and stderr.

Command:
{fence(command, "bash")}
"""


def install_packages(g: Guidance, packages: str, image: str = "") -> str:
    pkgs = inline(packages)
    img = pick_image(g, image, "ubuntu:noble", packages=True)
    tag = f"common/{purpose_from(packages)}/{img}"
    block = calls(
        f"installed = run(command={literal(install_command(g, img, pkgs))}, image={literal(img)}, "
        "disposable=false, timeout=600)",
        f"set_tag(image_uuid=installed.result_image_uuid, tag={literal(tag)})",
        network=True,
    )
    return f"""Install packages and keep the result as a reusable image.

{images_note(g)}1. Install them in `{img}` with disposable=false (check exit_code), then tag the result:
{not_here(g, img)}{block}
2. Use it later as image="tag:{tag}" (format {{scope}}/{{purpose}}/{{base}}).
"""


def parallel_tasks(g: Guidance, tasks: str, image: str = "") -> str:
    img = pick_image(g, image, "ubuntu:noble")
    lines = [t.strip() for t in tasks.splitlines() if t.strip()]
    if not lines:
        return "Run tasks in parallel: no tasks were given (pass one command per line)."
    starts = [
        f"t{i} = run(command={literal(t)}, image={literal(img)}, wait=false)" for i, t in enumerate(lines, 1)
    ]
    ids = ", ".join(f"t{i}.operation_id" for i in range(1, len(lines) + 1))
    block = calls(*starts, f'done = wait_operations(operation_ids=[{ids}], mode="all", timeout=600)')
    return f"""Run these tasks in parallel, each in its own sandbox.

1. Start every task, then wait for all of them:
{not_here(g, img)}{block}
2. Report each exit_code and output (done.results).
"""


def build_project(
    g: Guidance, source: str, install_cmd: str = "pip install -e .", test_cmd: str = "pytest"
) -> str:
    img = pick_image(g, "", "python:3.11-slim", python="pip" in install_cmd or "pytest" in test_cmd)
    block = calls(
        f'src = rsync(source={literal(inline(source))}, destination="/app")',
        f"deps = run(command={literal(install_cmd)}, image={literal(img)}, directory_state_id=src, "
        'cwd="/app", disposable=false, timeout=600)',
        f'tests = run(command={literal(test_cmd)}, image=deps.result_image_uuid, cwd="/app", timeout=600)',
    )
    return f"""Build the project and run its tests.

{images_note(g)}1. Sync the project, install its dependencies with disposable=false (a rollback point),
   then test on that image:
{not_here(g, img)}{block}
2. Check each exit_code; tag deps.result_image_uuid if you will reuse it.
"""


def debug_failure(g: Guidance, operation_id: str) -> str:
    block = calls(f"op = get_operation(operation_id={literal(inline(operation_id))})")
    return f"""Diagnose the failed operation {q(operation_id)}.

1. Read it:
{block}
2. status FAILED: the operation could not run; read 'error' (image missing, spawn failure, permissions).
   status SUCCESS with exit_code != 0: the command failed; read stderr (and stderr_tail), then stdout.
3. timed_out=true: the command hit its timeout; raise 'timeout' or split the work.
4. stdout_truncated/stderr_truncated=true: 'hint' says how to read the whole streams
   (get_operation(operation_id=..., stream="stderr", offset=...) or the stdout_resource/stderr_resource).
5. Suggest fixes: missing packages (install with disposable=false), wrong cwd, missing files (rsync/upload),
   missing environment variables (env={{...}}).
"""


def inspect_image(g: Guidance, image: str) -> str:
    img = literal(inline(image))
    block = calls(
        f'top = list_files(image={img}, path="/")',
        f'etc = list_files(image={img}, path="/etc")',
        f'users = read_file(image={img}, path="/etc/passwd", max_bytes=4000)',
        f'shells = grep(image={img}, pattern="sh$", path="/etc/passwd")',
    )
    return f"""Explore the image {q(image)}.

1. Prefer the free tools (no sandbox):
{block}
2. Only if you need to run something: run(command=..., image={img}, disposable=true).
"""


def multi_stage_build(
    g: Guidance,
    source: str,
    install_cmd: str = "pip install -e .",
    build_cmd: str = "python -m build",
    test_cmd: str = "pytest",
) -> str:
    img = pick_image(g, "", "python:3.11-slim", python="pip" in install_cmd or "python" in build_cmd)
    block = calls(
        f'src = rsync(source={literal(inline(source))}, destination="/app")',
        f"a = run(command={literal(install_cmd)}, image={literal(img)}, directory_state_id=src, "
        'cwd="/app", disposable=false, timeout=600)',
        f'b = run(command={literal(build_cmd)}, image=a.result_image_uuid, cwd="/app", disposable=false, '
        "timeout=600)",
        f'tests = run(command={literal(test_cmd)}, image=b.result_image_uuid, cwd="/app", timeout=600)',
    )
    return f"""Build in stages, keeping every stage as a rollback point.

{images_note(g)}1. Sync, install (image A), build on A (image B), test on B:
{not_here(g, img)}{block}
2. Keep A and B: if a later stage fails, fix it and rerun from the previous image instead of starting over.
"""


def serve_and_test(g: Guidance, serve_cmd: str, port: str, test_cmd: str = "", image: str = "") -> str:
    img = pick_image(g, image, "ubuntu:noble")
    number = inline(port)
    if not number.isdigit() or not 1 <= int(number) <= 65535:
        return f"Serve and test: port must be a TCP port number (1-65535), got {q(port)}."
    check = inline(test_cmd) or f"wget -qO- http://127.0.0.1:{number}/ || curl -fsS http://127.0.0.1:{number}/"
    start = calls(
        f"sb = start_sandbox(image={literal(img)})",
        f"server = exec(sandbox_id=sb.sandbox_id, command={literal(serve_cmd)}, background=true)",
    )
    test = calls(f"checked = exec(sandbox_id=sb.sandbox_id, command={literal(check)}, timeout=120)")
    ports = (
        calls(f"web = expose_port(sandbox_id=sb.sandbox_id, port={number})")
        if g.local
        else "   (The Contree cloud has no port forwarding: test from inside the sandbox only.)"
    )
    keep = (
        calls('snap = snapshot_sandbox(sandbox_id=sb.sandbox_id, tag="myproject/served/base")')
        if g.local
        else calls("kept = stop_sandbox(sandbox_id=sb.sandbox_id, commit=true)")
    )
    return f"""Run a server in a long-lived sandbox and test it while it runs.

{images_note(g)}1. Start a sandbox and the server in the background (get_process reads its output):
{not_here(g, img)}{start}
2. Test it from another process in the same sandbox (retry once after a second if it was still starting):
{test}
3. Reach it from this machine (loopback only; give the user the url):
{ports}
4. Keep the working state as an image if it is worth returning to:
{keep}
5. When done: signal_process(sandbox_id=sb.sandbox_id, process_id=server.process_id) stops the server,
   stop_sandbox(sandbox_id=sb.sandbox_id) the sandbox (it also stops by itself after ttl_seconds idle).

Server command:
{fence(serve_cmd, "bash")}
"""


# each takes the guidance and its own prompt's arguments as keywords
RENDERERS: dict[str, Callable[..., str]] = {
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
    "serve-and-test": serve_and_test,
}


def render(name: str, arguments: dict[str, str], guidance: Guidance | None = None) -> str:
    """The prompt's text for this backend; an `image`/`base` left out is picked from the images here."""
    g = guidance or Guidance()
    spec = next(p for p in PROMPTS if p[0] == name)
    values = {
        arg: arguments.get(arg) or ("" if arg in IMAGE_ARGS and g.local else default or "")
        for arg, _, default in spec[2]
    }
    return RENDERERS[name](g, **values)


def register(registry: Registry, state: ServerState) -> None:
    local = state.backend_kind == "local"
    for name, description, args in PROMPTS:
        arguments = [
            PromptArgument(
                arg,
                desc
                + (
                    " Default: an image on this engine that fits the task."
                    if local and arg in IMAGE_ARGS
                    else (f" Default: {default}." if default else "")
                ),
                default is None,
            )
            for arg, desc, default in args
        ]

        def make(prompt_name: str) -> Callable[..., Awaitable[str]]:
            async def handler(ctx: RequestContext, **kwargs: str) -> str:
                return render(prompt_name, kwargs, await state.guidance())

            return handler

        registry.prompt(name, description=description, arguments=arguments)(make(name))
