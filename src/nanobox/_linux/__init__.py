"""Linux backend: namespaces, mounts, rlimits, capabilities, supervision.

Each kernel mechanism lives in one module:

- ``sys``: raw syscalls through ctypes (unshare, mount API, prctl, capset).
- ``userns``: the uid/gid map of the sandbox's user namespace.
- ``mounts``: the filesystem view, built inside the new mount namespace.
- ``netns``: bringing up loopback in the new network namespace.
- ``child``: the last stage before ``execve`` (fds, rlimits, caps, seccomp).
- ``init``: the sandbox's PID 1 (reaper, timeouts, CPU watch, accounting).
- ``spawn``: namespace creation and the fork chain for one run.
- ``forkserver``: the single-threaded supervisor process that serves runs.
- ``client``: the caller-side connection to the fork server.
- ``probe``: what this host can enforce (``nanobox check``).
"""

# The command search path when the run's environment has no PATH (plan, child).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Why a sandbox needs user namespaces and how to enable them (plan, sandbox).
USERNS_HELP = (
    "user namespaces are not available to this user. Enable them: "
    "'sysctl kernel.unprivileged_userns_clone=1' (Debian/older Ubuntu), "
    "'sysctl user.max_user_namespaces=15000', or on Ubuntu 24.04+ "
    "'sysctl kernel.apparmor_restrict_unprivileged_userns=0' (or an AppArmor "
    "profile granting 'userns'); in Docker/Podman run with a seccomp profile "
    "that allows unshare/clone namespace flags"
)
