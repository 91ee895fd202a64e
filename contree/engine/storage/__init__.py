"""Engine storage: the engine home's files — layers, images, blobs — and the mounts that show them.

No processes, no namespaces: everything here is files, SQLite and mount syscalls.

    home.py        the private engine home (0700, checked and repaired at start), private dirs/files
    imagedb.py     ImageDB: image and layer records in SQLite, every query, tags
    reclaim.py     Reclaimer(ImageDB): pins (flock, any process) and deletion (gc, prune, trash)
    store.py       Store(Reclaimer): layer trees kept consistent with the records — staging, commit,
                   squash, scratch dirs, recovery, check
    layertree.py   layer trees on disk: measure, strip overlay bookkeeping, remove, fsync
    overlay.py     mounts: overlay via fsconfig lowerdir+, tmpfs, bind, unmount, mounts_under
    upperfs.py     a run's layer filesystem (tmpfs size=/nr_inodes=), its usage, the commit's copy
    resolver.py    a userspace view of an image's layers (openat2 RESOLVE_IN_ROOT)
    inspect.py     reading images without a sandbox: list, read, archive, grep
    blobs.py       uploaded files (sha256) and sync chunks (xxh3-128); injecting a file into a rootfs
    bootstrap.py   the base images busybox:latest and debian:bookworm
"""
