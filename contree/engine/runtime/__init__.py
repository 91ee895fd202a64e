"""Engine runtime: sandboxes on a mounted rootfs, and what they leave on the host.

Uses storage's mount primitives; knows nothing of images, operations or the API.

    paths.py       every path under /run/contree-engine, engine ids, the engine-id lock
    hostcheck.py   what the host can do (cgroup mode, kernel, binaries) and which OCI runtime to use
    subids.py      the sandboxes' host id range (contree-engine in /etc/subuid, /etc/subgid)
    userns.py      user namespaces: idmapped layer mounts, shifting a run's writes in and out
    seccomp.py     the seccomp profile (precompiled for crun)
    oci_config.py  the hardened OCI config.json (pure)
    cgroups.py     the engine's parent cgroup and each sandbox's limits, stats, OOM kills, kill-all
    limits.py      sandbox memory/CPU/pids policy: host-derived defaults, per-run maxima, engine total
    netns.py       network namespaces: SandboxNetwork/NetworkInfo, creation, deletion, counters, helpers
    network.py     the root engine's sandbox networks: veth + NAT + filter, slirp4netns, loopback only
    child.py       a child-process library: posix_spawn with pipes, reaped through its pidfd
    handles.py     SandboxSpec in; StagedSandbox, RunningSandbox, RunningProcess, exits out
    sandbox.py     SandboxRuntime: create, stage, launch, spares, close
    recovery.py    releasing what a dead engine left (processes, cgroups, runtime state, bundles, binds)
    watchdog.py    a process per engine: kills sandboxes past their deadline, releases a dead engine
    sandbox_init.py  contree-init (native/contree-init.c), PID 1 of a long-lived sandbox, and the
                   engine's end of its control socket (spawn, signals, exits with rusage)
    portfwd.py     port forwards from host loopback into a sandbox's network namespace
    rootless/      the runtime of an engine run by a non-root user (its own map: rootless/__init__.py)
"""
