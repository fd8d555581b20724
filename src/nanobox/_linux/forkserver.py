"""The fork server: one small, single-threaded supervisor per caller process.

Forking a multithreaded Python process and running Python in the child can
deadlock, and most callers have threads (thread pools, asyncio executors).
So the caller starts this server once (a fresh ``python -I -S`` interpreter,
or a plain fork when the caller is known to be single-threaded, as the CLI
is) and asks it for every run over a ``SOCK_SEQPACKET`` control socket.

Protocol (one message each, ``wire``-encoded, plus SCM_RIGHTS fds):

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

import gc
import os
import resource
import sys
import time

from . import (
    cgroups,
    forker,
    placeholders,
    poller,
    signals,
    socks,
    spawn,
    supervise,
    userns,
    watch,
    wire,
)
from . import sys as k
from .socks import recv_fds, recv_msg, send_msg

LINGER_RETRY_S = 0.5  # a placeholder another server still holds: removed when it lets go
TYPE_CHECKING = False  # not ``typing``'s: the fork server starts without it
if TYPE_CHECKING:
    from typing import Any

# Root callers' sandboxes run as a dedicated uid from this range.
ROOT_UID_BASE = 0x60000000
ROOT_UID_SPAN = 0x0FFFFFFF


# A spare starter (and a sandbox built ahead) is kept this long after the
# last run ended (and not while a run is in progress), waiting for the next.
SPARE_LINGER_S = 1.0
# A sandbox built ahead is not used after this long (whatever happened).
WARM_MAX_AGE_S = 10.0
# Exits of pids no stage A has reported are forgotten after this long.
EARLY_EXIT_KEEP_S = 120.0
# Until a sandbox has been built ahead, how long building one is assumed to take.
BUILD_GUESS_S = 0.01


def defer_build(gap: float, previous_gap: float, build_s: float, *, busy: bool) -> bool:
    """Build the next sandbox after this run rather than during it?

    Only for a caller that pauses between runs: idle for longer than a
    build takes before this run *and* before the one ahead of it, with no
    other run in progress. One long gap among short ones (a garbage
    collection or a preemption in the caller) does not make a back-to-back
    caller's next run start without a sandbox built ahead; one short gap
    after pauses gets the build at once."""
    if busy:
        return False
    return min(gap, previous_gap) >= build_s


class _Job:
    __slots__ = (
        "abandoned",
        "buffer",
        "chan",
        "client_gone",
        "cmd_w",
        "created",
        "exit_status",
        "finished",
        "group",
        "joined_cpu",
        "kill_asked",
        "pending",
        "pending_listener",
        "pid",
        "placeholders",
        "plan",
        "prep_cpu",
        "prewarmed",
        "ready",
        "report",
        "run",
        "run_msg",
        "sock",
        "stale",
        "started",
        "starter",
        "starter_cpu",
        "starter_pid",
        "static",
        "status_r",
        "tmpdir",
    )

    def __init__(self, starter: spawn.Starter, plan: dict[str, Any], static: bytes) -> None:
        self.chan: socks.Socket | None = None  # the caller's, once a run claims the job
        self.starter = starter
        self.starter_pid = starter.pid
        # Stage A's CPU time, user and system, once it is reaped: all of it,
        # its exit included (what its own lines said stops before that).
        self.starter_cpu: tuple[float, float] | None = None
        self.joined_cpu: tuple[float, float] | None = None  # at its join (no-namespace mode)
        self.status_r = starter.status_r
        self.cmd_w = starter.cmd_w
        self.sock: socks.Socket | None = starter.csock  # the command's listener comes here
        self.group: cgroups.RunGroup | None = starter.group
        self.plan = plan
        self.static = static  # the plan's bytes as the caller sent them
        self.stale = False  # a path its view depends on changed on the host
        self.buffer = bytearray()
        self.pid: int | None = None  # the init's, once stage A reports it
        self.run: supervise.Run | None = None  # set when the server supervises it
        self.report: bytes | None = None  # the init's own report (no-namespace mode)
        self.pending: list[bytes] = []  # the command's lines that came before "P"
        self.pending_listener: int | None = None  # its seccomp listener, likewise
        # The command process's own CPU before its exec, once its "L" says.
        self.prep_cpu: tuple[float, float] | None = None
        self.ready = False  # the command's process waits for its run
        self.prewarmed = False  # built ahead, before any run asked for it
        self.abandoned = False  # let go unclaimed (``_abandon``): its news counts for nothing
        self.run_msg: tuple[bytes, list[int]] | None = None  # its run, until it is ready
        self.placeholders: list[str] = []
        self.tmpdir: str | None = None
        self.started = time.monotonic()
        self.created = self.started  # (``started`` moves to the claim)
        self.exit_status: int | None = None
        self.finished = False
        self.client_gone = False
        self.kill_asked = False


class Server:
    def __init__(self, ctrl: socks.Socket, refill: bool = True) -> None:
        self.ctrl = ctrl
        self.refill = refill
        self.sel = poller.Poller()
        self.jobs: set[_Job] = set()
        self.starting: dict[int, _Job] = {}  # stage A pid -> its job, until reaped
        self.jobs_by_pid: dict[int, _Job] = {}  # init pid -> job
        self.jobs_by_cmd: dict[int, _Job] = {}  # command pid -> job (supervised runs)
        self.timed: set[_Job] = set()  # supervised runs with a wall or CPU limit
        # Children reaped before their stage A's report was read.
        # pid -> (wait status, rusage, when)
        self.early_exits: dict[int, tuple[int, Any, float]] = {}
        self.helpers: set[int] = set()
        self.ident = cgroups.server_ident()
        self.placeholders = placeholders.Placeholders(self.ident)
        placeholders.sweep_placeholders()
        self.counter = 0
        self.swept: set[str] = set()
        self.spare: spawn.Starter | None = None
        self.spare_until = 0.0
        self.last_key: Any = None
        self.warm: _Job | None = None  # a sandbox built ahead for the next run
        # Build the next run's sandbox when this run has ended, not now
        # (see _should_defer): (plan bytes, decoded plan).
        self.deferred: tuple[bytes, dict[str, Any]] | None = None
        self.last_reply = 0.0  # when the last result went out
        self.last_gap = float("inf")  # idle time before the last run (_should_defer)
        self.build_s = BUILD_GUESS_S  # how long the last sandbox built ahead took
        self.refill_when_ready = False  # make the next spare once self.warm is built
        self.watcher: watch.Watcher | None = None  # host changes under it
        self.view_paths: tuple[bytes, list[str]] = (b"", [])  # (plan bytes, watch.view_paths)
        self.static: tuple[bytes, dict[str, Any]] = (b"", {})
        # Groups of discarded starters (and of inits that reported before
        # they exited): removed once that process is reaped.
        self.discarded: dict[int, cgroups.RunGroup | None] = {}
        self.wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signals.set_wakeup_fd(wake_w)
        signals.signal(signals.SIGCHLD, lambda _s, _f: None)
        # Forks every stage A (see forker); a one-shot server forks its own.
        self.forker: forker.Forker | forker.Direct = forker.Forker() if refill else forker.Direct()
        self.forker_events = poller.EVENT_READ
        if self.forker.sock is not None:
            self.sel.register(self.forker.sock, poller.EVENT_READ, ("forker", None))
        self.sel.register(ctrl, poller.EVENT_READ, ("ctrl", None))
        self.sel.register(self.wake_r, poller.EVENT_READ, ("wake", None))

    # -- main loop ---------------------------------------------------------
    def _timeout(self) -> float | None:
        keep = self.spare is not None or self.warm is not None
        times = [self.spare_until] if keep else []
        if self.placeholders.lingering:  # held elsewhere: look again now and then
            times.append(time.monotonic() + LINGER_RETRY_S)
        for job in self.timed:
            t = job.run.next_timer() if job.run is not None else None
            if t is not None:
                times.append(t)
        if not times:
            return None
        return max(0.0, min(times) - time.monotonic())

    def serve(self) -> None:
        while True:
            self._watch_forker()
            events = self.sel.select(self._timeout())
            now = time.monotonic()
            if now >= self.spare_until:
                self._linger_over(now)
            for key, mask in events:
                what, job = key.data
                if what == "ctrl":
                    if not self._on_ctrl():
                        self.shutdown()
                        return
                elif what == "wake":
                    self._drain_wake()
                    self._reap()
                elif what == "forker":
                    if mask & poller.EVENT_WRITE:
                        self.forker.flush()
                    try:
                        gone = self.forker.exited() if mask & poller.EVENT_READ else []
                    except ConnectionError:
                        self.shutdown()  # no more sandboxes: the caller starts a new server
                        return
                    for ident, cpu in gone:
                        self._reaped(ident, 0, cpu)  # a stage A exited
                elif what == "watch":
                    self._on_watch()
                elif job.finished:
                    continue  # a stale event from this batch: its fds are closed
                elif what == "chan":
                    self._on_chan(job)
                elif what == "status":
                    self._on_status(job)
                elif what == "sock":
                    self._on_sock(job)
                elif what == "notify":
                    self._on_notify(job)
                elif what == "helper":
                    self._on_helper(job)
            self._check_timers()
            self.placeholders.tidy()

    def _watch_forker(self) -> None:
        """Wait for room on the forker's socket only while requests queue."""
        if self.forker.sock is None:
            return
        want = poller.EVENT_READ | (poller.EVENT_WRITE if self.forker.pending else 0)
        if want != self.forker_events:
            self.forker_events = want
            self.sel.modify(self.forker.sock, want, ("forker", None))

    def _check_timers(self) -> None:
        now = time.monotonic()
        for job in list(self.timed):
            if job.run is not None and job.run.check_timers(now, self._group_cpu(job)):
                self._end_run(job)

    @staticmethod
    def _group_cpu(job: _Job) -> Any:
        if job.group is None:
            return None
        return job.group.cpu_seconds

    # -- starters ----------------------------------------------------------
    @staticmethod
    def _key(plan: dict[str, Any]) -> Any:
        spec = plan.get("cgroup")
        placement = _placement_key(spec["placement"]) if spec else None
        return (placement, bool(plan.get("outer_uid") == 0 and plan.get("root_mapping")))

    def _new_starter(self, key: Any) -> spawn.Starter:
        """Fork a stage A for runs like ``key``: its cgroups are created now
        (limits come with the plan), its id mapping too."""
        placement_key, root_mapping = key
        self.counter += 1
        group: cgroups.RunGroup | None = None
        if placement_key is not None:
            placement = _placement(placement_key)
            every = [*placement.bases.values(), *placement.unused.values()]
            if not self.swept.issuperset(every):
                self.swept.update(every)
                cgroups.sweep(placement)
            group = cgroups.RunGroup.create(placement, f"{self.ident}.{self.counter}", {})
        sid = None
        if root_mapping:
            # Root callers' sandboxes run as a dedicated unprivileged uid.
            sid = ROOT_UID_BASE + ((os.getpid() << 12 | (self.counter & 0xFFF)) % ROOT_UID_SPAN)
        try:
            return spawn.fork_starter(
                self.forker, group.join_files() if group else [], sid, key, group
            )
        except BaseException:
            if group is not None:
                group.remove()
            raise

    def _take_starter(self, key: Any) -> spawn.Starter:
        spare, self.spare = self.spare, None
        if spare is not None:
            if spare.key == key:
                return spare
            self._discard(spare)
        return self._new_starter(key)

    def _discard(self, starter: spawn.Starter) -> None:
        starter.discard()
        self.discarded[starter.pid] = starter.group

    def _busy(self) -> bool:
        """Is a run in progress (claimed, not ended)?"""
        return any(j.chan is not None and not j.finished for j in self.jobs)

    def _building(self, now: float) -> bool:
        """Is a sandbox being built ahead, and not too old to be used?"""
        warm = self.warm
        return (
            warm is not None
            and not warm.ready
            and not warm.finished
            and now - warm.created < WARM_MAX_AGE_S
        )

    def _linger_over(self, now: float) -> None:
        """The spare starter and the sandbox built ahead go once no run has
        come for ``SPARE_LINGER_S`` after the last one ended, never while a
        run is in progress: a sandbox built during a run that lasts longer
        than that is the next run's (back to back), not waste. Nor while
        the sandbox is still being built (up to ``WARM_MAX_AGE_S``): on a
        host where a build takes longer than the linger, dropping it then
        left no run a sandbox built ahead, nor a spare (made once the build
        is ready), ever."""
        if not self._busy() and not self._building(now):
            self._drop_spare()
            return
        self.spare_until = now + SPARE_LINGER_S  # (looked at again then)
        warm = self.warm
        if warm is not None and now - warm.started >= WARM_MAX_AGE_S:
            # Too old for any run to take (``_take_warm``): built anew
            # when a run ends.
            self._drop_warm()
            if self.deferred is None:
                self.deferred = (warm.static, self._decode(warm.static))

    def _drop_warm(self) -> None:
        if self.warm is not None:
            self._abandon(self.warm)
            self.warm = None
            if self.watcher is not None:
                self.watcher.stop()

    def _drop_spare(self) -> None:
        self.refill_when_ready = False
        if self.spare is not None:
            self._discard(self.spare)
            self.spare = None
        self._drop_warm()

    def _refill(self) -> None:
        """After a run: have the next run's stage A ready (for a while)."""
        if self.refill:
            self.make_spare()

    def make_spare(self) -> None:
        if self.last_key is None:
            return
        self.spare_until = time.monotonic() + SPARE_LINGER_S
        if self.spare is not None:
            return
        try:
            self.spare = self._new_starter(self.last_key)
        except Exception:  # noqa: BLE001 - the next run forks its own, and reports
            self.spare = None

    # -- requests ----------------------------------------------------------
    def _on_ctrl(self) -> bool:
        try:
            msg, fds = recv_msg(self.ctrl, 8)
        except InterruptedError:  # pragma: no cover
            return True
        except ConnectionResetError:
            return False  # the caller is gone
        except socks.BadMessage:
            # A message cut short or too long (its fds are closed: that run's
            # caller sees its channel close). Keep serving the others.
            return True
        if not msg and not fds:
            return False
        if len(fds) != 4:
            for fd in fds:
                os.close(fd)
            return True
        chan = socks.Socket(fileno=fds[0])
        stdio = [fds[1], fds[2], fds[3]]
        job: _Job | None = None
        step = "cgroup"
        try:
            # The run's own part, then the plan's, which is the same bytes
            # for every run of a Sandbox in one directory, passed on as is.
            head, static = wire.split_run(msg)
            run = wire.loads(head)
            base = self._decode(static)
            plan = {**base, **run}
            if plan.get("mode") == "nons":
                # Its own copy: a private $TMPDIR is added to nested lists.
                job = self._start_nons({**wire.loads(static), **run}, stdio)
            else:
                job = self._take_warm(static)
                if job is not None:
                    try:
                        self._claim(job, plan, stdio)
                    except placeholders.PlaceholderError:
                        self._abandon(job)
                        raise  # (a new sandbox would wait for the same name again)
                    except OSError:
                        self._abandon(job)  # its command process just died: a new one
                        job = None
                if job is None:
                    extra = [chan.fileno()] if base.get("proxy") else []
                    job = self._launch(static, base, extra)
                    step = "spawn"
                    self._claim(job, plan, stdio)
                self.deferred = None
                if self.refill and _can_build_ahead(base):
                    if self._should_defer(job):
                        self.deferred = (static, base)
                    else:
                        self._prewarm(static, base)
        except Exception as exc:  # noqa: BLE001 - report, keep serving
            failed = None
            if job is not None and isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                failed = self._failure_of(job)  # (stage A is gone: its own error says why)
            if job is not None:
                self._abandon(job)
            self.last_reply = time.monotonic()
            self._send(
                chan,
                failed
                or {
                    "t": "error",
                    "step": step,
                    "errno": getattr(exc, "errno", None),
                    "message": str(exc),
                },
            )
            chan.close()
            return True
        finally:
            for fd in stdio:
                os.close(fd)
        job.chan = chan
        chan.setblocking(False)
        self.sel.register(chan, poller.EVENT_READ, ("chan", job))
        return True

    def _decode(self, static: bytes) -> dict[str, Any]:
        """The plan, decoded once for a run of runs alike."""
        if static != self.static[0]:
            self.static = (static, wire.loads(static))
        return self.static[1]

    def _launch(self, static: bytes, base: dict[str, Any], fds: list[int]) -> _Job:
        """A stage A (the spare, if it fits) building a sandbox for ``base``;
        it waits for ``go`` (``_claim``) before the command may start."""
        key = self._key(base)
        self.last_key = key
        starter = self._take_starter(key)
        try:
            if starter.group is not None:
                limits = dict(base["cgroup"]["limits"])
                if limits.get("pids") is not None:
                    limits["pids"] += 1  # stage A's own, until it is reaped (_settle_pids)
                starter.group.apply(limits)
            starter.start(static, fds)
        except BaseException:
            self._discard(starter)
            raise
        job = _Job(starter, base, static)
        self._watch(job)
        return job

    def _watch(self, job: _Job) -> None:
        self.jobs.add(job)
        self.starting[job.starter_pid] = job
        os.set_blocking(job.status_r, False)
        self.sel.register(job.status_r, poller.EVENT_READ, ("status", job))
        assert job.sock is not None
        job.sock.setblocking(False)
        self.sel.register(job.sock, poller.EVENT_READ, ("sock", job))

    def _claim(self, job: _Job, plan: dict[str, Any], stdio: list[int]) -> None:
        """Start the run in ``job``'s sandbox (built, or still being built):
        its placeholders now, then argv/env/stdio to the command and
        ``go`` to stage A."""
        if job.starter.sid is not None:
            plan["userns_root"] = True
        job.plan = plan
        job.started = time.monotonic()
        skipped: list[int] = []
        job.placeholders = self.placeholders.acquire(plan.get("placeholders", ()), skipped)
        job.run_msg = (
            wire.dumps([plan["argv"], plan["env"]]),
            [os.dup(fd) for fd in stdio],
        )
        if job.ready:
            self._send_run(job)
        job.starter.go(skipped)

    def _send_run(self, job: _Job) -> None:
        if job.run_msg is not None:
            msg, fds = job.run_msg
            job.run_msg = None
            try:
                job.starter.send_run(msg, fds)
            finally:
                for fd in fds:
                    os.close(fd)

    def _start_nons(self, plan: dict[str, Any], stdio: list[int]) -> _Job:
        """No namespaces: stage A forks the supervising init, which gets the
        whole plan at once (and a private $TMPDIR) with the stdio fds."""
        tmpdir = make_private_tmp(plan)
        try:
            job = self._launch(wire.dumps(plan), plan, stdio)
        except BaseException:
            remove_tree(tmpdir)
            raise
        job.tmpdir = tmpdir
        # (Without a mount namespace a root caller's command could remount a
        # read-only filesystem: only an unprivileged one skips a name.)
        skipped: list[int] | None = [] if os.geteuid() != 0 else None
        job.placeholders = self.placeholders.acquire(plan.get("placeholders", ()), skipped)
        return job

    # -- sandboxes built ahead -------------------------------------------------
    def _prewarm(self, static: bytes, base: dict[str, Any]) -> None:
        """Build the next run's sandbox now, from this run's plan: the next
        run with the same plan bytes only has to claim it. Kept while the
        spare is (``_linger_over``), while it is being built, and at least
        ``SPARE_LINGER_S`` once built."""
        if self.warm is not None:
            return
        self.spare_until = time.monotonic() + SPARE_LINGER_S
        try:
            if watch.missing_mount_points(base):
                return
            # Watched from before stage A sees the host (see watch.py).
            if self.watcher is None:
                self.watcher = watch.Watcher()
                self.sel.register(self.watcher, poller.EVENT_READ, ("watch", None))
            if self.view_paths[0] != static:
                # (A pure function of the plan: worked out once per plan.)
                self.view_paths = (static, watch.view_paths(base))
            self.watcher.watch(self.view_paths[1])
            self.warm = self._launch(static, base, [])
            self.warm.prewarmed = True
        except Exception:  # noqa: BLE001 - only an optimisation: never fail the run
            if self.watcher is not None:
                self.watcher.stop()
            self.warm = None

    def _should_defer(self, job: _Job) -> bool:
        """Build the next sandbox when this run has ended rather than now?

        Built now, it competes with this run's start for both cores and the
        kernel's namespace and mount locks (a warm start on an idle host took
        9-10 ms that way, 6-6.5 ms with the build after the run). That pays
        off when the caller leaves the server idle between runs for longer
        than a build takes: judged by the gaps before this run and the one
        before (``defer_build``). A caller running back to back, or other
        runs in progress (a concurrent caller), get the build now, which
        overlaps it with the run."""
        gap = job.started - self.last_reply
        previous, self.last_gap = self.last_gap, gap
        # (``job`` itself has no channel yet: it is not counted.)
        return defer_build(gap, previous, self.build_s, busy=self._busy())

    def _on_watch(self) -> None:
        if self.watcher is not None and self.watcher.changed() and self.warm is not None:
            self.warm.stale = True

    def _take_warm(self, static: bytes) -> _Job | None:
        """The sandbox built ahead, if this run may have it: same plan bytes,
        nothing on the host changed under its view since (``stale``), not
        too old, and its command process alive and without an error."""
        if self.warm is None:
            return None
        self._on_watch()  # events not read yet count too
        if self.watcher is not None:
            self.watcher.stop()
        warm, self.warm = self.warm, None
        usable = (
            warm.static == static
            and not warm.finished
            and not warm.stale
            and warm.sock is not None
            and not warm.pending
            and time.monotonic() - warm.started < WARM_MAX_AGE_S
        )
        if usable:
            return warm
        self._abandon(warm)
        return None

    def _failure_of(self, job: _Job, wait_s: float = 1.0) -> dict[str, Any] | None:
        """Why ``job``'s stage A went away, found by a write to it failing
        (EPIPE): its ``E`` line, which it writes before it exits, read from
        its status pipe; None if there is none. Without this the run's
        error was the broken pipe ("setup failed at step 'spawn': Broken
        pipe") whenever the write came before the line was read, and not,
        say, that /proc could not be mounted."""
        import select

        buffer = bytearray(job.buffer)
        deadline = time.monotonic() + wait_s
        while job.status_r != -1 and b"\nE" not in b"\n" + buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([job.status_r], [], [], left)[0]:
                break
            try:
                chunk = os.read(job.status_r, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                break
            buffer += chunk
        job.buffer = buffer
        for line in bytes(buffer).split(b"\n"):
            if line.startswith(b"E"):
                try:
                    return {"t": "error", **wire.status_loads(line[1:])}
                except ValueError:
                    return None
        return None

    def _abandon(self, job: _Job) -> None:
        """Let an unclaimed (or failed-to-start) sandbox go: its stage A
        sees EOF instead of ``go`` and kills what it built."""
        job.client_gone = True
        job.abandoned = True
        job.starter.sock.close()
        if job.pid is not None:
            self._kill(job)
        else:
            job.kill_asked = True  # in case "go" went out: killed as soon as it is known

    def _drain_wake(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _reap(self) -> None:
        while True:
            try:
                pid, status, rusage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._reaped(pid, status, rusage)

    def _reaped(self, pid: int, status: int, rusage: Any) -> None:
        if self.spare is not None and self.spare.pid == pid:
            # The spare died (or was never forked): not usable any more.
            spare, self.spare = self.spare, None
            spare.discard()
            if spare.group is not None:
                spare.group.remove()
            return
        if pid in self.discarded:
            group = self.discarded.pop(pid)
            if group is not None:
                group.remove()
            return
        if pid in self.helpers:
            self.helpers.discard(pid)
            return
        job = self.jobs_by_cmd.get(pid)
        if job is not None and job.run is not None:
            job.run.on_cmd_exit(status, rusage)
            self._end_run(job)
            self._maybe_finish(job)
            return
        job = self.jobs_by_pid.get(pid)
        if job is not None:
            job.exit_status = status
            if job.run is not None:
                job.run.init_done = True
                job.run.init_rusage = rusage
            self._maybe_finish(job)
        elif (started := self.starting.pop(pid, None)) is not None:
            # A stage A exited: ``rusage`` is its CPU time as the forker
            # sent it, or this process's own child's rusage.
            # (A struct_rusage is a tuple too: told apart by its fields.)
            cpu = rusage
            if hasattr(rusage, "ru_utime"):
                cpu = (rusage.ru_utime, rusage.ru_stime)
            started.starter_cpu = cpu
            if started.run is not None:
                started.run.starter_cpu = cpu
            self._settle_pids(started)
            self._maybe_finish(started)  # (a run's result waits for this exit)
        elif pid > 0:
            # An init or command whose stage A's "P" line is not read yet
            # (or a child of a stage A that died: kept for a while only).
            now = time.monotonic()
            for old, (_s, _r, at) in list(self.early_exits.items()):
                if now - at > EARLY_EXIT_KEEP_S:
                    del self.early_exits[old]
            self.early_exits[pid] = (status, rusage, now)

    def _take_early(self, pid: int, job: _Job) -> tuple[int, Any] | None:
        """The exit of ``pid`` reaped before ``job``'s stage A named it, if
        it came after that stage A started (an older one was another
        process's that had the same pid)."""
        early = self.early_exits.pop(pid, None)
        if early is None or early[2] < job.created:
            return None
        return early[0], early[1]

    def _end_run(self, job: _Job) -> None:
        """The command ended or a limit was hit: kill the sandbox."""
        if job.run is not None:
            job.run.kill(sample_orphans=job.group is None)

    def _on_chan(self, job: _Job) -> None:
        assert job.chan is not None
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
            self._kill_on_request(job)

    def _kill_on_request(self, job: _Job) -> None:
        """The caller asked to kill the run (its result says "killed")."""
        if job.pid is None:
            job.kill_asked = True  # the init is not known yet: kill it when it is
        elif job.run is not None:
            if job.run.cmd_status is None and job.run.reason == "exited":
                job.run.reason, job.run.end = "killed", time.monotonic()
            self._end_run(job)
        else:
            try:
                os.write(job.cmd_w, b"K")  # the no-namespace init kills and reports
            except OSError:
                pass

    def _kill(self, job: _Job) -> None:
        if job.pid is None:
            job.kill_asked = True
            return
        if job.run is not None:
            self._end_run(job)
        elif job.exit_status is None:
            try:
                os.kill(job.pid, signals.SIGKILL)  # still our unreaped child: no reuse
            except ProcessLookupError:
                pass

    def _on_status(self, job: _Job) -> None:
        try:
            chunk = os.read(job.status_r, 65536)
        except BlockingIOError:
            return
        if chunk:
            job.buffer += chunk
        else:
            self.sel.unregister(job.status_r)
            os.close(job.status_r)
            job.status_r = -1
        while b"\n" in job.buffer:
            line, _, rest = bytes(job.buffer).partition(b"\n")
            job.buffer = bytearray(rest)
            if not self._on_line(job, line):
                return
        if job.status_r == -1 and job.pid is None:
            self._setup_failed(job, bytes(job.buffer))
            return
        run = job.run
        if job.status_r == -1 and run is not None and not run.cmd_pid and run.cmd_status is None:
            run.command_lost()  # stage A is gone without a "C" line
            self._end_run(job)
        self._maybe_finish(job)

    def _on_line(self, job: _Job, line: bytes) -> bool:
        """One line on a run's status pipe; False when the job is over."""
        if job.pid is None:
            if line.startswith(b"P{"):
                info = wire.status_loads(line[1:])
                run = supervise.Run(info, job.plan)
                run.prep_cpu = job.prep_cpu
                run.starter_cpu = job.starter_cpu  # (if stage A was reaped already)
                job.run, job.pid = run, run.init_pid
                run.hold_namespaces()
                if run.next_timer() is not None:
                    self.timed.add(job)
                self.jobs_by_pid[run.init_pid] = job
                if run.cmd_pid:  # (else stage A starts it: a "C" line follows)
                    self.jobs_by_cmd[run.cmd_pid] = job
                for pending in job.pending:
                    run.on_line(pending)
                if job.pending_listener is not None:
                    self._take_listener(job, job.pending_listener)
                    job.pending_listener = None
                for pid in (run.cmd_pid, run.init_pid):
                    early = self._take_early(pid, job) if pid else None
                    if early is not None:
                        self._reaped(pid, *early)
            elif line.startswith(b"P") and _nons_started(line):
                # No namespaces: the init supervises; "P<pid> <user> <system>".
                pid, *joined = (int(f) for f in line[1:].split())
                job.pid = pid
                job.joined_cpu = (joined[0] / 1e6, joined[1] / 1e6)
                self.jobs_by_pid[job.pid] = job
                early = self._take_early(job.pid, job)
                if early is not None:
                    job.exit_status = early[0]
            elif line[:1] in (b"S", b"X"):
                job.pending.append(line)  # the command's, before stage A's "P"
                return True
            else:
                self._setup_failed(job, line)
                return False
            if job.kill_asked:
                if job.client_gone:
                    self._kill(job)
                else:
                    self._kill_on_request(job)
            return True
        if job.run is not None:
            if line.startswith(b"C{") and not job.run.cmd_pid:
                self._command_started(job, wire.status_loads(line[1:]))
            else:
                job.run.on_line(line)
        elif job.report is None:
            job.report = line
        return True

    def _settle_pids(self, job: _Job) -> None:
        """Stage A was reaped: the pids limit loses the slot A held in the
        run's group (a process counts until it is reaped; while A lived,
        the command's first forks must not find its slot taken, as they did
        in 2 of 20 runs of ``sh -c 'true && echo ok'`` under pids=2). For
        the moment between the reap and this write, the command could have
        one task more than its limit."""
        limits = (job.plan.get("cgroup") or {}).get("limits") or {}
        if job.group is not None and limits.get("pids") is not None:
            try:
                job.group.apply({"pids": limits["pids"]})
            except OSError:
                pass  # the group is going

    def _command_started(self, job: _Job, info: dict[str, Any]) -> None:
        """Stage A's "C" line: it started the command (pid, start time)."""
        run = job.run
        assert run is not None
        run.set_command(info)
        self.jobs_by_cmd[run.cmd_pid] = job
        early = self._take_early(run.cmd_pid, job)
        if early is not None:
            self._reaped(run.cmd_pid, *early)

    def _on_sock(self, job: _Job) -> None:
        """The command says it is ready for its run ("R"), then hands over
        its CPU time so far and seccomp listener ("L"), then execs (closing
        the socket)."""
        assert job.sock is not None
        try:
            msg, fds = recv_fds(job.sock, 256, 1)
        except BlockingIOError:
            return
        except OSError:
            fds = []
            msg = b""
        if msg == b"R":
            job.ready = True
            if job.prewarmed and not job.abandoned:
                now = time.monotonic()
                self.build_s = now - job.created
                # Kept for a while once built, however long that took.
                self.spare_until = max(self.spare_until, now + SPARE_LINGER_S)
                if self.refill_when_ready:
                    self.refill_when_ready = False
                    self._refill()
            if job.run_msg is not None:
                try:
                    self._send_run(job)
                except OSError:
                    # Its process died (its status says why), or the run could
                    # not be sent (no memfd for a long one): EOF tells the
                    # command's side that no run comes, rather than leave it
                    # waiting.
                    self._close_sock(job)
            return
        if msg.startswith(b"L"):
            try:
                u, s = wire.status_loads(msg[1:])
                self._prep_cpu(job, (float(u), float(s)))
            except ValueError:
                self._prep_cpu(job, (0.0, 0.0))  # (nanobox's own: never malformed in practice)
        if fds:
            if job.run is None:
                job.pending_listener = fds[0]  # taken with stage A's "P" line
            else:
                self._take_listener(job, fds[0])
            for fd in fds[1:]:
                os.close(fd)
            return
        if not msg and not fds:
            self._close_sock(job)

    def _close_sock(self, job: _Job) -> None:
        if job.sock is not None:
            self.sel.unregister(job.sock)
            job.sock.close()
            job.sock = None
        if job.prep_cpu is None:
            # No "L" can come now: the CPU limit is judged as if it had
            # said (0, 0) rather than not at all (``Run.tree_cpu``).
            self._prep_cpu(job, (0.0, 0.0))

    @staticmethod
    def _prep_cpu(job: _Job, cpu: tuple[float, float]) -> None:
        job.prep_cpu = cpu
        if job.run is not None:
            job.run.prep_cpu = cpu

    def _take_listener(self, job: _Job, fd: int) -> None:
        assert job.run is not None
        job.run.take_listener(fd)
        self.sel.register(fd, poller.EVENT_READ, ("notify", job))

    def _on_notify(self, job: _Job) -> None:
        run = job.run
        assert run is not None and run.listener is not None
        helper_before = run.helper
        if not run.listener.handle():
            self.sel.unregister(run.listener.fd)
        if run.helper is not None and run.helper is not helper_before:
            self.helpers.add(run.helper.pid)
            self.sel.register(run.helper.sock, poller.EVENT_READ, ("helper", job))

    def _on_helper(self, job: _Job) -> None:
        run = job.run
        assert run is not None and run.helper is not None
        got = run.helper.drain()
        run.denied.extend(got)

    def _setup_failed(self, job: _Job, line: bytes) -> None:
        """Stage A failed (or died) before an init existed."""
        job.finished = True
        self.jobs.discard(job)
        if job.prewarmed and not job.ready and not job.abandoned and self.refill_when_ready:
            self.refill_when_ready = False  # that build will not be ready: the spare now
            self._refill()
        pending = [p for p in job.pending if p[:1] == b"S"]
        if pending:
            # The command's process failed first (stage A's error follows from it).
            msg: dict[str, Any] = {"t": "error", **wire.status_loads(pending[0][1:])}
        elif line.startswith(b"E"):
            msg = {"t": "error", **wire.status_loads(line[1:])}
        else:
            message = "setup process died"
            if job.group is not None and job.group.stats().get("oom_kills", 0) > 0:
                # (Stage A is in the run's groups from its start: what it
                # copies of the server's memory is charged there.)
                message += (
                    ": the memory limit was reached while the sandbox was being set up, "
                    "which is charged to it too; raise the memory limit"
                )
            msg = {"t": "error", "step": "spawn", "errno": None, "message": message}
        self._close_job(job)
        # The starter exits by itself; its group goes when it is reaped.
        if self.starting.pop(job.starter_pid, None) is not None:
            self.discarded[job.starter_pid] = job.group
        elif job.group is not None:
            job.group.remove()
        job.group = None
        self._reply(job, msg)

    def _close_job(self, job: _Job) -> None:
        if job.status_r != -1:
            self.sel.unregister(job.status_r)
            os.close(job.status_r)
            job.status_r = -1
        if job.sock is not None:
            self.sel.unregister(job.sock)
            job.sock.close()
            job.sock = None
        if job.pending_listener is not None:
            os.close(job.pending_listener)
            job.pending_listener = None
        if job.run is not None:
            run = job.run
            if run.listener is not None:
                try:
                    self.sel.unregister(run.listener.fd)
                except (KeyError, ValueError):
                    pass
            if run.helper is not None:
                run.denied.extend(run.helper.drain())
                self.sel.unregister(run.helper.sock)
            run.close()
        job.starter.sock.close()
        if job.run_msg is not None:
            for fd in job.run_msg[1]:
                os.close(fd)
            job.run_msg = None
        os.close(job.cmd_w)
        # Before replying: when run() returns, the workspace is as it was.
        self.placeholders.release(job.placeholders)
        remove_tree(job.tmpdir)

    def _reply(self, job: _Job, msg: dict[str, Any]) -> None:
        if job.chan is None:
            return  # a sandbox built ahead that no run claimed
        if not job.client_gone:
            self._send(job.chan, msg)
            self.sel.unregister(job.chan)
        _drain(job.chan)
        job.chan.close()
        self.last_reply = time.monotonic()
        if self.deferred is not None:
            static, base = self.deferred
            self.deferred = None
            self._prewarm(static, base)  # takes the spare, if any
            if self.warm is not None:
                # The next spare once that sandbox is built: its cgroup
                # migration would slow the build down (and the next run, if
                # it came meanwhile).
                self.refill_when_ready = True
                return
        self._refill()

    def _maybe_finish(self, job: _Job) -> None:
        if job.finished or job.pid is None:
            return
        run = job.run
        if run is not None:
            # Supervised here: the command was reaped, the init too (so the
            # whole pid namespace is gone), its last line was read, and its
            # stage A reaped (its exit is in the group's CPU time: nanobox's
            # own, which the report leaves out of the command's).
            if not run.done() or job.status_r != -1 or job.starter_pid in self.starting:
                return
            if run.prep_cpu is None and job.sock is not None:
                self._on_sock(job)  # its "L" if sent (what is nanobox's in the group)
            msg: dict[str, Any] = {"t": "result", **run.report()}
            stats = job.group.stats() if job.group is not None else None
            if run.init_lost and not (stats or {}).get("oom_kills"):
                # PID 1 died while the command ran, and not by our hand.
                msg = {
                    "t": "error",
                    "step": "supervise",
                    "errno": None,
                    "message": f"sandbox init died (wait status {job.exit_status})",
                }
            linger = False
        else:
            stats = None
            reported = job.report is not None
            if not reported and (job.exit_status is None or job.status_r != -1):
                return  # running, or the report may still be in flight
            if job.starter_pid in self.starting:
                return  # its stage A's CPU (in the group) is still to come
            # The init writes its report after every other process of the
            # sandbox is dead and reaped; it exits right after. Reply now,
            # and remove the groups once it is reaped (busy until then).
            linger = job.exit_status is None
            msg = self._init_report(job)
        job.finished = True
        self.jobs.discard(job)
        self.timed.discard(job)
        self.jobs_by_pid.pop(job.pid, None)
        if run is not None:
            self.jobs_by_cmd.pop(run.cmd_pid, None)
        if linger:
            self.discarded[job.pid] = job.group
        if job.group is not None:
            msg["cgroup"] = stats if stats is not None else job.group.stats()
        if run is not None:
            run.release_namespaces()
        self._close_job(job)
        self._reply(job, msg)
        if job.group is not None and not linger:
            # After replying: the caller does not wait for the removal. The
            # group is empty (the pid namespace died with its init).
            job.group.remove()

    def _init_report(self, job: _Job) -> dict[str, Any]:
        line = job.report or b""
        if line.startswith(b"R"):
            report: dict[str, Any] = wire.status_loads(line[1:])
            # The command's own line, passed on as is by the init (see init.py).
            raw = report.pop("exec_error_line", None)
            if raw:
                try:
                    detail = wire.status_loads(raw[1:].encode())
                except ValueError:
                    detail = {"step": "exec", "message": "setup failed"}
                report["exec_error"] = {"kind": raw[:1], **detail}
            if job.starter_cpu is not None and job.joined_cpu is not None:
                # Stage A's CPU in the group (forking the init, its exit) is
                # nanobox's too, beside the init's own.
                report["self_utime"] += max(0.0, job.starter_cpu[0] - job.joined_cpu[0])
                report["self_stime"] += max(0.0, job.starter_cpu[1] - job.joined_cpu[1])
            return {"t": "result", **report}
        if line.startswith(b"E"):
            return {"t": "error", **wire.status_loads(line[1:])}
        msg: dict[str, Any] = {
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
        return msg

    @staticmethod
    def _send(chan: socks.Socket, msg: dict[str, Any]) -> None:
        try:
            chan.setblocking(True)
            chan.settimeout(5.0)
            send_msg(chan, wire.dumps(msg))
        except OSError:
            pass

    def shutdown(self) -> None:
        self._drop_spare()
        jobs = list(self.jobs)
        # Every child left is a sandbox's init or command, a stage A or a
        # broker helper (an init whose pid was never read is ours too, as
        # subreaper, once its A is gone).
        while True:
            for child_pid in _children():
                try:
                    os.kill(child_pid, signals.SIGKILL)  # unreaped: no reuse
                except ProcessLookupError:
                    pass
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break
        for group in self.discarded.values():
            if group is not None:
                group.remove()
        for job in jobs:
            self.placeholders.release(job.placeholders)
            remove_tree(job.tmpdir)
            if job.group is not None:
                job.group.remove()
        # Placeholders another server still held at their run's end: one more
        # look (what is still held stays recorded, for that server's sweep).
        self.placeholders.tidy()


def _can_build_ahead(plan: dict[str, Any]) -> bool:
    """Not with the allowlist proxy (its listeners go to the run's own
    channel), nor with a root made of per-entry clones (``minimal``, or the
    mirrored host root): a file replaced on the host (``/etc/passwd`` by
    ``useradd``) would stay the old one in a view built earlier."""
    view = plan.get("view") or {}
    return not (plan.get("proxy") or view.get("rootfs") == "minimal" or view.get("mirror_root"))


def _children() -> list[int]:
    """This process's unreaped children (from /proc)."""
    me = os.getpid()
    try:
        with open(f"/proc/{me}/task/{me}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


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


def _drain(chan: socks.Socket) -> None:
    """Read what the caller sent on a run's channel and nobody read (a
    kill request, "K", that crossed the reply): a Unix socket closed with
    unread data makes the caller's next read fail with ECONNRESET, and the
    reply just sent was lost with it ("the fork server died during the
    run": 4 runs in 20 of a command whose output nobody read)."""
    try:
        # Receiving shut first: a "K" sent from now on fails at the caller
        # (EPIPE, ignored there) instead of landing unread between the last
        # read here and the close (1 run in 20 of such a test under load).
        chan.shutdown(socks.SHUT_RD)
    except OSError:
        pass
    try:
        chan.setblocking(False)
        while chan.recv(4096):
            pass
    except OSError:
        pass


def start_probe() -> tuple[int, int]:
    """Fork the probe's child; ``probe_result`` collects its answer."""
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
    return pid, r


def probe_result(probe: tuple[int, int]) -> tuple[bool, str]:
    """The probe's answer. Its child is reaped later, with the server's
    other children (``Server.helpers``), not waited for here: its exit
    tears down the mount namespace it made, which can wait for an RCU
    grace period (2.5 ms in one traced cold start here, before the hello;
    mostly it is over by then)."""
    _pid, r = probe
    try:
        data = os.read(r, 4096)
    finally:
        os.close(r)
    return data == b"ok", data.decode(errors="replace")


def _nons_started(line: bytes) -> bool:
    """Whether ``line`` is a no-namespace stage A's ``P<pid> <user> <system>``."""
    fields = line[1:].split()
    return len(fields) == 3 and all(f.isdigit() for f in fields)


def _placement_key(where: dict[str, Any]) -> tuple[Any, ...]:
    """A run's cgroup placement (``Placement.for_run``'s dict) as a value
    that compares equal for equal placements, whatever the order of its
    dicts' keys or the kind of its sequences (``_placement`` turns it back)."""
    return (
        int(where["version"]),
        tuple(sorted(where["bases"].items())),
        tuple(where["controllers"]),
        tuple(sorted((where.get("unused") or {}).items())),
    )


def _placement(key: tuple[Any, ...]) -> cgroups.Placement:
    version, bases, controllers, unused = key
    return cgroups.Placement(version, dict(bases), controllers, dict(unused))


def _default_key(userns_ok: bool) -> Any:
    """The starter key of a default-policy run from this server's caller:
    the spare made at start-up matches it (a wrong guess is just dropped)."""
    try:
        placement = cgroups.place(cgroups.detect())
        where = placement.for_run(pids=False, cpus=False)  # as plan.resources does
        placement_key: Any = _placement_key(where)
    except Exception:  # noqa: BLE001 - no usable cgroups: runs have no group
        placement_key = None
    root = False
    if os.getuid() == 0 and userns_ok:
        try:
            with open("/proc/self/uid_map") as fh:
                root = fh.read().split() == ["0", "0", "4294967295"]
        except OSError:
            pass
    return (placement_key, root)


def main(ctrl_fd: int, refill: bool = True) -> None:
    """Entry point of the server process. ``refill``: keep a spare stage A
    after each run (a one-shot caller, the CLI, does not want one)."""
    k.prctl(k.PR_SET_CHILD_SUBREAPER, 1)
    signals.signal(signals.SIGINT, signals.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError):
            pass
    ctrl = socks.Socket(fileno=ctrl_fd)
    ctrl.setblocking(True)
    # The probe first: its child works while the forker and the first
    # spare are made, and the hello waits for its answer.
    probe = start_probe()
    server = Server(ctrl, refill=refill)
    # Everything imported so far stays: keep the collector off it (a
    # collection writes to every object it visits, unsharing the pages
    # the forker and stage A share with this process). No gc.collect()
    # first: that alone would visit all of a forking caller's heap.
    gc.freeze()
    gc.enable()  # (the CLI forks this process with the collector off: see _entry)
    try:
        # The first run's stage A starts now, while the caller builds its
        # plan (assuming user namespaces work: a wrong guess is dropped).
        server.last_key = _default_key(True)
        server.make_spare()
        ok, detail = probe_result(probe)
        # Reaped when it has exited (see probe_result), with the others on
        # SIGCHLD; one that exited before the server's handler was set up
        # sent its signal to no one: reaped here.
        if os.waitpid(probe[0], os.WNOHANG)[0] == 0:
            server.helpers.add(probe[0])
        ctrl.send(wire.dumps({"t": "hello", "userns": ok, "detail": detail}))
        server.serve()
    except BaseException:
        # E.g. the caller is gone before the hello (the CLI after a usage
        # error): leave nothing behind.
        server.shutdown()
        raise
    finally:
        sys.stdout.flush()
    os._exit(0)
