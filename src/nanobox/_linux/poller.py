"""The fork server's event loop primitive: ``select.epoll`` with a data
object per fd, as ``selectors.EpollSelector`` offers it.

Not ``selectors`` itself: importing it (its ``namedtuple``, its
``collections.abc`` mapping) costs the CLI's fork server ~1.8 ms of CPU on
the way to a cold run, where every process's imports share two cores.
Same semantics for what the server uses: ``register`` / ``modify`` /
``unregister`` by fd or object with a ``fileno()``, ``KeyError`` for an fd
registered twice or not at all, and ``select`` returning ``(key, events)``
pairs in which an error or hang-up counts as every event the fd waits for.
"""

from __future__ import annotations

import select

EVENT_READ = 1
EVENT_WRITE = 2
MAX_WAIT_S = 86400.0  # the longest single wait (see ``select``)

TYPE_CHECKING = False  # not ``typing``'s: the fork server starts without it
if TYPE_CHECKING:
    from typing import Any, Protocol

    class HasFileno(Protocol):
        def fileno(self) -> int: ...


class Key:
    """What ``select`` returns for a ready fd: the fd, the events it
    waits for, and the data it was registered with (as at ``select``)."""

    __slots__ = ("data", "events", "fd")

    def __init__(self, fd: int, events: int, data: Any) -> None:
        self.fd = fd
        self.events = events
        self.data = data


def _fd(fileobj: int | HasFileno) -> int:
    fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
    if fd < 0:
        raise ValueError(f"invalid file descriptor: {fd}")
    return fd


def _mask(events: int) -> int:
    if not events or events & ~(EVENT_READ | EVENT_WRITE):
        raise ValueError(f"invalid events: {events!r}")
    return (select.EPOLLIN if events & EVENT_READ else 0) | (
        select.EPOLLOUT if events & EVENT_WRITE else 0
    )


class Poller:
    def __init__(self) -> None:
        self._ep = select.epoll()
        self._keys: dict[int, Key] = {}

    def register(self, fileobj: int | HasFileno, events: int, data: Any = None) -> None:
        fd = _fd(fileobj)
        if fd in self._keys:
            raise KeyError(f"fd {fd} is already registered")
        self._ep.register(fd, _mask(events))
        self._keys[fd] = Key(fd, events, data)

    def modify(self, fileobj: int | HasFileno, events: int, data: Any = None) -> None:
        fd = _fd(fileobj)
        key = self._keys.get(fd)
        if key is None:
            raise KeyError(f"fd {fd} is not registered")
        if events != key.events:
            self._ep.modify(fd, _mask(events))
        self._keys[fd] = Key(fd, events, data)

    def unregister(self, fileobj: int | HasFileno) -> None:
        fd = _fd(fileobj)
        del self._keys[fd]  # KeyError when not registered, as selectors
        try:
            self._ep.unregister(fd)
        except OSError:
            pass  # (closed already: the kernel dropped it)

    def select(self, timeout: float | None = None) -> list[tuple[Key, int]]:
        # Round up to whole milliseconds: a timer due in 0.3 ms must not
        # turn into a busy loop of zero-timeout polls.
        # (At most a day: epoll takes no more than INT_MAX ms, ~24.8 days,
        # and a caller's timer far off is looked at again on waking.)
        wait = -1.0 if timeout is None else min(max(-(-timeout * 1e3 // 1) * 1e-3, 0.0), MAX_WAIT_S)
        ready = []
        for fd, ev in self._ep.poll(wait, max(len(self._keys), 1)):
            key = self._keys.get(fd)
            if key is None:
                continue
            got = 0
            if ev & ~select.EPOLLIN:  # writable, or an error / hang-up
                got |= EVENT_WRITE
            if ev & ~select.EPOLLOUT:  # readable, or an error / hang-up
                got |= EVENT_READ
            if got & key.events:
                ready.append((key, got & key.events))
        return ready

    def close(self) -> None:
        self._ep.close()
        self._keys.clear()
