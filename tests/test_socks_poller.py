"""The fork chain's socket and event-loop primitives (``_linux.socks`` and
``_linux.poller``), which stand in for ``socket`` and ``selectors``."""

from __future__ import annotations

import fcntl
import os
import select
import socket

import pytest

from nanobox._linux import poller, socks


def _cloexec(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


def test_socketpair_is_unix_seqpacket_and_close_on_exec() -> None:
    a, b = socks.socketpair()
    with a, b:
        assert a.family == socket.AF_UNIX and a.type == socket.SOCK_SEQPACKET
        assert _cloexec(a.fileno()) and _cloexec(b.fileno())
        a.send(b"one")
        a.send(b"two")
        assert b.recv(100) == b"one"  # message boundaries kept
    assert a.fileno() == -1 and b.fileno() == -1  # closed by ``with``


def test_fds_travel_and_arrive_close_on_exec() -> None:
    """Received fds carry close-on-exec (else they leak into every exec'd
    program); the same fd received with plain ``recvmsg`` does not."""
    r, w = os.pipe()
    os.set_inheritable(r, True)
    a, b = socks.socketpair()
    with a, b:
        socks.send_fds(a, [b"msg"], [r, w])
        msg, fds = socks.recv_fds(b, 100, 4)
        assert msg == b"msg" and len(fds) == 2
        try:
            assert all(_cloexec(fd) for fd in fds)
            os.write(fds[1], b"x")
            assert os.read(r, 1) == b"x"  # the same pipe
        finally:
            for fd in fds:
                os.close(fd)
        # The control: without MSG_CMSG_CLOEXEC the fd would be inheritable.
        socks.send_fds(a, [b"again"], [r])
        _msg, anc, _flags, _addr = b.recvmsg(100, socket.CMSG_LEN(4))
        raw = int.from_bytes(anc[0][2][:4], "little", signed=True)
        try:
            assert not _cloexec(raw)
        finally:
            os.close(raw)
    os.close(r)
    os.close(w)


def _open_fds() -> set[int]:
    """This process's open fds (looked up one by one: listing /proc/self/fd
    would open one of its own)."""
    found = set()
    for fd in range(1024):
        try:
            os.fstat(fd)
        except OSError:
            continue
        found.add(fd)
    return found


@pytest.mark.parametrize("size", [0, 1, socks.MSG_MAX, socks.MSG_MAX + 1, 300_000, 5 << 20])
def test_messages_of_any_size_travel_whole_with_their_fds(size: int) -> None:
    """A SOCK_SEQPACKET message must fit the sender's socket buffer (~208
    KiB here): the same send with plain ``sendmsg`` fails (the control);
    ``send_msg`` passes a longer one in a memfd. Nothing stays open."""
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    r, w = os.pipe()
    a, b = socks.socketpair()
    before = _open_fds()
    with a, b:
        if size > 300_000:
            with pytest.raises(OSError) as exc:
                socks.send_fds(a, [data], [r])
            assert exc.value.errno == 90  # EMSGSIZE
        socks.send_msg(a, data, [r, w])
        msg, fds = socks.recv_msg(b, 2)
        assert msg == data and len(fds) == 2
        try:
            assert all(_cloexec(fd) for fd in fds)
            os.write(fds[1], b"y")
            assert os.read(r, 1) == b"y"
        finally:
            for fd in fds:
                os.close(fd)
        socks.send_msg(a, data)  # without fds
        assert socks.recv_msg(b, 2) == (data, [])
        assert _open_fds() == before
        a.close()
        assert socks.recv_msg(b, 2) == (b"", [])  # EOF
    os.close(r)
    os.close(w)


def test_a_message_longer_than_the_socket_buffer_goes_in_a_memfd() -> None:
    """Under MSG_MAX, but more than the sender's socket buffer allows (an
    administrator's smaller default): EMSGSIZE, then the memfd."""
    a, b = socks.socketpair()
    with a, b:
        a.setsockopt(socks.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        data = b"z" * 32768
        with pytest.raises(OSError) as exc:
            a.send(data)  # the control
        assert exc.value.errno == 90  # EMSGSIZE
        socks.send_msg(a, data)
        assert socks.recv_msg(b, 0) == (data, [])


def test_fds_beyond_those_expected_are_closed() -> None:
    a, b = socks.socketpair()
    pipes = [os.pipe() for _ in range(3)]
    with a, b:
        socks.send_msg(a, b"m", [fd for pair in pipes for fd in pair])
        before = _open_fds()
        msg, fds = socks.recv_msg(b, 2)
        assert msg == b"m" and len(fds) == 2
        assert _open_fds() - before == set(fds)  # the kernel or recv_msg closed the rest
        for fd in fds:
            os.close(fd)
    for pair in pipes:
        for fd in pair:
            os.close(fd)


def test_socket_takes_over_an_fd_with_its_family() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with socks.Socket(fileno=s.detach()) as t:
        assert t.family == socket.AF_INET and t.type == socket.SOCK_DGRAM


def test_poller_reports_data_and_events() -> None:
    p = poller.Poller()
    r, w = os.pipe()
    try:
        p.register(r, poller.EVENT_READ, ("pipe", 1))
        assert p.select(0) == []
        os.write(w, b"x")
        [(key, events)] = p.select(None)
        assert (key.fd, key.data, events) == (r, ("pipe", 1), poller.EVENT_READ)
        p.modify(r, poller.EVENT_READ, "new data")
        assert p.select(0)[0][0].data == "new data"
        with pytest.raises(KeyError):
            p.register(r, poller.EVENT_READ)
        p.unregister(r)
        assert p.select(0) == []
        with pytest.raises(KeyError):
            p.unregister(r)
        with pytest.raises(KeyError):
            p.modify(r, poller.EVENT_READ)
        with pytest.raises(ValueError):
            p.register(w, 0)
    finally:
        p.close()
        os.close(r)
        os.close(w)


def test_poller_counts_a_hang_up_as_readable_and_writable() -> None:
    """As ``selectors``: an error or hang-up wakes a waiter for either
    event (the fork server learns that way that a peer is gone)."""
    p = poller.Poller()
    a, b = socks.socketpair()
    try:
        p.register(a, poller.EVENT_WRITE, "w")
        [(_key, events)] = p.select(0)
        assert events == poller.EVENT_WRITE
        p.modify(a, poller.EVENT_READ, "r")
        assert p.select(0) == []
        b.close()
        [(key, events)] = p.select(1)
        assert key.data == "r" and events == poller.EVENT_READ
        assert select.EPOLLIN == 1  # (the masks the poller translates)
    finally:
        p.close()
        a.close()
        b.close()


def test_poller_waits_at_least_a_millisecond_for_a_shorter_timeout() -> None:
    """A timer due in under a millisecond must not make the server spin:
    the wait is rounded up to whole milliseconds, never down to 0."""
    import time

    p = poller.Poller()
    r, w = os.pipe()
    try:
        p.register(r, poller.EVENT_READ)
        waits = 0
        deadline = time.monotonic() + 0.005
        while time.monotonic() < deadline:
            assert p.select(0.0001) == []
            waits += 1
        assert waits <= 6  # a zero timeout would have looped thousands of times
    finally:
        p.close()
        os.close(r)
        os.close(w)
