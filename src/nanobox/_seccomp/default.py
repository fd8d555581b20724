"""nanobox's default seccomp policy: allow everything except kernel attack surface.

The default action is ALLOW and the rules below are a deny-list, like the
default profiles of Docker, Flatpak and firejail.
The sandbox's real isolation comes from namespaces, Landlock and rlimits; this
filter removes the system calls that would let code inside reach other
processes, reconfigure the kernel or the sandbox itself, or exercise kernel code
with a record of privilege-escalation bugs.

Every rule carries its reason.  Errno choice:

* ``EPERM`` by default: what the call returns to an unprivileged caller anyway,
  so programs already handle it.
* ``ENOSYS`` where a caller should take its fallback path: ``clone3`` (glibc
  falls back to ``clone``), io_uring (libuv and others fall back to epoll and
  threads), the new mount API (libmount falls back to ``mount(2)``, which then
  fails with ``EPERM``), and obsolete calls that current kernels no longer
  implement or let be compiled out.
* Socket calls fail the way the kernel fails an unsupported family or
  protocol (``EAFNOSUPPORT``, ``EPROTONOSUPPORT``).

Deliberately *not* denied, although some peers do:

* ``vmsplice``: zero-copy pipe I/O; the bugs it was blamed for (Dirty Pipe) are
  just as reachable through ``splice`` and ``write``.
* ``mbind``, ``set_mempolicy``, ``get_mempolicy``, ``set_mempolicy_home_node``:
  they only steer the caller's own memory placement; NUMA-aware runtimes (JVM
  ``-XX:+UseNUMA``, OpenMP, hwloc) use them.  ``migrate_pages`` and
  ``move_pages``, which act on *other* processes, are denied.
* ``sethostname``, ``setdomainname``: they only change the caller's UTS
  namespace and need ``CAP_SYS_ADMIN`` there.
* ``listmount``, ``statmount``, ``listns``: they show no more than
  ``/proc/self/mountinfo`` and ``/proc/*/ns`` already do.
* ``uprobe``, ``uretprobe``: only reachable from kernel-installed trampolines,
  and recent kernels exempt them from seccomp; denying them would only break
  probes a host tracer attached.
* ``seccomp``, ``landlock_*``, ``mseal``: a program may restrict itself further.
* ``mknod``/``mknodat``: ``mkfifo`` needs them; device nodes need
  ``CAP_MKNOD``, which the sandbox never has.
"""

from __future__ import annotations

import errno
from typing import Final

from .policy import ALLOW, Action, Cond, Errno, Policy, Rule

__all__ = ["DEFAULT_RULES", "default_policy"]

EPERM: Final = Errno(errno.EPERM)
ENOSYS: Final = Errno(errno.ENOSYS)
EOPNOTSUPP: Final = Errno(errno.EOPNOTSUPP)
EAFNOSUPPORT: Final = Errno(errno.EAFNOSUPPORT)
EPROTONOSUPPORT: Final = Errno(errno.EPROTONOSUPPORT)
EACCES: Final = Errno(errno.EACCES)

# clone(2) flags that create namespaces (linux/sched.h).  Through clone(2) bit
# 0x80 (CLONE_NEWTIME) is part of the exit-signal field (CSIGNAL), where values
# >= 128 are invalid anyway, so testing it costs nothing.
CLONE_NEWTIME: Final = 0x00000080
CLONE_NEWNS: Final = 0x00020000
CLONE_NEWCGROUP: Final = 0x02000000
CLONE_NEWUTS: Final = 0x04000000
CLONE_NEWIPC: Final = 0x08000000
CLONE_NEWUSER: Final = 0x10000000
CLONE_NEWPID: Final = 0x20000000
CLONE_NEWNET: Final = 0x40000000
CLONE_NS_FLAGS: Final = (
    CLONE_NEWTIME | CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC
    | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET
)  # fmt: skip

# personality(2) values (linux/personality.h) that stay allowed: the default, a
# query, "uname says i686" (linux32/setarch), and disabling ASLR (setarch -R,
# reproducible test runs).  ASLR off only weakens the sandboxed program itself,
# and no_new_privs means no setuid binary inherits it.  Everything else
# (READ_IMPLIES_EXEC, MMAP_PAGE_ZERO, UNAME26, ADDR_LIMIT_*, ...) is refused.
PER_LINUX: Final = 0x0000
PER_LINUX32: Final = 0x0008
ADDR_NO_RANDOMIZE: Final = 0x0040000
PER_QUERY: Final = 0xFFFFFFFF
ALLOWED_PERSONALITIES: Final = (
    PER_LINUX, PER_LINUX32, PER_LINUX | ADDR_NO_RANDOMIZE, PER_LINUX32 | ADDR_NO_RANDOMIZE,
    PER_QUERY,
)  # fmt: skip

TIOCSTI: Final = 0x5412
TIOCLINUX: Final = 0x541C

AF_UNIX: Final = 1
AF_INET: Final = 2
AF_INET6: Final = 10
AF_NETLINK: Final = 16
SOCK_TYPE_MASK: Final = 0xF  # type also carries SOCK_NONBLOCK | SOCK_CLOEXEC
SOCK_DGRAM: Final = 2
SOCK_RAW: Final = 3
SOCK_PACKET: Final = 10
NETLINK_ROUTE: Final = 0


def _deny(syscall: str, action: Action, reason: str, *conds: Cond) -> Rule:
    return Rule(syscall, action, conds, reason)


def _allow(syscall: str, reason: str, *conds: Cond) -> Rule:
    return Rule(syscall, ALLOW, conds, reason)


DEFAULT_RULES: Final[tuple[Rule, ...]] = (
    # -- other processes ------------------------------------------------------------
    _deny("ptrace", EPERM, "reads and writes other processes' memory and registers"),
    _deny("process_vm_readv", EPERM, "reads another process's memory"),
    _deny("process_vm_writev", EPERM, "writes another process's memory"),
    _deny("pidfd_getfd", EPERM, "copies a file descriptor out of another process"),
    _deny("process_madvise", EPERM, "changes how another process's memory is kept"),
    _deny("kcmp", EPERM, "compares other processes' kernel objects (ptrace-class access)"),
    _deny("migrate_pages", EPERM, "moves another process's memory between NUMA nodes"),
    _deny("move_pages", EPERM, "moves or inspects pages of another process"),
    # -- the kernel itself ------------------------------------------------------------
    _deny("kexec_load", EPERM, "replaces the running kernel"),
    _deny("kexec_file_load", EPERM, "replaces the running kernel"),
    _deny("init_module", EPERM, "loads kernel code"),
    _deny("finit_module", EPERM, "loads kernel code"),
    _deny("delete_module", EPERM, "unloads kernel code"),
    _deny("create_module", ENOSYS, "obsolete module interface, gone since Linux 2.6"),
    _deny("get_kernel_syms", ENOSYS, "obsolete module interface, gone since Linux 2.6"),
    _deny("query_module", ENOSYS, "obsolete module interface, gone since Linux 2.6"),
    _deny("nfsservctl", ENOSYS, "obsolete NFS server control, gone since Linux 3.1"),
    _deny("_sysctl", ENOSYS, "obsolete binary sysctl, gone since Linux 5.5"),
    _deny("uselib", ENOSYS, "a.out library loading; current kernels build without it"),
    _deny("sysfs", ENOSYS, "obsolete file-system-type query (often compiled out)"),
    _deny("ustat", ENOSYS, "obsolete statfs predecessor; glibc dropped its wrapper"),
    _deny("bpf", EPERM, "eBPF programs and maps: a large attack surface (verifier bugs)"),
    _deny("perf_event_open", EPERM, "performance counters: side channels, kernel bugs"),
    _deny("userfaultfd", EPERM, "lets exploits stall kernel page faults to win races"),
    _deny("syslog", EPERM, "reads or clears the kernel log (kernel addresses)"),
    _deny("lookup_dcookie", EPERM, "oprofile kernel interface; needs CAP_SYS_ADMIN anyway"),
    _deny("modify_ldt", EPERM, "x86 segment descriptors: 16-bit code only, buggy history"),
    _deny("iopl", EPERM, "raw x86 I/O port access"),
    _deny("ioperm", EPERM, "raw x86 I/O port access"),
    _deny("fanotify_init", EPERM, "file-system-wide access monitoring; inotify suffices"),
    # -- keyrings, io_uring, file handles ------------------------------------------------
    _deny("keyctl", EPERM, "kernel keyrings are shared across containers of one uid"),
    _deny("add_key", EPERM, "kernel keyrings are shared across containers of one uid"),
    _deny("request_key", EPERM, "kernel keyrings are shared across containers of one uid"),
    _deny("io_uring_setup", ENOSYS, "io_uring runs I/O past seccomp; ENOSYS -> epoll/threads"),
    _deny("io_uring_enter", ENOSYS, "io_uring runs I/O past seccomp; ENOSYS -> epoll/threads"),
    _deny("io_uring_register", ENOSYS, "io_uring runs I/O past seccomp; ENOSYS -> fallback"),
    _deny("open_by_handle_at", EPERM, "opens files by handle, bypassing paths (Shocker)"),
    _deny(
        "name_to_handle_at",
        EOPNOTSUPP,
        "makes handles for open_by_handle_at; "
        "EOPNOTSUPP is what file systems without handles return",
    ),
    # -- mounts and the root ---------------------------------------------------------------
    _deny("mount", EPERM, "mounting would reshape the sandbox's view of files"),
    _deny("umount2", EPERM, "unmounting could uncover paths the sandbox hides"),
    _deny("pivot_root", EPERM, "changes the root of the mount namespace"),
    _deny("chroot", EPERM, "changing root enables classic chroot escapes"),
    _deny("move_mount", ENOSYS, "new mount API; ENOSYS so callers fall back to mount(2)"),
    _deny("open_tree", ENOSYS, "new mount API; ENOSYS so callers fall back to mount(2)"),
    _deny("open_tree_attr", ENOSYS, "new mount API; ENOSYS so callers fall back to mount(2)"),
    _deny("fsopen", ENOSYS, "new mount API; ENOSYS so callers fall back to mount(2)"),
    _deny("fsmount", ENOSYS, "new mount API; ENOSYS so callers fall back to mount(2)"),
    _deny("fsconfig", ENOSYS, "new mount API; ENOSYS so callers fall back to mount(2)"),
    _deny("fspick", ENOSYS, "new mount API; ENOSYS so callers fall back to mount(2)"),
    _deny("mount_setattr", ENOSYS, "new mount API; ENOSYS so callers fall back to mount(2)"),
    _deny("swapon", EPERM, "system swap configuration"),
    _deny("swapoff", EPERM, "system swap configuration"),
    _deny("quotactl", EPERM, "disk quota administration"),
    _deny("quotactl_fd", EPERM, "disk quota administration"),
    # -- the machine -------------------------------------------------------------------------
    _deny("reboot", EPERM, "restarts or halts the machine"),
    _deny("settimeofday", EPERM, "sets the system clock, which is not namespaced"),
    _deny("clock_settime", EPERM, "sets the system clock, which is not namespaced"),
    _deny("clock_adjtime", EPERM, "tunes the system clock; its mode is in memory BPF can't read"),
    _deny("adjtimex", EPERM, "tunes the system clock; its mode is in memory BPF can't read"),
    _deny("acct", EPERM, "switches process accounting to a file"),
    _deny("vhangup", EPERM, "hangs up the controlling terminal"),
    # -- namespaces -----------------------------------------------------------------------------
    _deny("unshare", EPERM, "new namespaces expose kernel attack surface and undo isolation"),
    _deny("setns", EPERM, "joins other namespaces through inherited descriptors"),
    _allow("clone", "threads and fork: no namespace flags", Cond.masked_eq(0, CLONE_NS_FLAGS, 0)),
    _deny("clone", EPERM, "clone with CLONE_NEW* creates namespaces, like unshare"),
    _deny("clone3", ENOSYS, "flags are in memory BPF can't read; ENOSYS -> glibc uses clone"),
    # -- personality ---------------------------------------------------------------------------
    *(
        _allow(
            "personality",
            "harmless persona: default, query, linux32, ASLR off",
            Cond.eq32(0, persona),
        )
        for persona in ALLOWED_PERSONALITIES
    ),
    _deny("personality", EPERM, "READ_IMPLIES_EXEC, MMAP_PAGE_ZERO, etc. weaken mitigations"),
    # -- terminals --------------------------------------------------------------------------------
    _deny(
        "ioctl",
        EPERM,
        "TIOCSTI types into the terminal's input (CVE-2019-10063 shape)",
        Cond.eq32(1, TIOCSTI),
    ),
    _deny(
        "ioctl",
        EPERM,
        "TIOCLINUX can paste into the console's input (CVE-2023-28100)",
        Cond.eq32(1, TIOCLINUX),
    ),
    # -- sockets: only unix, IPv4/IPv6 and rtnetlink ------------------------------------------
    _deny(
        "socket",
        EPERM,
        "raw IPv4 sockets forge packets (needs CAP_NET_RAW anyway)",
        Cond.eq32(0, AF_INET),
        Cond.masked_eq(1, SOCK_TYPE_MASK, SOCK_RAW),
    ),
    _deny(
        "socket",
        EPERM,
        "raw IPv6 sockets forge packets (needs CAP_NET_RAW anyway)",
        Cond.eq32(0, AF_INET6),
        Cond.masked_eq(1, SOCK_TYPE_MASK, SOCK_RAW),
    ),
    _deny(
        "socket",
        EAFNOSUPPORT,
        "(AF_INET, SOCK_PACKET) is an AF_PACKET socket in disguise",
        Cond.eq32(0, AF_INET),
        Cond.masked_eq(1, SOCK_TYPE_MASK, SOCK_PACKET),
    ),
    # A unix datagram socket sends to whatever path sendto()/sendmsg() name,
    # resolved in the sandbox's view: a host daemon's socket on a read-only
    # mount too. connect() is brokered (see _linux/unixconnect.py); those
    # addresses sit in the caller's memory where a filter cannot check them,
    # so the sockets themselves are refused (stream and seqpacket sockets
    # only ever reach what connect() reached). SOCK_RAW too: for AF_UNIX the
    # kernel makes it a datagram socket.
    _deny(
        "socket",
        EACCES,
        "unix datagram sockets send to any socket path (connect() is brokered, sendto() cannot be)",
        Cond.eq32(0, AF_UNIX),
        Cond.masked_eq(1, SOCK_TYPE_MASK, SOCK_DGRAM),
    ),
    _deny(
        "socket",
        EACCES,
        "(AF_UNIX, SOCK_RAW) is a unix datagram socket in disguise",
        Cond.eq32(0, AF_UNIX),
        Cond.masked_eq(1, SOCK_TYPE_MASK, SOCK_RAW),
    ),
    _allow("socket", "unix sockets", Cond.eq32(0, AF_UNIX)),
    _allow("socket", "IPv4", Cond.eq32(0, AF_INET)),
    _allow("socket", "IPv6", Cond.eq32(0, AF_INET6)),
    _allow(
        "socket",
        "rtnetlink: getaddrinfo, getifaddrs, if_nameindex",
        Cond.eq32(0, AF_NETLINK),
        Cond.eq32(2, NETLINK_ROUTE),
    ),
    _deny(
        "socket",
        EPROTONOSUPPORT,
        "other netlink families (nf_tables, audit, uevents...)",
        Cond.eq32(0, AF_NETLINK),
    ),
    _deny("socket", EAFNOSUPPORT, "other families (packet, vsock, bluetooth, tipc...)"),
    _deny(
        "socketpair",
        EACCES,
        "unix datagram pairs can send to any socket path too, as for socket",
        Cond.eq32(0, AF_UNIX),
        Cond.masked_eq(1, SOCK_TYPE_MASK, SOCK_DGRAM),
    ),
    _deny(
        "socketpair",
        EACCES,
        "(AF_UNIX, SOCK_RAW) pairs are datagram pairs, as for socket",
        Cond.eq32(0, AF_UNIX),
        Cond.masked_eq(1, SOCK_TYPE_MASK, SOCK_RAW),
    ),
    _allow("socketpair", "unix socket pairs", Cond.eq32(0, AF_UNIX)),
    _deny("socketpair", EAFNOSUPPORT, "other families, as for socket"),
)


def default_policy() -> Policy:
    """The policy nanobox applies unless told otherwise (default action ALLOW)."""
    return Policy(default=ALLOW, rules=DEFAULT_RULES)
