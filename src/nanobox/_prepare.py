"""The first half of a run: its plan, made and handed to the fork server.

:class:`nanobox.Sandbox` runs this, then its I/O loop and its
:class:`~nanobox.Result`. The half is kept apart (it imports neither the
Result nor the event stream nor the I/O loop) so that the CLI can send its
one run to the server first and import the rest while the server builds
the sandbox and starts the command (``cli._cmd_run``).
"""

from __future__ import annotations

import os
import sys

from ._linux import socks
from .errors import PolicyError, SandboxError, UnsupportedError
from .policy import Policy
from .units import DURATION_HELP, parse_duration

TYPE_CHECKING = False  # not ``typing``'s: a cold start does not import it
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from typing import Any

    from .sandbox import Args, StdinLike


def check_linux() -> None:
    if not sys.platform.startswith("linux"):
        raise UnsupportedError(
            f"nanobox supports Linux only for now (this is {sys.platform})", step="platform"
        )


class Prepared:
    """One run, ready to go to the server. (A plain class, not a dataclass:
    making one costs the CLI's start ~0.5 ms of generated code.)"""

    __slots__ = (
        "args",
        "check",
        "degraded",
        "git_dirs",
        "plan",
        "run_id",
        "stdin_data",
        "stdin_fd",
        "text",
    )

    def __init__(
        self,
        *,
        run_id: str,
        args: tuple[str, ...],
        plan: bytes,
        stdin_fd: int | None,
        stdin_data: bytes | None,
        text: bool,
        check: bool,
        degraded: tuple[str, ...],
        git_dirs: tuple[str, ...] = (),
    ) -> None:
        self.run_id = run_id
        self.args = args
        self.plan = plan
        self.stdin_fd = stdin_fd
        self.stdin_data = stdin_data
        self.text = text
        self.check = check
        self.degraded = degraded
        self.git_dirs = git_dirs  # (see fsplan.View.git_dirs)


class Submitted:
    """A run the server has: its channel and this side's pipe ends (set
    non-blocking), until the run's I/O takes them (``handed_over``)."""

    __slots__ = ("chan", "err_r", "in_w", "out_r", "owned")

    def __init__(self, chan: socks.Socket, out_r: int, err_r: int, in_w: int | None) -> None:
        self.chan = chan
        self.out_r = out_r
        self.err_r = err_r
        self.in_w = in_w
        self.owned = True

    def handed_over(self) -> None:
        """The run's I/O has the fds now (and closes them): not ``close``."""
        self.owned = False

    def close(self) -> None:
        """Give the run up (the server kills it when its channel closes)."""
        if not self.owned:
            return
        self.owned = False
        for fd in (self.out_r, self.err_r) + ((self.in_w,) if self.in_w is not None else ()):
            os.close(fd)
        self.chan.close()


def prepare(
    policy: Policy,
    args: Args,
    *,
    fork_server: bool,
    input: bytes | str | None,
    stdin: StdinLike,
    cwd: str | os.PathLike[str] | None,
    env: Mapping[str, str] | None,
    timeout: float | str | None,
    text: bool,
    check: bool,
    meanwhile: Sequence[Callable[[], object]] = (),
) -> Prepared:
    """Check a run's arguments and make its plan (``Sandbox.run``'s
    arguments; ``fork_server``: see ``client.get_server``). ``meanwhile``:
    steps to take, one by one, while a server just started has yet to say
    hello once the plan is made (the CLI's later imports)."""
    from ._linux import plan as planmod

    argv = planmod.check_args(args)
    if timeout is None:
        wall = policy.limits.wall_time
        timeout_s = None if wall is None else float(wall)
    else:
        try:
            timeout_s = parse_duration(timeout)
        except ValueError:
            raise PolicyError("timeout", f"expected {DURATION_HELP}, got {timeout!r}") from None
        if timeout_s <= 0:
            raise PolicyError("timeout", f"must be greater than 0, got {timeout!r}")
        from .policy import MAX_SECONDS

        if timeout_s > MAX_SECONDS:  # (as Limits.wall_time: a timer the kernel takes)
            raise PolicyError(
                "timeout",
                f"must be at most {MAX_SECONDS:.0f} seconds (~31 years), got {timeout!r}",
            )
    if input is not None and stdin is not None:
        raise PolicyError("input", "pass either input= or stdin=, not both")
    if isinstance(input, str):
        input = input.encode()
    if input is not None and not isinstance(input, (bytes, bytearray, memoryview)):
        raise PolicyError("input", f"expected bytes or str, got {type(input).__name__}")
    stdin_fd: int | None = None
    if stdin is not None:
        try:
            if isinstance(stdin, bool):
                raise TypeError
            stdin_fd = stdin if isinstance(stdin, int) else stdin.fileno()
            os.fstat(stdin_fd)  # open (else EBADF at the submit, naming nothing)
        except (AttributeError, TypeError, ValueError, OSError, OverflowError):
            # (io.UnsupportedOperation, a BytesIO's, is both of the last two)
            raise PolicyError(
                "stdin", f"expected an open file descriptor or a file with one, got {stdin!r}"
            ) from None
    run_id = os.urandom(8).hex()
    from ._linux import client

    cwd_path = planmod.resolve_cwd(cwd)
    run_env = planmod.build_env(policy, env)

    def build(userns: tuple[bool, str]) -> dict[str, Any]:
        return planmod.build_plan(
            policy,
            argv,
            run_id=run_id,
            cwd=cwd_path,
            env=run_env,
            timeout=timeout_s,
            userns=userns,
        )

    try:
        server = client.get_server(fork=fork_server, hello=False)
        if server.said_hello:
            plan = build((server.userns, server.userns_detail))
            encoded = planmod.encode(plan, policy)
        else:
            # A server just started (the CLI's): plan (and encode) while it
            # starts, as if user namespaces work, as they mostly do; where
            # they do not, the plan (or the error) is the one for that.
            try:
                plan, error = build((True, "")), None
                encoded = planmod.encode(plan, policy)
            except Exception as exc:  # noqa: BLE001 - raised below if it stands
                plan, error, encoded = {}, exc, b""
            for step in meanwhile:
                if not server.hello_pending():
                    break
                step()
            client.ensure_hello(server)
            if not server.userns:
                plan = build((False, server.userns_detail))
                encoded = planmod.encode(plan, policy)
            elif error is not None:
                raise error
    except client.ServerGone as exc:
        raise SandboxError(str(exc), step="start") from None
    return Prepared(
        run_id=run_id,
        args=tuple(argv),
        plan=encoded,
        degraded=tuple(plan["degraded"]),
        git_dirs=tuple(plan.get("git_dirs", ())),
        stdin_fd=stdin_fd,
        stdin_data=None if input is None else bytes(input),
        text=text,
        check=check,
    )


def submit(prep: Prepared, *, fork_server: bool) -> Submitted:
    """Create the run's pipes and hand its plan and their other ends to
    the fork server (started again once if it is gone)."""
    from ._linux import client

    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    in_w: int | None = None
    if prep.stdin_data is not None:
        in_r, in_w = os.pipe2(os.O_CLOEXEC)
    elif prep.stdin_fd is not None:
        in_r = os.dup(prep.stdin_fd)
    else:
        in_r = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    mine, theirs = socks.socketpair()
    sent = Submitted(mine, out_r, err_r, in_w)
    try:
        for attempt in (1, 2):
            server = client.get_server(fork=fork_server)
            try:
                server.submit(prep.plan, [theirs.fileno(), in_r, out_w, err_w])
                break
            except client.ServerGone:
                client.reset_server(server)
                if attempt == 2:
                    raise SandboxError(
                        "the nanobox fork server could not be started", step="start"
                    ) from None
    except BaseException:
        sent.close()
        raise
    finally:
        theirs.close()
        for fd in (out_w, err_w, in_r):
            os.close(fd)
    for fd in (out_r, err_r) + ((in_w,) if in_w is not None else ()):
        os.set_blocking(fd, False)
    mine.setblocking(False)
    return sent
