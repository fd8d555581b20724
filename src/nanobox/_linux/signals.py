"""Signal numbers and calls from ``_signal``, not ``signal``.

``signal`` wraps ``_signal`` to turn numbers, handlers and masks into enums
(``Signals``, ``Handlers``, ``Sigmasks``): ~1 ms of CPU for its import,
paid on the way to a cold run by the CLI and by its fork server, whose
imports share two cores. Nothing here needs the enums: handlers compare
with ``==`` (``SIG_IGN`` is the int 1 either way), masks are sets of ints.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # (typeshed has no stub)

TYPE_CHECKING = False  # not ``typing``'s: the fork server starts without it
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any

SIG_DFL: int = _signal.SIG_DFL
SIG_IGN: int = _signal.SIG_IGN
SIG_BLOCK: int = _signal.SIG_BLOCK
SIG_SETMASK: int = _signal.SIG_SETMASK
NSIG: int = _signal.NSIG
SIGCHLD: int = _signal.SIGCHLD
SIGINT: int = _signal.SIGINT
SIGTERM: int = _signal.SIGTERM
SIGHUP: int = _signal.SIGHUP
SIGPIPE: int = _signal.SIGPIPE
SIGKILL: int = _signal.SIGKILL
SIGXCPU: int = _signal.SIGXCPU
SIGUSR1: int = _signal.SIGUSR1

signal: Callable[[int, Any], Any] = _signal.signal
getsignal: Callable[[int], Any] = _signal.getsignal
set_wakeup_fd: Callable[..., int] = _signal.set_wakeup_fd
pthread_sigmask: Callable[[int, Iterable[int]], set[int]] = _signal.pthread_sigmask
pidfd_send_signal: Callable[..., None] = _signal.pidfd_send_signal
pthread_kill: Callable[[int, int], None] = _signal.pthread_kill
