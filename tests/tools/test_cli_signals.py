"""A SIGTERM'd MCP server (what clients send after closing stdin) exits cleanly and leaves the shared
engine service running; a SIGTERM'd engine service releases everything the engine set up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from contree.engine.runtime.paths import TAG_DIR
from contree.service.control import ControlConnection
from tests.tools.conftest import server_command


def _chains(tags: set[str]) -> set[str]:
    """The iptables chains of engines holding these network tags (other engines may run beside us)."""
    out = subprocess.run(["iptables", "-S"], capture_output=True, text=True, check=True).stdout
    chains = {line.split()[1] for line in out.splitlines() if line.startswith("-N CT-")}
    return {c for c in chains if c.split("-")[1] in tags}


def _tags_held_by(service: ControlConnection) -> set[str]:
    """Network tags whose lock files the (live) service process holds open."""
    tags = set()
    for fd in Path(f"/proc/{service.status.pid}/fd").iterdir():
        target = Path(os.readlink(fd)) if fd.is_symlink() else None
        if target is not None and target.parent == TAG_DIR and target.suffix == ".lock":
            tags.add(target.stem)
    service.refresh()  # still answering: the pid was the service's while we looked
    return tags


def _mounts_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(path))]


def test_sigterm_of_the_service_after_a_networked_run_removes_rules_and_mounts(
    engine_home: Path, workdir: Path
) -> None:
    proc = subprocess.Popen(
        [*server_command(), "--backend", "local", "--home", str(engine_home), "--allowed-root", str(workdir)],
        cwd=workdir, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    tags: set[str] = set()
    try:
        assert proc.stdin is not None and proc.stdout is not None
        client = {"name": "t", "version": "1"}
        run = {"command": "ip -4 addr show | grep -c inet", "image": "busybox:latest"}
        messages = [
            {"jsonrpc": "2.0", "id": 1, "method": "initialize",
             "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": client}},
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
            {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "run", "arguments": run}},
        ]
        proc.stdin.write("".join(json.dumps(m) + "\n" for m in messages))
        proc.stdin.flush()
        while True:
            reply = json.loads(proc.stdout.readline())
            if reply.get("id") == 2:
                break
        result = reply["result"]["structuredContent"]["result"]
        assert result["exit_code"] == 0, result
        assert int(result["stdout"].strip()) >= 2  # lo plus the sandbox's NAT interface
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
        with ControlConnection(engine_home, pin=True) as service:  # still there: work outlives sessions
            assert service.status.state == "ready"
            tags = _tags_held_by(service)
            assert _chains(tags), "a networked run sets up the engine's firewall chains"
            signal.pidfd_send_signal(service.pidfd, signal.SIGTERM)
            assert service.wait_exit(30)
    finally:
        if proc.poll() is None:  # a failed assertion above: still let the engine clean up
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    assert not _chains(tags)
    assert _mounts_under(engine_home) == []
