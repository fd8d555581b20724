"""The fork server: one small, single-threaded supervisor per caller process.

Forking a multithreaded Python process and running Python in the child can
deadlock, and most callers have threads (thread pools, asyncio executors).
So the caller starts this server once (a fresh ``python -I -S`` interpreter,
or a plain fork when the caller is known to be single-threaded, as the CLI
is) and asks it for every run over a ``SOCK_SEQPACKET`` control socket.

Protocol (one message each, JSON plus SCM_RIGHTS fds):

- caller -> server on the control socket: the plan, with fds
  ``[channel, stdin, stdout, stderr]``; ``channel`` is one end of a
  per-run socketpair.
- caller -> server on the channel: ``K`` to kill the run; EOF (the caller
  went away or cancelled) also kills it.
- server -> caller on the channel: ``{"t": "result", ...}`` with the init's
  report, or ``{"t": "error", ...}`` when setup failed.

When the control socket reaches EOF (the caller exited, even by SIGKILL)
the server kills every sandbox and exits. Each sandbox init watches a pipe
from the server, so a dead server takes its sandboxes with it too.
"""

from __future__ import annotations

import json
import os
import resource
import selectors
import signal
import socket
import sys
import time
from typing import Any

from . import cgroups, spawn, userns
from . import sys as k

MAX_PLAN = 1 << 20
# Root callers' sandboxes run as a dedicated uid from this range.
ROOT_UID_BASE = 0x60000000
ROOT_UID_SPAN = 0x0FFFFFFF


class _Job:
    __slots__ = (
        "chan",
        "client_gone",
        "exit_status",
        "finished",
        "group",
        "launched",
        "placeholders",
        "started",
        "tmpdir",
    )

    def __init__(
        self, chan: socket.socket, launched: spawn.Launched, group: cgroups.RunGroup | None
    ) -> None:
        self.chan = chan
        self.launched = launched
        self.group = group
        self.placeholders: list[str] = []
        self.tmpdir: str | None = None
        self.started = time.monotonic()
        self.exit_status: int | None = None
        self.finished = False
        self.client_gone = False


class Server:
    def __init__(self, ctrl: socket.socket) -> None:
        self.ctrl = ctrl
        self.sel = selectors.DefaultSelector()
        self.jobs_by_pid: dict[int, _Job] = {}
        self.ident = cgroups.server_ident()
        self.placeholders = Placeholders(self.ident)
        sweep_placeholders()
        self.counter = 0
        self.swept: set[str] = set()
        self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda _s, _f: None)
        self.sel.register(ctrl, selectors.EVENT_READ, ("ctrl", None))
        self.sel.register(self.wake_r, selectors.EVENT_READ, ("wake", None))

    # -- main loop ---------------------------------------------------------
    def serve(self) -> None:
        while True:
            for key, _ in self.sel.select():
                what, job = key.data
                if what == "ctrl":
                    if not self._on_ctrl():
                        self._shutdown()
                        return
                elif what == "wake":
                    self._drain_wake()
                    self._reap()
                elif job.finished:
                    continue  # a stale event from this batch: its fds are closed
                elif what == "chan":
                    self._on_chan(job)
                elif what == "status":
                    self._on_status(job)

    def _on_ctrl(self) -> bool:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(self.ctrl, MAX_PLAN, 8)
        except InterruptedError:  # pragma: no cover
            return True
        if not msg and not fds:
            return False
        if len(fds) != 4:
            for fd in fds:
                os.close(fd)
            return True
        chan = socket.socket(fileno=fds[0])
        stdio = (fds[1], fds[2], fds[3])
        group: cgroups.RunGroup | None = None
        placeholders: list[str] = []
        tmpdir: str | None = None
        extra_fds: list[int] = []
        try:
            plan = json.loads(msg)
            group = self._make_group(plan)
            placeholders = self.placeholders.acquire(plan.get("placeholders", ()))
            if plan.get("private_tmp"):
                tmpdir = make_private_tmp(plan)
            if plan.get("proxy"):
                plan["chan_fd"] = chan.fileno()  # the init sends the proxy listeners on it
            if plan.get("outer_uid") == 0 and plan.get("root_mapping"):
                extra_fds = self._root_mapping(plan)
            launched = spawn.launch(plan, stdio)
        except spawn.SpawnError as exc:
            remove_tree(tmpdir)
            self.placeholders.release(placeholders)
            if group is not None:
                group.remove()
            self._send(chan, {"t": "error", **exc.info})
            chan.close()
            return True
        except OSError as exc:
            remove_tree(tmpdir)
            self.placeholders.release(placeholders)
            if group is not None:
                group.remove()
            self._send(
                chan,
                {
                    "t": "error",
                    "step": "cgroup" if group is None else "spawn",
                    "errno": exc.errno,
                    "message": str(exc),
                },
            )
            chan.close()
            return True
        except Exception as exc:  # noqa: BLE001 - report, keep serving
            self._send(
                chan,
                {
                    "t": "error",
                    "step": "spawn",
                    "errno": getattr(exc, "errno", None),
                    "message": str(exc),
                },
            )
            chan.close()
            return True
        finally:
            for fd in set(stdio) | set(extra_fds):
                os.close(fd)
        job = _Job(chan, launched, group)
        job.placeholders = placeholders
        job.tmpdir = tmpdir
        self.jobs_by_pid[launched.pid] = job
        chan.setblocking(False)
        self.sel.register(chan, selectors.EVENT_READ, ("chan", job))
        os.set_blocking(launched.status_r, False)
        self.sel.register(launched.status_r, selectors.EVENT_READ, ("status", job))
        if b"\n" in launched.buffer:
            self._on_status(job, read=False)
        return True

    def _root_mapping(self, plan: dict[str, Any]) -> list[int]:
        """For a root caller: run the sandbox as a dedicated unprivileged uid
        (its root inside), and shift the writable roots' ownership to it
        with idmapped mounts, so host files keep root's protection while the
        workspace stays writable (and new files in it belong to root)."""
        self.counter += 1
        sid = ROOT_UID_BASE + ((os.getpid() << 12 | (self.counter & 0xFFF)) % ROOT_UID_SPAN)
        userns_fd = userns.make_userns(f"0 {sid} 1\n", f"0 {sid} 1\n")
        fds = [userns_fd]
        plan["userns_fd"] = userns_fd
        plan["sandbox_uid"] = sid
        premade: dict[str, int] = {}
        try:
            for i, op in enumerate(plan["view"]["ops"]):
                if op["t"] == "bind":
                    fd = userns.idmapped_clone(op["src"], userns_fd)
                elif op["t"] == "robind":
                    # The sandbox's uid may not reach the source (e.g. under
                    # a 0700 directory of root's): clone it here.
                    fd = userns.readonly_clone(op["src"])
                else:
                    continue
                fds.append(fd)
                premade[str(i)] = fd
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            raise OSError(
                exc.errno,
                f"cannot shift ownership of the writable roots for a root caller "
                f"(idmapped mounts): {exc.strerror}",
            ) from None
        plan["view"]["premade"] = premade
        return fds

    def _make_group(self, plan: dict[str, Any]) -> cgroups.RunGroup | None:
        spec = plan.get("cgroup")
        if not spec:
            return None
        placement = cgroups.Placement(**spec["placement"])
        for base in placement.bases.values():
            if base not in self.swept:
                self.swept.add(base)
                cgroups.sweep(placement)
        group = cgroups.RunGroup.create(placement, f"{self.ident}.{plan['id']}", spec["limits"])
        plan["cgroup_procs"] = group.procs_files()
        return group

    def _drain_wake(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            job = self.jobs_by_pid.get(pid)
            if job is not None:
                job.exit_status = status
                self._maybe_finish(job)

    def _on_chan(self, job: _Job) -> None:
        try:
            data = job.chan.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            job.client_gone = True
            self.sel.unregister(job.chan)
            self._kill(job)
        elif data.startswith(b"K"):
            try:
                os.write(job.launched.cmd_w, b"K")
            except OSError:
                pass

    def _kill(self, job: _Job) -> None:
        if job.exit_status is None:
            try:
                os.kill(job.launched.pid, signal.SIGKILL)  # still our unreaped child: no reuse
            except ProcessLookupError:
                pass

    def _on_status(self, job: _Job, read: bool = True) -> None:
        launched = job.launched
        if read:
            try:
                chunk = os.read(launched.status_r, 65536)
            except BlockingIOError:
                return
            if chunk:
                launched.buffer += chunk
                if b"\n" not in launched.buffer:
                    return
            else:
                self.sel.unregister(launched.status_r)
                os.close(launched.status_r)
                launched.status_r = -1
        if b"\n" in launched.buffer or launched.status_r == -1:
            self._maybe_finish(job)

    def _maybe_finish(self, job: _Job) -> None:
        launched = job.launched
        if job.finished or job.exit_status is None:
            return
        if launched.status_r != -1 and b"\n" not in launched.buffer:
            return  # the report may still be in flight
        job.finished = True
        del self.jobs_by_pid[launched.pid]
        line = bytes(launched.buffer).partition(b"\n")[0]
        if line.startswith(b"R"):
            msg: dict[str, Any] = {"t": "result", **json.loads(line[1:])}
        elif line.startswith(b"E"):
            msg = {"t": "error", **json.loads(line[1:])}
        else:
            msg = {
                "t": "error",
                "step": "supervise",
                "errno": None,
                "message": f"sandbox init died (wait status {job.exit_status})",
            }
            stats = job.group.stats() if job.group is not None else {}
            if stats.get("oom_kills"):
                # The OOM killer took the init too: everything in the group
                # is dead; report the run as killed by the memory limit.
                msg = {
                    "t": "result",
                    "status": 9,
                    "reason": "exited",
                    "wall": time.monotonic() - job.started,
                    "utime": 0.0,
                    "stime": 0.0,
                    "maxrss_kb": 0,
                    "self_cpu": 0.0,
                    "exec_error": None,
                    "init_lost": True,
                }
        if job.group is not None:
            msg["cgroup"] = job.group.stats()
        if launched.status_r != -1:
            self.sel.unregister(launched.status_r)
            os.close(launched.status_r)
            launched.status_r = -1
        os.close(launched.cmd_w)
        # Before replying: when run() returns, the workspace is as it was.
        self.placeholders.release(job.placeholders)
        remove_tree(job.tmpdir)
        if not job.client_gone:
            self._send(job.chan, msg)
            self.sel.unregister(job.chan)
        job.chan.close()
        if job.group is not None:
            # After replying: the caller does not wait for the removal. The
            # group is empty (the pid namespace died with its init).
            job.group.remove()

    @staticmethod
    def _send(chan: socket.socket, msg: dict[str, Any]) -> None:
        try:
            chan.setblocking(True)
            chan.settimeout(5.0)
            chan.send(json.dumps(msg).encode())
        except OSError:
            pass

    def _shutdown(self) -> None:
        jobs = list(self.jobs_by_pid.values())
        for job in jobs:
            self._kill(job)
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break
        for job in jobs:
            self.placeholders.release(job.placeholders)
            remove_tree(job.tmpdir)
            if job.group is not None:
                job.group.remove()


class Placeholders:
    """Empty files/directories standing in for protected paths that do not
    exist yet (the init mounts read-only empties over them), shared by
    concurrent runs in the same workspace and removed by the last one."""

    def __init__(self, ident: str = "") -> None:
        self.refs: dict[str, tuple[int, int]] = {}  # path -> (inode, users)
        # A record on disk, so that placeholders of a server that was
        # SIGKILLed are removed by the next server (see sweep_placeholders).
        self.record = _state_file(f"placeholders.{ident}") if ident else None

    def _save(self) -> None:
        if self.record is None:
            return
        try:
            if not self.refs:
                os.unlink(self.record)
                return
            tmp = self.record + ".tmp"
            with open(tmp, "w") as fh:
                for path, (ino, _users) in self.refs.items():
                    fh.write(f"{ino}\t{path}\n")
            os.replace(tmp, self.record)
        except OSError:
            pass

    def acquire(self, specs: Any) -> list[str]:
        taken: list[str] = []
        try:
            for path, kind in specs:
                if path in self.refs:
                    ino, users = self.refs[path]
                    self.refs[path] = (ino, users + 1)
                    taken.append(path)
                    continue
                try:
                    if kind == "dir":
                        os.mkdir(path, 0o700)
                    else:
                        fd = os.open(
                            path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600
                        )
                        os.close(fd)
                except FileExistsError:
                    continue  # not ours: the init protects whatever is there
                self.refs[path] = (os.lstat(path).st_ino, 1)
                taken.append(path)
            self._save()
        except BaseException:
            self.release(taken)
            raise
        return taken

    def release(self, taken: list[str]) -> None:
        try:
            self._release(taken)
        finally:
            self._save()

    def _release(self, taken: list[str]) -> None:
        for path in taken:
            ino, users = self.refs[path]
            if users > 1:
                self.refs[path] = (ino, users - 1)
                continue
            del self.refs[path]
            remove_placeholder(path, ino)


def remove_placeholder(path: str, ino: int) -> None:
    """Remove a placeholder if it is still ours (same inode) and empty."""
    try:
        st = os.lstat(path)
        if st.st_ino != ino:
            return
        if os.path.isdir(path):
            os.rmdir(path)  # fails (and stays) if something was put inside
        elif st.st_size == 0:
            os.unlink(path)
    except OSError:
        pass


def _state_dir() -> str | None:
    """A private directory for crash-recovery records (0700, ours)."""
    uid = os.getuid()
    base = "/run/nanobox" if uid == 0 else os.environ.get("XDG_RUNTIME_DIR") or ""
    path = os.path.join(base, "nanobox") if base and uid != 0 else base
    if not path:
        path = f"/tmp/nanobox-{uid}"
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return None
    import stat as _stat

    if not _stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
        return None  # not ours (or not private): do not trust it
    return path


def _state_file(name: str) -> str | None:
    d = _state_dir()
    return os.path.join(d, name) if d else None


def sweep_placeholders() -> None:
    """Remove placeholders recorded by servers that no longer run."""
    d = _state_dir()
    if d is None:
        return
    try:
        names = os.listdir(d)
    except OSError:
        return
    for name in names:
        if not name.startswith("placeholders.") or name.endswith(".tmp"):
            continue
        ident = name.split(".", 1)[1]
        pid = ident.split("_", 1)[0]
        if pid.isdigit() and cgroups._alive(int(pid), ident):
            continue
        record = os.path.join(d, name)
        try:
            with open(record) as fh:
                for line in fh:
                    ino, _, path = line.rstrip("\n").partition("\t")
                    if ino.isdigit() and path:
                        remove_placeholder(path, int(ino))
            os.unlink(record)
        except OSError:
            pass


def make_private_tmp(plan: dict[str, Any]) -> str:
    """Without a mount namespace there is no private /tmp: give the run a
    directory of its own as $TMPDIR (writable under Landlock), removed after."""
    import tempfile

    path = tempfile.mkdtemp(prefix=f"nanobox-{plan['id']}-")
    env = dict(plan["env"])
    env["TMPDIR"] = path
    plan["env"] = sorted(env.items())
    if plan.get("landlock"):
        plan["landlock"]["write"].append(path)
    plan.setdefault("connect_allowed", []).append(path)
    return path


def remove_tree(path: str | None) -> None:
    if path:
        import shutil

        shutil.rmtree(path, ignore_errors=True)


def probe_userns() -> tuple[bool, str]:
    """Can this process build a sandbox's namespaces (user namespace with a
    working mount namespace)? Tried in a throw-away child."""
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(r)
        msg = b"ok"
        try:
            uid, gid = os.getuid(), os.getgid()
            k.unshare(k.CLONE_NEWUSER | k.CLONE_NEWNS)
            userns.map_self(uid, gid, uid, gid)
            k.mount(None, "/", None, k.MS_REC | k.MS_PRIVATE)
        except OSError as exc:
            msg = f"{exc.strerror or exc} (errno {exc.errno})".encode()
        os.write(w, msg)
        os._exit(0)
    os.close(w)
    data = os.read(r, 4096)
    os.close(r)
    os.waitpid(pid, 0)
    return data == b"ok", data.decode(errors="replace")


def main(ctrl_fd: int) -> None:
    """Entry point of the server process."""
    k.prctl(k.PR_SET_CHILD_SUBREAPER, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError):
            pass
    ctrl = socket.socket(fileno=ctrl_fd)
    ctrl.setblocking(True)
    ok, detail = probe_userns()
    ctrl.send(json.dumps({"t": "hello", "userns": ok, "detail": detail}).encode())
    try:
        Server(ctrl).serve()
    finally:
        sys.stdout.flush()
    os._exit(0)
