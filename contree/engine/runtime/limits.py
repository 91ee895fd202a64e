"""Sandbox resource limits: sizes derived from the host, the operator's settings, what one run gets.

Three levels, all enforced by cgroups (`cgroups.py`): the engine's total budget (its parent cgroup bounds
every sandbox together), the per-run maximum, and the default a run gets when it asks for nothing. A
dimension the host cannot enforce (no controller) is reported as absent, never as a number.
Pure except `HostResources.detect()`.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path

import msgspec

from contree import api
from contree.errors import BadRequest
from contree.units import parse_size

MIB = 1 << 20
GIB = 1 << 30
MIN_MEMORY = 32 * MIB  # crun and a shell need a few MiB before the command even starts
MIN_CPUS = 0.01  # cgroup v1's smallest quota: 1 ms per 100 ms period
MIN_PIDS = 16
DEFAULT_PIDS = 1024
CONTROLLERS = ("memory", "cpu", "pids")


class LimitConfigError(ValueError):
    """The operator's limit settings contradict each other or cannot be enforced on this host."""


class HostResources(msgspec.Struct, kw_only=True, frozen=True):
    memory_bytes: int
    cpus: float
    pids: int

    @classmethod
    def detect(cls) -> HostResources:
        return cls(memory_bytes=_mem_total(), cpus=float(len(os.sched_getaffinity(0))), pids=_host_pids())


def _mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise OSError("no MemTotal in /proc/meminfo")


def _host_pids() -> int:
    values = []
    for name in ("pid_max", "threads-max"):
        try:
            values.append(int(Path(f"/proc/sys/kernel/{name}").read_text()))
        except (OSError, ValueError):
            continue
    return min(values) if values else 32768


class ResourceSettings(msgspec.Struct, kw_only=True, frozen=True):
    """What the operator configured; None = derived from the host (`resolve_policy`)."""

    memory_bytes: int | None = None  # a run's default
    max_memory_bytes: int | None = None  # the most a run may ask for
    total_memory_bytes: int | None = None  # all sandboxes together
    cpus: float | None = None
    max_cpus: float | None = None
    total_cpus: float | None = None
    pids: int | None = None
    max_pids: int | None = None
    total_pids: int | None = None


class SandboxLimits(msgspec.Struct, kw_only=True, frozen=True):
    """One level of limits; None = not enforced on this host."""

    memory_bytes: int | None = None
    cpus: float | None = None
    pids: int | None = None


class LimitPolicy(msgspec.Struct, kw_only=True, frozen=True):
    default: SandboxLimits
    maximum: SandboxLimits
    total: SandboxLimits

    def for_request(self, requested: api.InstanceResourcesLimits | None) -> SandboxLimits:
        """The limits of one run: the defaults, with what the request asks for checked against the maxima."""
        if requested is None:
            return self.default
        memory = self._pick("memory_bytes", requested.memory_bytes, MIN_MEMORY)
        cpus = self._pick("cpus", requested.cpus, MIN_CPUS)
        pids = self._pick("pids", requested.pids, MIN_PIDS)
        return SandboxLimits(memory_bytes=None if memory is None else int(memory), cpus=cpus,
                             pids=None if pids is None else int(pids))

    def _pick(self, name: str, asked: float | msgspec.UnsetType, least: float) -> float | None:
        default: float | None = getattr(self.default, name)
        most: float | None = getattr(self.maximum, name)
        if asked is msgspec.UNSET:
            return default
        assert isinstance(asked, int | float)
        if most is None:
            raise BadRequest(f"resources_limits.{name}: this engine cannot enforce that limit on its host "
                             "(no cgroup controller for it); leave it out")
        if not least <= asked <= most:
            raise BadRequest(f"resources_limits.{name} must be between {_show(least)} and {_show(most)} "
                             f"(whoami limits.{_WHOAMI[name][1]}), got {_show(asked)}")
        return asked

    def whoami(self) -> dict[str, int]:
        """The `whoami.limits` entries (ints on the wire: CPUs as millicpus); absent = not enforced."""
        out: dict[str, int] = {}
        for name, (default_key, max_key, total_key) in _WHOAMI.items():
            scale = 1000 if name == "cpus" else 1
            for key, level in ((default_key, self.default), (max_key, self.maximum), (total_key, self.total)):
                value = getattr(level, name)
                if value is not None:
                    out[key] = round(value * scale)
        return out


_WHOAMI = {
    "memory_bytes": ("instance_memory_bytes", "instance_max_memory_bytes", "engine_memory_bytes"),
    "cpus": ("instance_millicpus", "instance_max_millicpus", "engine_millicpus"),
    "pids": ("instance_pids", "instance_max_pids", "engine_pids"),
}


def _show(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def resolve_policy(settings: ResourceSettings, host: HostResources,
                   enforceable: frozenset[str] = frozenset(CONTROLLERS)) -> LimitPolicy:
    """Fill what the operator left open from the host, check the three levels are ordered, and drop the
    dimensions the host cannot enforce (refusing when the operator configured one of those)."""
    total_mem = settings.total_memory_bytes or _mib_floor(host.memory_bytes * 3 // 4)
    max_mem = settings.max_memory_bytes or total_mem
    mem = settings.memory_bytes or min(max_mem, min(max(host.memory_bytes // 4, 512 * MIB), 8 * GIB))
    total_cpus = settings.total_cpus or host.cpus
    max_cpus = settings.max_cpus or total_cpus
    cpus = settings.cpus or min(max_cpus, max(1.0, math.floor(host.cpus / 2)))
    total_pids = settings.total_pids or max(MIN_PIDS, host.pids // 2)
    max_pids = settings.max_pids or total_pids
    pids = settings.pids or min(max_pids, DEFAULT_PIDS)
    _ordered("memory", mem, max_mem, total_mem, MIN_MEMORY)
    _ordered("cpus", cpus, max_cpus, total_cpus, MIN_CPUS)
    _ordered("pids", pids, max_pids, total_pids, MIN_PIDS)
    configured = {"memory": (settings.memory_bytes, settings.max_memory_bytes, settings.total_memory_bytes),
                  "cpu": (settings.cpus, settings.max_cpus, settings.total_cpus),
                  "pids": (settings.pids, settings.max_pids, settings.total_pids)}
    for ctrl, values in configured.items():
        if ctrl not in enforceable and any(v is not None for v in values):
            raise LimitConfigError(f"{ctrl} limits are configured but this host has no {ctrl} cgroup "
                                   "controller for the engine: they could not be enforced")

    def level(memory: int, cpu: float, pid: int) -> SandboxLimits:
        return SandboxLimits(memory_bytes=memory if "memory" in enforceable else None,
                             cpus=cpu if "cpu" in enforceable else None,
                             pids=pid if "pids" in enforceable else None)

    return LimitPolicy(default=level(mem, cpus, pids), maximum=level(max_mem, max_cpus, max_pids),
                       total=level(total_mem, total_cpus, total_pids))


def _mib_floor(n: int) -> int:
    return n // MIB * MIB


def _ordered(name: str, default: float, most: float, total: float, least: float) -> None:
    if not least <= default <= most <= total:
        raise LimitConfigError(f"{name} limits must satisfy {_show(least)} <= default ({_show(default)}) <= "
                         f"per-run maximum ({_show(most)}) <= engine total ({_show(total)})")


# ---- command-line settings (`contree-mcp --backend local …` and `contree-mcp serve-api`) ----

_FLAGS = (
    ("--sandbox-memory", "memory_bytes", "memory of a run that asks for none (default: host RAM / 4, "
     "0.5-8 GiB)"),
    ("--sandbox-max-memory", "max_memory_bytes", "most memory one run may ask for (default: the engine's)"),
    ("--engine-memory", "total_memory_bytes", "memory of all sandboxes together (default: 3/4 of host RAM)"),
    ("--sandbox-cpus", "cpus", "CPUs of a run that asks for none (default: half the host's, at least 1)"),
    ("--sandbox-max-cpus", "max_cpus", "most CPUs one run may ask for (default: the engine's)"),
    ("--engine-cpus", "total_cpus", "CPUs of all sandboxes together (default: the host's)"),
    ("--sandbox-pids", "pids", f"processes+threads of a run that asks for none (default {DEFAULT_PIDS})"),
    ("--sandbox-max-pids", "max_pids", "most processes+threads one run may ask for (default: the engine's)"),
    ("--engine-pids", "total_pids", "processes+threads of all sandboxes together (default: half the host's)"),
)


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def convert(text: str) -> float:
        value = kind(text)
        if not value > 0:
            raise ValueError(f"must be positive, got {text!r}")
        return value

    convert.__name__ = getattr(kind, "__name__", "value")  # argparse names it in its error
    return convert


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sandbox limits (embedded engine; default and per-run maxima are "
                                      "reported by whoami)")
    for flag, field, text in _FLAGS:
        kind: Callable[[str], float] = (parse_size if "memory" in field else
                                        float if "cpus" in field else int)
        group.add_argument(flag, dest=f"limit_{field}", type=_positive(kind), default=None, help=text,
                           metavar="SIZE" if "memory" in field else "N")


def arguments_for(settings: ResourceSettings) -> list[str]:
    """The flags that give `settings` (to hand them on: the engine service takes the same flags)."""
    out: list[str] = []
    for flag, field, _ in _FLAGS:
        value = getattr(settings, field)
        if value is not None:
            out += [flag, str(int(value)) if "memory" in field or "pids" in field else repr(float(value))]
    return out


def settings_from(args: argparse.Namespace) -> ResourceSettings:
    """The settings the flags give; raises `LimitConfigError` (say it and exit 2) when they contradict
    each other or the host's defaults."""
    settings = ResourceSettings(**{field: getattr(args, f"limit_{field}", None) for _, field, _ in _FLAGS})
    if settings != ResourceSettings():
        resolve_policy(settings, HostResources.detect())
    return settings
