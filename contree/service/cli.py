"""`contree-mcp engine serve | stop | status`: run, stop and inspect a home's engine service."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import msgspec

from contree.engine.runtime.limits import LimitConfigError, ResourceSettings, arguments_for, settings_from
from contree.engine.runtime.limits import add_arguments as add_limit_arguments
from contree.units import parse_size

IDLE_EXIT_ENV = "CONTREE_ENGINE_IDLE_EXIT"
DEFAULT_IDLE_EXIT = "10m"
EXIT_NOT_RUNNING = 3
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float | None:
    """`600`, `600s`, `10m`, `2h`, `1d`; `0` or `never` = no limit (None)."""
    value = text.strip().lower()
    if value in ("never", "off", "0", "0s"):
        return None
    unit = value[-1] if value and value[-1] in _UNITS else "s"
    number = value[:-1] if value and value[-1] in _UNITS else value
    try:
        seconds = float(number) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (use e.g. 600, 30s, 10m, 2h or never)"
        ) from None
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"a duration cannot be negative: {text!r}")
    return seconds


def engine_arguments(output_quota: int | None, resources: ResourceSettings | None = None) -> list[str]:
    """`engine serve` flags for engine settings given to an MCP server or serve-api: they are the
    service's, so a client hands them on to a service it starts."""
    out = [] if output_quota is None else ["--output-quota", str(output_quota)]
    return out + (arguments_for(resources) if resources is not None else [])


def _group_id(name: str) -> int:
    import grp

    return int(name) if name.isdigit() else grp.getgrnam(name).gr_gid


def _socket_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", type=Path, default=None,
                        help="the service on this socket (e.g. the shared /run/contree-engine/engine.sock)")


def _home(value: Path | None) -> Path:
    from contree.config import engine_home

    return (value.expanduser() if value else engine_home(os.environ)).absolute()


def _home_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--home",
        type=Path,
        default=None,
        help="engine state directory (default: $CONTREE_ENGINE_HOME, else $XDG_DATA_HOME/contree-mcp)",
    )


# ---------------------------------------------------------------------- serve


def serve_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="contree-mcp engine serve",
        description="Run the embedded engine as this home's service on HOME/engine.sock (what MCP servers "
        "start on demand and share). It exits after --idle-exit without clients and work.",
    )
    _home_argument(parser)
    parser.add_argument(
        "--idle-exit",
        type=parse_duration,
        default=parse_duration(os.environ.get(IDLE_EXIT_ENV) or DEFAULT_IDLE_EXIT),
        metavar="DURATION",
        help=f"exit after this long with no client, operation or long-lived sandbox (default "
        f"{DEFAULT_IDLE_EXIT}, env {IDLE_EXIT_ENV}; 'never' keeps it running)",
    )
    parser.add_argument(
        "--detach",
        action="store_true",
        help="start in the background (own session, output to HOME/engine.log); returns once it is "
        "ready, printing 'ready SOCKET' (exit 0), 'busy WHY' (exit 3: another engine holds the home) or "
        "the reason it could not start on stderr (exit 1)",
    )
    parser.add_argument(
        "--output-quota",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="stdout+stderr bytes one run may store, e.g. 512M (default 1G); the rest is counted, not kept",
    )
    add_limit_arguments(parser)
    parser.add_argument(
        "--log-level", default="info", choices=("critical", "error", "warning", "info", "debug")
    )
    parser.add_argument(
        "--socket",
        type=Path,
        default=None,
        help="listen on this socket instead of HOME/engine.sock (the machine's shared service: "
        "/run/contree-engine/engine.sock, which users' MCP servers look for)",
    )
    parser.add_argument(
        "--socket-group",
        default=None,
        metavar="GROUP",
        help="members of GROUP may connect (socket mode 0660): the right to run sandboxes on this engine, "
        "not host root; its members share its images and operations",
    )
    parser.add_argument(
        "--cgroup-scope",
        action="store_true",
        help="rootless engine: this process's cgroup (v2) was delegated to it alone, e.g. "
        "`systemd-run --user --scope -p Delegate=yes contree-mcp engine serve --cgroup-scope`: sandboxes "
        "get memory, CPU and pids limits there",
    )
    parser.add_argument("--start-timeout", type=float, default=120.0, help=argparse.SUPPRESS)
    # version-skew tests: pretend to be another release / control API level
    parser.add_argument("--report-version", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--report-api", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    home = _home(args.home)
    try:
        resources = settings_from(args)
    except LimitConfigError as exc:
        print(f"contree-mcp engine serve: {exc}", file=sys.stderr)
        return 2
    created_home = not home.exists()
    socket_group = None
    if args.socket_group is not None:
        try:
            socket_group = _group_id(args.socket_group)
        except KeyError:
            parser.error(f"--socket-group: no group {args.socket_group!r}")
        if os.geteuid() != 0:
            parser.error("--socket-group is for the root engine service (a rootless engine is its user's)")
    socket = args.socket.absolute() if args.socket is not None else None
    if args.detach:
        from contree.service.daemon import DetachError, detach

        try:
            pipe = detach(home, timeout=args.start_timeout)
        except DetachError as exc:
            print(exc, file=sys.stderr)  # like the child's errors: the reason alone, for the starter
            return 1
        report = pipe.report
    else:

        def report(kind: str, message: str) -> None:
            if kind == "ready":
                print(f"engine service ready at {message}", flush=True)
            elif kind == "busy":
                print(
                    f"contree-mcp engine serve: an engine is already running at {home} "
                    f"(see contree-mcp engine status --home {home})",
                    file=sys.stderr,
                )
            else:
                print(f"contree-mcp engine serve: the engine at {home} could not start: {message}",
                      file=sys.stderr)

    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s [%(levelname)s] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if os.geteuid() != 0:  # the rootless engine: its own user, mount and pid namespaces first
        from contree.engine.runtime.rootless.namespaces import NamespaceError, enter

        try:
            plan = enter(home, close_in_supervisors=[pipe.fd] if args.detach else [],
                         cgroup_scope=args.cgroup_scope)
        except (NamespaceError, OSError) as exc:
            report("error", f"cannot start the rootless engine: {exc}")
            return 1
        logging.getLogger("contree.service").info("rootless engine: %s", plan.describe())
    import asyncio

    from contree.engine.local import EngineLimits, LocalEngine
    from contree.service.server import EngineService

    async def run() -> int:
        quota = {} if args.output_quota is None else {"output_quota_bytes": args.output_quota}
        limits = EngineLimits(resources=resources, **quota)
        service = EngineService(
            home, idle_exit=args.idle_exit, version=args.report_version, created_home=created_home,
            socket=socket, socket_group=socket_group,
            # A shared service reads local image archives for no one (its clients' roots: app.py).
            engine=LocalEngine(home, limits=limits, import_roots=() if socket_group is not None else None),
            **({"api": args.report_api} if args.report_api is not None else {}),
        )
        return await service.serve(report)

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        return 0


# ---------------------------------------------------------------------- stop


def stop_main(argv: Sequence[str] | None = None) -> int:
    from contree.service.control import ControlConnection, ControlError, ServiceGone, ServiceUnresponsive

    parser = argparse.ArgumentParser(
        prog="contree-mcp engine stop",
        description="Stop this home's engine service. It refuses new work and waits for running operations "
        "to finish, unless --now (then they are cancelled). Returns once the service has exited.",
    )
    _home_argument(parser)
    _socket_argument(parser)
    parser.add_argument("--now", action="store_true", help="cancel running operations instead of waiting")
    parser.add_argument(
        "--timeout", type=float, default=None, help="give up waiting after this many seconds (exit 1)"
    )
    args = parser.parse_args(argv)
    home = _home(args.home)
    try:
        conn = ControlConnection(home, pin=True, socket=args.socket)
    except ServiceGone:
        print(f"no engine service is running at {home}")
        return 0
    except ServiceUnresponsive as exc:
        print(f"contree-mcp engine stop: {exc}; try again", file=sys.stderr)
        return 1
    with conn:
        try:
            status = conn.stop("now" if args.now else "drain")
        except (ControlError, ServiceGone, ServiceUnresponsive) as exc:
            print(f"contree-mcp engine stop: {exc}", file=sys.stderr)
            return 1
        work = status.running_operations + status.pending_operations
        if work and not args.now:
            print(f"waiting for {work} operations to finish (--now cancels them)", flush=True)
        try:
            stopped = conn.wait_exit(args.timeout)
        except KeyboardInterrupt:
            print("\nstill stopping in the background", file=sys.stderr)
            return 130
    if not stopped:
        print(f"the engine at {home} is still stopping after {args.timeout:g} s", file=sys.stderr)
        return 1
    print(f"stopped the engine service at {home}")
    return 0


# ---------------------------------------------------------------------- status


def status_main(argv: Sequence[str] | None = None) -> int:
    import json  # only for --json

    from contree.service.control import ServiceUnresponsive, probe

    parser = argparse.ArgumentParser(
        prog="contree-mcp engine status",
        description=f"Show this home's engine service: pid, version, uptime, clients, running operations and "
        f"its socket. Exit status {EXIT_NOT_RUNNING} when none is running.",
    )
    _home_argument(parser)
    _socket_argument(parser)
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    args = parser.parse_args(argv)
    home = _home(args.home)
    try:
        status = probe(home, socket=args.socket)
    except ServiceUnresponsive as exc:
        print(f"contree-mcp engine status: {exc}", file=sys.stderr)
        return 1
    if status is None:
        if args.json:
            print(json.dumps({"running": False, "home": str(home)}))
        else:
            print(f"no engine service is running at {home}")
        return EXIT_NOT_RUNNING
    if args.json:
        print(json.dumps({"running": True, **msgspec.to_builtins(status)}, indent=2))
        return 0
    clients = ", ".join(f"{c.name} (pid {c.pid})" if c.pid else c.name for c in status.clients)
    if status.idle_exit is None:
        idle = "never exits by itself"
    elif status.idle_for is None:
        idle = f"exits after {_span(status.idle_exit)} idle; busy: {'; '.join(status.busy)}"
    else:
        idle = f"exits after {_span(status.idle_exit)} idle; idle for {_span(status.idle_for)}"
    rows = [
        ("state", status.state),
        ("version", f"contree-mcp {status.version} (control api {status.api})"),
        ("pid", str(status.pid)),
        ("uptime", _span(status.uptime)),
        ("socket", status.socket),
        ("log", status.log),
        ("clients", f"{len(status.clients)}" + (f": {clients}" if clients else "")),
        ("operations", f"{status.running_operations} running, {status.pending_operations} queued"),
        ("idle exit", idle),
    ]
    print(f"engine service at {status.home}")
    for name, value in rows:
        print(f"  {name + ':':12}{value}")
    return 0


def _span(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# ---------------------------------------------------------------------- unshare


def unshare_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="contree-mcp engine unshare",
        description="Run COMMAND inside the rootless engine's user namespace, where the home's files have "
        "their container owners (e.g. `contree-mcp engine unshare rm -rf ~/.local/share/contree-mcp`: "
        "files of sandboxes' other users are not yours on the host). As root it just runs COMMAND.",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")
    args = parser.parse_args(argv)
    if not args.command:
        parser.error("a command is required")
    if os.geteuid() != 0:
        from contree.engine.runtime.rootless.namespaces import NamespaceError, enter_userns

        try:
            enter_userns()
        except (NamespaceError, OSError) as exc:
            print(f"contree-mcp engine unshare: {exc}", file=sys.stderr)
            return 1
    try:
        os.execvp(args.command[0], args.command)
    except OSError as exc:
        print(f"contree-mcp engine unshare: {args.command[0]}: {exc.strerror}", file=sys.stderr)
        return 127


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m contree.service serve|stop|status …` (what auto-start runs)."""
    args = list(sys.argv[1:] if argv is None else argv)
    commands = {"serve": serve_main, "stop": stop_main, "status": status_main}
    if not args or args[0] not in commands:
        print("usage: python -m contree.service {serve,stop,status} [--home HOME] …", file=sys.stderr)
        return 2
    return commands[args[0]](args[1:])

