"""The project's seccomp profile (RUNTIME §4.2), generated in code, plus a precompiled BPF form.

The allowlist is equivalent to the podman/containers-common default for x86_64 with the capabilities we
grant, tightened where that profile relies on capabilities alone: new namespaces through `clone`/`unshare`
flag masks are refused, `clone3` answers ENOSYS (libc then falls back to `clone`, whose flags we can
inspect), and module loading, bpf, perf, kexec, keyrings, io_uring, mount APIs, `open_by_handle_at` and
`userfaultfd` get EPERM. Everything not listed gets ENOSYS, like podman, so new syscalls look absent.

crun compiles the JSON section on every start (about 25 ms, RUNTIME §2); compiling once through
libseccomp and handing crun the raw filter (`run.oci.seccomp_bpf_data`) removes that cost.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import errno
import functools
import os
import tempfile
from typing import Any

import msgspec

# Namespace-creating clone flags: NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET (+ NEWTIME).
CLONE_NS_FLAGS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
CLONE_NEWTIME = 0x00000080

ALLOWED = """
accept accept4 access adjtimex alarm bind brk capget capset chdir chmod chown chroot clock_adjtime
clock_getres clock_gettime clock_nanosleep close close_range connect copy_file_range creat dup dup2 dup3
epoll_create epoll_create1 epoll_ctl epoll_pwait epoll_pwait2 epoll_wait eventfd eventfd2 execve execveat
exit exit_group faccessat faccessat2 fadvise64 fallocate fanotify_mark fchdir fchmod fchmodat fchown
fchownat fcntl fdatasync fgetxattr flistxattr flock fork fremovexattr fsetxattr fstat fstatfs fsync
ftruncate futex futex_waitv futimesat get_mempolicy get_robust_list getcpu getcwd getdents getdents64
getegid geteuid getgid getgroups getitimer getpeername getpgid getpgrp getpid getppid getpriority
getrandom getresgid getresuid getrlimit getrusage getsid getsockname getsockopt gettid gettimeofday getuid
getxattr inotify_add_watch inotify_init inotify_init1 inotify_rm_watch io_cancel io_destroy io_getevents
io_setup io_submit ioctl ioprio_get ioprio_set kill landlock_add_rule landlock_create_ruleset
landlock_restrict_self lchown lgetxattr link linkat listen listxattr llistxattr lremovexattr lseek
lsetxattr lstat madvise mbind membarrier memfd_create memfd_secret mincore mkdir mkdirat mknod mknodat mlock
mlock2 mlockall mmap mprotect mq_getsetattr mq_notify mq_open mq_timedreceive mq_timedsend mq_unlink mremap
msgctl msgget msgrcv msgsnd msync munlock munlockall munmap name_to_handle_at nanosleep newfstatat open
openat openat2 pause pidfd_getfd pidfd_open pidfd_send_signal pipe pipe2 pkey_alloc pkey_free pkey_mprotect
poll ppoll prctl pread64 preadv preadv2 prlimit64 process_mrelease process_vm_readv process_vm_writev
pselect6 ptrace pwrite64 pwritev pwritev2 read readahead readlink readlinkat readv recvfrom recvmmsg recvmsg
remap_file_pages removexattr rename renameat renameat2 restart_syscall rmdir rseq rt_sigaction
rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn rt_sigsuspend rt_sigtimedwait rt_tgsigqueueinfo
sched_get_priority_max sched_get_priority_min sched_getaffinity sched_getattr sched_getparam
sched_getscheduler sched_rr_get_interval sched_setaffinity sched_setattr sched_setparam sched_setscheduler
sched_yield seccomp select semctl semget semop semtimedop sendfile sendmmsg sendmsg sendto set_mempolicy
set_robust_list set_tid_address setfsgid setfsuid setgid setgroups setitimer setpgid setpriority setregid
setresgid setresuid setreuid setrlimit setsid setsockopt setuid setxattr shmat shmctl shmdt shmget shutdown
sigaltstack signalfd signalfd4 socket socketpair splice stat statfs statx symlink symlinkat sync
sync_file_range syncfs sysinfo syslog tee tgkill time timer_create timer_delete timer_getoverrun
timer_gettime timer_settime timerfd_create timerfd_gettime timerfd_settime times tkill truncate umask uname
unlink unlinkat utime utimensat utimes vfork wait4 waitid write writev arch_prctl modify_ldt
""".split()

# Refused outright with EPERM: kernel attack surface a sandbox never needs (RUNTIME §4.2, issue 3).
DENIED = """
bpf perf_event_open kexec_load kexec_file_load init_module finit_module delete_module open_by_handle_at
userfaultfd add_key keyctl request_key io_uring_setup io_uring_enter io_uring_register mount umount2
pivot_root fsopen fsconfig fsmount fspick move_mount open_tree mount_setattr setns swapon swapoff reboot
acct lookup_dcookie quotactl fanotify_init settimeofday clock_settime iopl ioperm vhangup kcmp
process_madvise setdomainname sethostname vmsplice migrate_pages move_pages
""".split()

# personality(2) values podman allows: PER_LINUX, PER_LINUX32, UNAME26 variants and the query.
PERSONALITY_ALLOWED = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)

EPERM = errno.EPERM
ENOSYS = errno.ENOSYS


# ---- OCI JSON form (for runc, and the config's documented intent) ----

class SeccompArg(msgspec.Struct, kw_only=True, omit_defaults=True):
    index: int
    value: int
    op: str
    valueTwo: int = 0


class SeccompRule(msgspec.Struct, kw_only=True, omit_defaults=True):
    names: list[str]
    action: str
    errnoRet: int | None = None
    args: list[SeccompArg] | None = None


class SeccompProfile(msgspec.Struct, kw_only=True, omit_defaults=True):
    defaultAction: str
    defaultErrnoRet: int
    architectures: list[str]
    syscalls: list[SeccompRule]


def _ns_flag_bits() -> list[int]:
    return [1 << b for b in range(32) if (CLONE_NS_FLAGS | CLONE_NEWTIME) >> b & 1]


@functools.lru_cache(maxsize=1)
def profile() -> SeccompProfile:
    rules = [SeccompRule(names=sorted(ALLOWED), action="SCMP_ACT_ALLOW")]
    rules.append(SeccompRule(names=sorted(DENIED), action="SCMP_ACT_ERRNO", errnoRet=EPERM))
    mask = CLONE_NS_FLAGS | CLONE_NEWTIME
    for name in ("clone", "unshare"):
        rules.append(SeccompRule(names=[name], action="SCMP_ACT_ALLOW",
                                 args=[SeccompArg(index=0, value=mask, valueTwo=0, op="SCMP_CMP_MASKED_EQ")]))
        for bit in _ns_flag_bits():
            rules.append(SeccompRule(names=[name], action="SCMP_ACT_ERRNO", errnoRet=EPERM,
                                     args=[SeccompArg(index=0, value=bit, valueTwo=bit,
                                                      op="SCMP_CMP_MASKED_EQ")]))
    rules.append(SeccompRule(names=["clone3"], action="SCMP_ACT_ERRNO", errnoRet=ENOSYS))
    for value in PERSONALITY_ALLOWED:
        rules.append(SeccompRule(names=["personality"], action="SCMP_ACT_ALLOW",
                                 args=[SeccompArg(index=0, value=value, op="SCMP_CMP_EQ")]))
    return SeccompProfile(defaultAction="SCMP_ACT_ERRNO", defaultErrnoRet=ENOSYS,
                          architectures=["SCMP_ARCH_X86_64"], syscalls=rules)


def profile_dict() -> dict[str, Any]:
    result: dict[str, Any] = msgspec.to_builtins(profile())
    return result


# ---- precompiled BPF via libseccomp ----

_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_FLTATR_ACT_BADARCH = 2
_SCMP_CMP = {"SCMP_CMP_NE": 1, "SCMP_CMP_LT": 2, "SCMP_CMP_LE": 3, "SCMP_CMP_EQ": 4, "SCMP_CMP_GE": 5,
             "SCMP_CMP_GT": 6, "SCMP_CMP_MASKED_EQ": 7}


def _act_errno(err: int) -> int:
    return 0x00050000 | (err & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


class SeccompUnavailable(RuntimeError):
    pass


def _load_libseccomp() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise SeccompUnavailable(f"libseccomp not found ({exc}); install the Debian package libseccomp2") \
            from exc
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCmp)]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def _action(rule: SeccompRule) -> int:
    if rule.action == "SCMP_ACT_ALLOW":
        return _SCMP_ACT_ALLOW
    return _act_errno(rule.errnoRet if rule.errnoRet is not None else EPERM)


@functools.lru_cache(maxsize=1)
def compiled_bpf() -> bytes:
    """The profile as a raw classic-BPF program for seccomp(SECCOMP_SET_MODE_FILTER), built once."""
    lib = _load_libseccomp()
    prof = profile()
    ctx = lib.seccomp_init(_act_errno(prof.defaultErrnoRet))
    if not ctx:
        raise SeccompUnavailable("seccomp_init failed")
    try:
        # 32-bit and x32 entry points are not in the filter: answer ENOSYS rather than killing.
        lib.seccomp_attr_set(ctx, _SCMP_FLTATR_ACT_BADARCH, _act_errno(ENOSYS))
        default = _act_errno(prof.defaultErrnoRet)
        for rule in prof.syscalls:
            if _action(rule) == default:
                continue  # libseccomp refuses rules that repeat the default action (clone3 -> ENOSYS)
            args = rule.args or []
            arr = (_ArgCmp * max(1, len(args)))()
            for i, a in enumerate(args):
                arr[i] = _ArgCmp(a.index, _SCMP_CMP[a.op], a.value, a.valueTwo)
            for name in rule.names:
                nr = lib.seccomp_syscall_resolve_name(name.encode())
                if nr < 0:
                    continue  # not a syscall on this architecture
                rc = lib.seccomp_rule_add_array(ctx, _action(rule), nr, len(args), arr)
                if rc < 0:
                    raise SeccompUnavailable(f"seccomp_rule_add({name}) failed: {os.strerror(-rc)}")
        with tempfile.TemporaryFile() as fh:
            rc = lib.seccomp_export_bpf(ctx, fh.fileno())
            if rc < 0:
                raise SeccompUnavailable(f"seccomp_export_bpf failed: {os.strerror(-rc)}")
            fh.seek(0)
            return fh.read()
    finally:
        lib.seccomp_release(ctx)


@functools.lru_cache(maxsize=1)
def compiled_bpf_b64() -> str:
    return base64.b64encode(compiled_bpf()).decode()
