/* contree-init: PID 1 of a long-lived sandbox (contree/engine/sandbox_init.py is the engine's side).
 *
 * crun starts it as the container's process with the engine's end of a SOCK_SEQPACKET socketpair on
 * fd 3 (`crun run --preserve-fds 1`). It reaps every process of the sandbox (orphans included) and
 * starts the processes the engine asks for: a fork of PID 1 inherits exactly what crun applied to it
 * (namespaces, cgroup, seccomp filter, capabilities, no_new_privs, rlimits), so an exec costs a fork and
 * an execve instead of a whole `crun exec` (~20 ms). It exits when the engine's end closes, which ends
 * the sandbox's pid namespace: a sandbox never outlives its engine.
 *
 * Nothing from inside the sandbox can reach fd 3: it is a socket (not openable through /proc), it is
 * close-on-exec and closed in every child, and PID 1 is not dumpable, so without CAP_SYS_PTRACE (never
 * granted) no process can ptrace it or take its descriptors with pidfd_getfd.
 *
 * Messages are one packet each, native byte order (both ends run on the same host).
 *   engine -> init  SPAWN  {type=1, id, uid, gid, flags, argc, envc, spec_len}; fds: spec memfd,
 *                          stdout, stderr[, stdin]; the spec holds cwd\0 argv...\0 env...\0
 *                   SIGNAL {type=2, id, signal, flags}: the process group of `id` (FLAG_GROUP) or `id`
 *                   SIGNAL_ALL {type=3, id=0, signal}: every process of the sandbox but PID 1
 *   init -> engine  HELLO   {type=100, id=0, version, pid}; fds: a pidfd of PID 1 (when the kernel can)
 *                   STARTED {type=101, id, pid}; fds: a pidfd of the process (when the kernel can)
 *                   FAILED  {type=102, id, errno, stage}
 *                   EXITED  {type=103, id, status, rusage}
 * Build: cc -static -O2 -o contree-init contree-init.c (see sandbox_init.build).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define VERSION 1
#define CONTROL_FD 3
#define MAX_SPEC (4 << 20)
#define MAX_CHILDREN 65536

enum { T_SPAWN = 1, T_SIGNAL = 2, T_SIGNAL_ALL = 3 };
enum { T_HELLO = 100, T_STARTED = 101, T_FAILED = 102, T_EXITED = 103 };
enum { F_STDIN = 1 };
enum { F_GROUP = 1 };
enum { S_FORK = 1, S_SPEC = 2, S_FDS = 3, S_GROUPS = 4, S_GID = 5, S_UID = 6, S_CWD = 7, S_EXEC = 8 };

struct spawn_req {
    uint32_t type, id, uid, gid, flags, argc, envc, spec_len;
};
struct signal_req {
    uint32_t type, id;
    int32_t signal;
    uint32_t flags;
};
struct hello_msg {
    uint32_t type, id, version;
    int32_t pid;
};
struct started_msg {
    uint32_t type, id;
    int32_t pid;
};
struct failed_msg {
    uint32_t type, id;
    int32_t err;
    uint32_t stage;
};
struct exited_msg {
    uint32_t type, id;
    int32_t status;
    uint32_t pad;
    int64_t utime_us, stime_us, maxrss_kb, minflt, majflt, inblock, oublock, nvcsw, nivcsw;
};

struct child {
    pid_t pid;
    uint32_t id;
};

static struct child children[MAX_CHILDREN];
static int nchildren;

static void die(const char *what) {
    dprintf(2, "contree-init: %s: %s\n", what, strerror(errno));
    _exit(125);
}

static int pidfd_of(pid_t pid) {
    long fd = syscall(SYS_pidfd_open, pid, 0);
    return fd < 0 ? -1 : (int)fd;
}

/* Send one packet with up to one descriptor; the engine gone means the sandbox ends. */
static void send_msg(const void *msg, size_t len, int fd) {
    struct iovec iov = {(void *)msg, len};
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } u;
    struct msghdr mh = {0};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    if (fd >= 0) {
        memset(&u, 0, sizeof(u));
        mh.msg_control = u.buf;
        mh.msg_controllen = sizeof(u.buf);
        struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof(int));
    }
    while (sendmsg(CONTROL_FD, &mh, MSG_NOSIGNAL) < 0) {
        if (errno == EINTR)
            continue;
        _exit(0); /* the engine is gone */
    }
}

static void send_failed(uint32_t id, int err, uint32_t stage) {
    struct failed_msg m = {T_FAILED, id, err, stage};
    send_msg(&m, sizeof(m), -1);
}

static void close_fds(int *fds, int n) {
    for (int i = 0; i < n; i++)
        if (fds[i] >= 0)
            close(fds[i]);
}

/* The child between fork and execve: only async-signal-safe calls. Reports (errno, stage) on `errpipe`. */
static void child_exec(const struct spawn_req *req, int *fds, char *cwd, char **argv, char **envp,
                       int errpipe) {
    int stage;
    sigset_t none;
    sigemptyset(&none);
    for (int s = 1; s < NSIG; s++)
        signal(s, SIG_DFL);
    sigprocmask(SIG_SETMASK, &none, NULL);
    setsid(); /* its own process group: a signal to the group reaches what it starts too */
    int in = (req->flags & F_STDIN) ? fds[3] : open("/dev/null", O_RDONLY | O_CLOEXEC);
    stage = S_FDS;
    if (in < 0 || dup2(in, 0) < 0 || dup2(fds[1], 1) < 0 || dup2(fds[2], 2) < 0)
        goto fail;
    /* The report pipe takes fd 3 (the control socket's place), everything above it goes. */
    stage = S_FDS;
    if (dup3(errpipe, 3, O_CLOEXEC) < 0)
        goto fail;
    errpipe = 3;
    if (syscall(SYS_close_range, 4, ~0U, 0) < 0)
        for (int fd = 4; fd < 65536; fd++)
            close(fd);
    stage = S_GROUPS;
    if (setgroups(0, NULL) < 0 && errno != EPERM)
        goto fail;
    stage = S_GID;
    if (setresgid(req->gid, req->gid, req->gid) < 0)
        goto fail;
    stage = S_UID;
    if (setresuid(req->uid, req->uid, req->uid) < 0)
        goto fail;
    stage = S_CWD;
    if (chdir(cwd) < 0)
        goto fail;
    stage = S_EXEC;
    environ = envp;
    execvp(argv[0], argv);
fail:;
    int32_t report[2] = {errno, stage};
    if (write(errpipe, report, sizeof(report)) < 0) {
    }
    _exit(127);
}

static void handle_spawn(const struct spawn_req *req, int *fds, int nfds) {
    int want = (req->flags & F_STDIN) ? 4 : 3;
    if (nfds != want) {
        send_failed(req->id, EBADF, S_FDS);
        return;
    }
    if (nchildren >= MAX_CHILDREN) {
        send_failed(req->id, EAGAIN, S_FORK);
        return;
    }
    size_t len = req->spec_len;
    if (len == 0 || len > MAX_SPEC || req->argc == 0) {
        send_failed(req->id, EINVAL, S_SPEC);
        return;
    }
    char *spec = mmap(NULL, len + 1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (spec == MAP_FAILED) {
        send_failed(req->id, errno, S_SPEC);
        return;
    }
    size_t got = 0;
    while (got < len) {
        ssize_t n = pread(fds[0], spec + got, len - got, (off_t)got);
        if (n <= 0) {
            send_failed(req->id, n < 0 ? errno : EINVAL, S_SPEC);
            munmap(spec, len + 1);
            return;
        }
        got += (size_t)n;
    }
    spec[len] = '\0';
    /* cwd, argv and env: NUL-terminated strings, exactly 1 + argc + envc of them. */
    size_t total = 1 + (size_t)req->argc + (size_t)req->envc;
    char **strs = mmap(NULL, (total + 2) * sizeof(char *), PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (strs == MAP_FAILED) {
        send_failed(req->id, errno, S_SPEC);
        munmap(spec, len + 1);
        return;
    }
    size_t k = 0;
    for (size_t off = 0; off < len && k < total; k++) {
        strs[k] = spec + off;
        off += strlen(spec + off) + 1;
    }
    if (k != total || spec[len - 1] != '\0') {
        send_failed(req->id, EINVAL, S_SPEC);
        goto out;
    }
    char *cwd = strs[0];
    char **argv = strs + 1;
    /* argv[argc] and envp[envc] must be NULL: shift env one slot to make room for argv's terminator. */
    char **envp = strs + 1 + req->argc + 1;
    memmove(envp, strs + 1 + req->argc, req->envc * sizeof(char *));
    argv[req->argc] = NULL;
    envp[req->envc] = NULL;

    int errpipe[2];
    if (pipe2(errpipe, O_CLOEXEC) < 0) {
        send_failed(req->id, errno, S_FORK);
        goto out;
    }
    pid_t pid = fork();
    if (pid < 0) {
        send_failed(req->id, errno, S_FORK);
        close(errpipe[0]);
        close(errpipe[1]);
        goto out;
    }
    if (pid == 0) {
        close(errpipe[0]);
        child_exec(req, fds, cwd, argv, envp, errpipe[1]);
    }
    close(errpipe[1]);
    int32_t report[2];
    ssize_t n;
    do {
        n = read(errpipe[0], report, sizeof(report));
    } while (n < 0 && errno == EINTR);
    close(errpipe[0]);
    if (n == (ssize_t)sizeof(report)) {
        /* exec failed: the child _exits 127; reap it here so no EXITED follows the FAILED */
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {
        }
        send_failed(req->id, report[0], (uint32_t)report[1]);
        goto out;
    }
    children[nchildren].pid = pid;
    children[nchildren].id = req->id;
    nchildren++;
    struct started_msg m = {T_STARTED, req->id, pid};
    int pfd = pidfd_of(pid);
    send_msg(&m, sizeof(m), pfd);
    if (pfd >= 0)
        close(pfd);
out:
    munmap(strs, (total + 2) * sizeof(char *));
    munmap(spec, len + 1);
}

static int find_child(uint32_t id) {
    for (int i = 0; i < nchildren; i++)
        if (children[i].id == id)
            return i;
    return -1;
}

static void handle_signal(const struct signal_req *req) {
    int i = find_child(req->id);
    if (i < 0 || req->signal < 1 || req->signal >= NSIG)
        return; /* exited (its EXITED is on its way) or not ours */
    pid_t pid = children[i].pid;
    /* Unreaped, so `pid` cannot have been reused, and neither can the group it leads. */
    if (!(req->flags & F_GROUP) || kill(-pid, req->signal) < 0)
        kill(pid, req->signal);
}

static void reap(void) {
    for (;;) {
        int status;
        struct rusage ru;
        pid_t pid = wait4(-1, &status, WNOHANG, &ru);
        if (pid <= 0)
            return;
        for (int i = 0; i < nchildren; i++) {
            if (children[i].pid != pid)
                continue;
            struct exited_msg m = {0};
            m.type = T_EXITED;
            m.id = children[i].id;
            m.status = status;
            m.utime_us = (int64_t)ru.ru_utime.tv_sec * 1000000 + ru.ru_utime.tv_usec;
            m.stime_us = (int64_t)ru.ru_stime.tv_sec * 1000000 + ru.ru_stime.tv_usec;
            m.maxrss_kb = ru.ru_maxrss;
            m.minflt = ru.ru_minflt;
            m.majflt = ru.ru_majflt;
            m.inblock = ru.ru_inblock;
            m.oublock = ru.ru_oublock;
            m.nvcsw = ru.ru_nvcsw;
            m.nivcsw = ru.ru_nivcsw;
            children[i] = children[--nchildren];
            send_msg(&m, sizeof(m), -1);
            break;
        }
    }
}

static void handle_request(void) {
    char buf[64];
    int fds[8];
    int nfds = 0;
    union {
        char buf[CMSG_SPACE(sizeof(fds))];
        struct cmsghdr align;
    } u;
    struct iovec iov = {buf, sizeof(buf)};
    struct msghdr mh = {0};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = u.buf;
    mh.msg_controllen = sizeof(u.buf);
    ssize_t n = recvmsg(CONTROL_FD, &mh, MSG_CMSG_CLOEXEC);
    if (n < 0) {
        if (errno == EINTR || errno == EAGAIN)
            return;
        _exit(0);
    }
    if (n == 0)
        _exit(0); /* the engine closed its end: the sandbox ends with PID 1 */
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c != NULL; c = CMSG_NXTHDR(&mh, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (int i = 0; i < count && nfds < 8; i++)
            memcpy(&fds[nfds++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
    }
    uint32_t type = 0;
    if (n >= 4)
        memcpy(&type, buf, 4);
    if (type == T_SPAWN && n == sizeof(struct spawn_req) && !(mh.msg_flags & MSG_CTRUNC)) {
        struct spawn_req req;
        memcpy(&req, buf, sizeof(req));
        handle_spawn(&req, fds, nfds);
    } else if (type == T_SIGNAL && n == sizeof(struct signal_req)) {
        struct signal_req req;
        memcpy(&req, buf, sizeof(req));
        handle_signal(&req);
    } else if (type == T_SIGNAL_ALL && n == sizeof(struct signal_req)) {
        struct signal_req req;
        memcpy(&req, buf, sizeof(req));
        if (req.signal >= 1 && req.signal < NSIG)
            kill(-1, req.signal); /* from PID 1: every other process of the namespace */
    } else if (type == T_SPAWN && n >= 8) {
        uint32_t id;
        memcpy(&id, buf + 4, 4);
        send_failed(id, EINVAL, S_SPEC);
    }
    close_fds(fds, nfds);
}

int main(void) {
    struct stat st;
    if (fstat(CONTROL_FD, &st) < 0 || !S_ISSOCK(st.st_mode)) {
        dprintf(2, "contree-init: fd %d is not the engine's control socket\n", CONTROL_FD);
        return 125;
    }
    if (fcntl(CONTROL_FD, F_SETFD, FD_CLOEXEC) < 0)
        die("fcntl");
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    /* PID 1 ignores these (the engine ends a sandbox through its cgroup or this socket) */
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGHUP);
    sigaddset(&mask, SIGPIPE);
    if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0)
        die("sigprocmask");
    int sfd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sfd < 0)
        die("signalfd");
    /* stdin/stdout/stderr of PID 1 are the runtime's pipes; nothing is written there from now on. */
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null >= 0) {
        dup2(null, 0);
        close(null);
    }
    struct hello_msg hello = {T_HELLO, 0, VERSION, getpid()};
    int self = pidfd_of(getpid());
    send_msg(&hello, sizeof(hello), self);
    if (self >= 0)
        close(self);
    struct pollfd pfds[2] = {{CONTROL_FD, POLLIN, 0}, {sfd, POLLIN, 0}};
    for (;;) {
        if (poll(pfds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            die("poll");
        }
        if (pfds[1].revents & POLLIN) {
            struct signalfd_siginfo si;
            while (read(sfd, &si, sizeof(si)) == sizeof(si)) {
            }
            reap();
        }
        if (pfds[0].revents & (POLLIN | POLLHUP | POLLERR))
            handle_request();
    }
}
