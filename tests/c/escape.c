/* One escape attempt per invocation: `escape NAME [ARG]`. Prints
   "NAME OK" when the kernel let the call through (the escape worked, or at
   least was not refused by the filter), "NAME DENIED <errno>" otherwise.
   Raw syscalls throughout, so libc cannot hide or retry anything. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>
#include <linux/io_uring.h>
#include <linux/sched.h>

#ifndef AF_VSOCK
#define AF_VSOCK 40
#endif
#define X32 0x40000000L

static int report(const char *name, long r) {
    if (r < 0) printf("%s DENIED %d\n", name, errno);
    else printf("%s OK\n", name);
    return 0;
}

#if defined(__x86_64__)
static long int80(long nr, long a, long b, long c) {
    long ret;
    __asm__ volatile("int $0x80" : "=a"(ret) : "a"(nr), "b"(a), "c"(b), "d"(c) : "memory");
    if (ret < 0 && ret > -4096) { errno = (int)-ret; return -1; }
    return ret;
}
#endif

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    const char *n = argv[1];
    long arg = argc > 2 ? strtol(argv[2], NULL, 0) : 0;
    errno = 0;
    if (!strcmp(n, "ptrace_traceme")) return report(n, syscall(SYS_ptrace, 0 /*TRACEME*/, 0, 0, 0));
    if (!strcmp(n, "ptrace_sibling")) {
        pid_t child = fork();
        if (child == 0) { pause(); _exit(0); }
        long r = syscall(SYS_ptrace, 16 /*ATTACH*/, child, 0, 0);
        int e = errno;
        kill(child, SIGKILL); waitpid(child, NULL, 0);
        errno = e;
        return report(n, r);
    }
    if (!strcmp(n, "process_vm_writev")) {
        /* against the given pid (the sandbox's init, or our own parent) */
        char buf[8] = {0};
        struct iovec l = {buf, sizeof buf}, r = {(void *)0x10000, sizeof buf};
        return report(n, syscall(SYS_process_vm_writev, (pid_t)arg, &l, 1, &r, 1, 0));
    }
    if (!strcmp(n, "process_vm_readv")) {
        char buf[8];
        struct iovec l = {buf, sizeof buf}, r = {buf, sizeof buf};
        return report(n, syscall(SYS_process_vm_readv, getpid(), &l, 1, &r, 1, 0));
    }
    if (!strcmp(n, "pidfd_getfd")) {
        int pfd = (int)syscall(SYS_pidfd_open, (pid_t)(arg ? arg : getpid()), 0);
        if (pfd < 0) return report(n, -1);
        return report(n, syscall(SYS_pidfd_getfd, pfd, 0, 0));
    }
    if (!strcmp(n, "unshare_user")) return report(n, syscall(SYS_unshare, CLONE_NEWUSER));
    if (!strcmp(n, "unshare_net")) return report(n, syscall(SYS_unshare, CLONE_NEWNET));
    if (!strcmp(n, "clone_newuser")) {
        long r = syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0);
        if (r == 0) _exit(0);
        if (r > 0) waitpid((pid_t)r, NULL, 0);
        return report(n, r);
    }
    if (!strcmp(n, "clone3_newuser")) {
        struct clone_args ca;
        memset(&ca, 0, sizeof ca);
        ca.flags = CLONE_NEWUSER;
        ca.exit_signal = SIGCHLD;
        long r = syscall(SYS_clone3, &ca, sizeof ca);
        if (r == 0) _exit(0);
        if (r > 0) waitpid((pid_t)r, NULL, 0);
        return report(n, r);
    }
    if (!strcmp(n, "setns")) return report(n, syscall(SYS_setns, 0, 0));
    if (!strcmp(n, "tiocsti")) { char c = 'x'; return report(n, syscall(SYS_ioctl, 0, TIOCSTI, &c)); }
    if (!strcmp(n, "tiocsti_highbits")) {
        char c = 'x';
        return report(n, syscall(SYS_ioctl, 0, 0xdeadbeef00000000UL | TIOCSTI, &c));
    }
    if (!strcmp(n, "tioclinux")) { char c = 0; return report(n, syscall(SYS_ioctl, 0, TIOCLINUX, &c)); }
    if (!strcmp(n, "socket_vsock")) return report(n, syscall(SYS_socket, AF_VSOCK, SOCK_STREAM, 0));
    if (!strcmp(n, "socket_packet")) return report(n, syscall(SYS_socket, AF_PACKET, SOCK_RAW, 0));
    if (!strcmp(n, "socket_raw")) return report(n, syscall(SYS_socket, AF_INET, SOCK_RAW, 1));
    if (!strcmp(n, "socket_netlink_audit")) return report(n, syscall(SYS_socket, AF_NETLINK, SOCK_RAW, 9));
    if (!strcmp(n, "io_uring")) {
        struct io_uring_params p;
        memset(&p, 0, sizeof p);
        return report(n, syscall(SYS_io_uring_setup, 4, &p));
    }
    if (!strcmp(n, "bpf")) return report(n, syscall(SYS_bpf, 0, 0, 0));
    if (!strcmp(n, "perf_event_open")) return report(n, syscall(SYS_perf_event_open, 0, 0, -1, -1, 0));
    if (!strcmp(n, "userfaultfd")) return report(n, syscall(SYS_userfaultfd, 0));
    if (!strcmp(n, "keyctl")) return report(n, syscall(SYS_keyctl, 0 /*GET_KEYRING_ID*/, -3, 0));
    if (!strcmp(n, "add_key")) return report(n, syscall(SYS_add_key, "user", "nanobox", "x", 1, -3));
    if (!strcmp(n, "open_by_handle_at")) return report(n, syscall(SYS_open_by_handle_at, -100, 0, 0));
    if (!strcmp(n, "name_to_handle_at")) return report(n, syscall(SYS_name_to_handle_at, -100, "/", 0, 0, 0));
    if (!strcmp(n, "mount")) return report(n, syscall(SYS_mount, "none", "/mnt", "tmpfs", 0, 0));
    if (!strcmp(n, "umount2")) return report(n, syscall(SYS_umount2, "/proc", 2));
    if (!strcmp(n, "pivot_root")) return report(n, syscall(SYS_pivot_root, ".", "."));
    if (!strcmp(n, "chroot")) return report(n, syscall(SYS_chroot, "/"));
    if (!strcmp(n, "open_tree")) return report(n, syscall(SYS_open_tree, -100, "/", 1));
    if (!strcmp(n, "fsopen")) return report(n, syscall(SYS_fsopen, "tmpfs", 0));
    if (!strcmp(n, "move_mount")) return report(n, syscall(SYS_move_mount, -1, "", -100, "/", 0));
    if (!strcmp(n, "mount_setattr")) return report(n, syscall(SYS_mount_setattr, -100, "/", 0, 0, 0));
    if (!strcmp(n, "kexec_load")) return report(n, syscall(SYS_kexec_load, 0, 0, 0, 0));
    if (!strcmp(n, "init_module")) return report(n, syscall(SYS_init_module, 0, 0, ""));
    if (!strcmp(n, "finit_module")) return report(n, syscall(SYS_finit_module, -1, "", 0));
    if (!strcmp(n, "delete_module")) return report(n, syscall(SYS_delete_module, "nanobox_none", 0));
    if (!strcmp(n, "reboot")) return report(n, syscall(SYS_reboot, 0, 0, 0, 0));
    if (!strcmp(n, "swapon")) return report(n, syscall(SYS_swapon, "/nonexistent", 0));
    if (!strcmp(n, "settimeofday")) return report(n, syscall(SYS_settimeofday, NULL, NULL));
    if (!strcmp(n, "clock_settime")) return report(n, syscall(SYS_clock_settime, 0, NULL));
    if (!strcmp(n, "adjtimex")) return report(n, syscall(SYS_adjtimex, NULL));
    if (!strcmp(n, "acct")) return report(n, syscall(SYS_acct, NULL));
    if (!strcmp(n, "quotactl")) return report(n, syscall(SYS_quotactl, 0, NULL, 0, NULL));
    if (!strcmp(n, "personality_bad")) return report(n, syscall(SYS_personality, 0x0400000 /*READ_IMPLIES_EXEC*/));
    if (!strcmp(n, "personality_query")) return report(n, syscall(SYS_personality, 0xffffffff));
#if defined(__x86_64__)
    /* x32 ABI numbers of denied calls: same filter must refuse them. */
    if (!strcmp(n, "x32_ptrace")) return report(n, syscall(X32 | 521 /*x32 ptrace*/, 0, 0, 0, 0));
    if (!strcmp(n, "x32_unshare")) return report(n, syscall(X32 | SYS_unshare, CLONE_NEWUSER));
    if (!strcmp(n, "x32_getpid")) return report(n, syscall(X32 | SYS_getpid));
    /* i386 entry via int 0x80: getpid is 20 there (a harmless call). */
    if (!strcmp(n, "int80_getpid")) return report(n, int80(20, 0, 0, 0));
#endif
    if (!strcmp(n, "unknown_syscall")) return report(n, syscall(1000));
    /* Any syscall by number with all-zero arguments (only ever run inside a
       sandbox: the filter must refuse it before the kernel sees it). */
    if (!strcmp(n, "raw")) return report(n, syscall(arg, 0, 0, 0, 0, 0, 0));
    if (!strcmp(n, "getpid")) return report(n, syscall(SYS_getpid));
    fprintf(stderr, "unknown attempt %s\n", n);
    return 2;
}
