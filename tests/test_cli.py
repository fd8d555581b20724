"""The CLI as a user sees it: exit statuses, --result JSON, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import nanobox_cli

RESULT_KEYS = {
    "id",
    "command",
    "exit_code",
    "signal",
    "outcome",
    "timed_out",
    "oom_killed",
    "wall_time_s",
    "cpu_time_s",
    "user_time_s",
    "system_time_s",
    "peak_memory_bytes",
    "stdout_bytes",
    "stderr_bytes",
    "stdout_truncated",
    "stderr_truncated",
    "degraded",
    "violations",
}


def _result(path: Path) -> dict[str, object]:
    data = json.loads(path.read_text())
    assert RESULT_KEYS <= set(data), RESULT_KEYS - set(data)
    return data  # type: ignore[no-any-return]


def test_version() -> None:
    p = nanobox_cli("--version")
    assert p.returncode == 0 and p.stdout.startswith(b"nanobox ")


@pytest.mark.parametrize("code", [0, 1, 3, 42, 255])
def test_exit_status_is_the_commands(workspace: Path, code: int) -> None:
    assert nanobox_cli("run", "--", "sh", "-c", f"exit {code}").returncode == code


def test_signal_gives_128_plus_n(workspace: Path, tmp_path: Path) -> None:
    res = tmp_path / "r.json"
    p = nanobox_cli("run", "--result", str(res), "--", "sh", "-c", "kill -USR1 $$")
    assert p.returncode == 128 + 10
    data = _result(res)
    assert data["outcome"] == "signaled" and data["signal"] == 10 and data["exit_code"] is None


def test_timeout_gives_124(workspace: Path, tmp_path: Path) -> None:
    res = tmp_path / "r.json"
    p = nanobox_cli("run", "--timeout", "300ms", "--result", str(res), "sleep", "10")
    assert p.returncode == 124
    data = _result(res)
    assert data["outcome"] == "timeout" and data["timed_out"] is True
    assert b"wall-clock limit" in p.stderr


def test_cpu_time_gives_124(workspace: Path, tmp_path: Path) -> None:
    res = tmp_path / "r.json"
    p = nanobox_cli(
        "run",
        "--cpu-time",
        "1",
        "--allow-degraded",  # (without a cgroup: the process tree, polled)
        "--result",
        str(res),
        "--",
        "sh",
        "-c",
        "while :; do :; done",
    )
    assert p.returncode == 124
    assert _result(res)["outcome"] == "cpu_limit"


def test_not_found_gives_127_and_a_result(workspace: Path, tmp_path: Path) -> None:
    res = tmp_path / "r.json"
    p = nanobox_cli("run", "--result", str(res), "no-such-command-xyz")
    assert p.returncode == 127 and b"no-such-command-xyz: command not found" in p.stderr
    data = _result(res)
    assert data["outcome"] == "exited" and data["exit_code"] == 127


def test_not_executable_gives_126(workspace: Path, tmp_path: Path) -> None:
    script = workspace / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    res = tmp_path / "r.json"
    p = nanobox_cli("run", "--result", str(res), "./script.sh")
    assert p.returncode == 126
    assert _result(res)["exit_code"] == 126


def test_result_json_describes_the_run(workspace: Path, tmp_path: Path) -> None:
    res = tmp_path / "r.json"
    p = nanobox_cli("run", "--result", str(res), "--", "sh", "-c", "printf abc; printf de >&2")
    assert p.returncode == 0 and p.stdout == b"abc" and p.stderr == b"de"
    data = _result(res)
    assert data["command"] == ["sh", "-c", "printf abc; printf de >&2"]
    assert data["exit_code"] == 0 and data["signal"] is None and data["outcome"] == "exited"
    assert data["stdout_bytes"] == 3 and data["stderr_bytes"] == 2
    assert data["degraded"] == [] and data["violations"] == []
    assert isinstance(data["wall_time_s"], float) and data["wall_time_s"] > 0
    assert "network" not in data


@pytest.mark.parametrize(
    "where",
    [
        "missing",
        "directory",
        "new-directory",
        "too-long",
        "empty",
        "fd-not-ascii",
        "fd-huge",
        "fd-not-open",
        "fd-nanobox",
        "dot-dot",
        "through-missing",
    ],
)
def test_an_unwritable_result_path_is_refused_before_the_run(
    workspace: Path, tmp_path: Path, where: str
) -> None:
    """Before, the command ran and then the CLI failed with "internal error:
    FileNotFoundError", its record lost."""
    path = {
        "missing": str(tmp_path / "no-dir" / "r.json"),
        "directory": str(tmp_path),
        "new-directory": str(tmp_path / "new") + "/",
        "too-long": str(tmp_path / ("r" * 256)),
        "fd-not-ascii": "/dev/fd/\u00b2",
        "fd-huge": "/dev/fd/99999999999999999999",
        "fd-not-open": "/dev/fd/97",
        "fd-nanobox": "/dev/fd/3",  # (its server's socket: the CLI runs with no fd 3)
        "dot-dot": str(tmp_path / "nox" / ".."),
        "through-missing": str(tmp_path / "nox" / ".." / "r.json"),  # (the kernel says ENOENT)
        "empty": "",
    }
    p = nanobox_cli("run", "--result", path[where], "--", "touch", "ran")
    assert p.returncode == 125, p
    assert p.stderr.startswith(b"nanobox: error: --result: "), p.stderr
    assert b"Traceback" not in p.stderr and b"internal error" not in p.stderr
    assert not (workspace / "ran").exists()


def test_a_result_that_cannot_be_written_after_the_run_says_so(
    workspace: Path, tmp_path: Path
) -> None:
    """The command removes the result's directory (in its workspace): the
    run happened, the record cannot be written: exit 125, one clear line,
    no temporary file left."""
    (workspace / "out").mkdir()
    p = nanobox_cli("run", "--result", "out/r.json", "--", "rmdir", "out")
    assert p.returncode == 125, p
    assert p.stderr.startswith(b"nanobox: error: --result: cannot write 'out/r.json'"), p.stderr
    assert b"Traceback" not in p.stderr
    assert list(workspace.iterdir()) == []


def test_a_result_into_a_fifo_is_written_through_it(workspace: Path, tmp_path: Path) -> None:
    """An existing file that is not a regular one (``/dev/stdout``, a FIFO,
    a terminal) is written through, as a shell's ``>`` does. The result was
    written beside it and renamed over it: the FIFO was replaced by a file
    (and, as root, ``--result /dev/full`` replaced that device)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # (so the CLI's open does not wait)
    try:
        p = nanobox_cli("run", "--result", str(fifo), "--", "true")
        assert p.returncode == 0, p
        data = json.loads(os.read(reader, 1 << 16))
    finally:
        os.close(reader)
    assert data["outcome"] == "exited" and RESULT_KEYS <= set(data)
    assert fifo.is_fifo()


def test_a_result_to_dev_stdout_follows_the_commands_output(
    workspace: Path, tmp_path: Path
) -> None:
    """``/dev/stdout`` (and ``/dev/fd/N``) is the CLI's own file descriptor:
    the result goes after what the command wrote there. With stdout a
    file, it was renamed over that file (the command's output gone); as
    another user, a pipe of root's was "not writable"."""
    out = tmp_path / "out.txt"
    with out.open("wb") as fh:
        p = subprocess.run(
            [sys.executable, "-m", "nanobox", "run", "--result", "/dev/stdout", "echo", "hi"],
            stdout=fh,
            stderr=subprocess.PIPE,
            timeout=60,
        )
    assert p.returncode == 0, p.stderr
    first, rest = out.read_bytes().split(b"\n", 1)
    assert first == b"hi" and json.loads(rest)["outcome"] == "exited"
    with out.open("wb") as fh:  # another name of the same descriptor
        cli = [sys.executable, "-m", "nanobox", "run", "--result", "/proc/thread-self/fd/1"]
        p = subprocess.run([*cli, "echo", "hi"], stdout=fh, stderr=subprocess.PIPE, timeout=60)
    assert p.returncode == 0, p.stderr
    first, rest = out.read_bytes().split(b"\n", 1)
    assert first == b"hi" and json.loads(rest)["outcome"] == "exited"
    fd3 = tmp_path / "fd3.json"
    cli = f"exec {sys.executable} -m nanobox run --result /dev/fd/3 true 3>{fd3}"
    p = subprocess.run(["sh", "-c", cli], capture_output=True, timeout=60)
    assert p.returncode == 0 and p.stdout == b"", p
    assert json.loads(fd3.read_bytes())["outcome"] == "exited"


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
@pytest.mark.skipif(
    bool(os.statvfs(os.environ.get("TMPDIR", "/tmp")).f_flag & os.ST_NODEV),
    reason="devices cannot be opened on a nodev /tmp",
)
def test_a_result_into_a_full_device_fails_and_keeps_it(workspace: Path, tmp_path: Path) -> None:
    """A copy of ``/dev/full`` (made here: the test must not risk the
    real one): the write fails with ENOSPC, said in one line, exit 125,
    and the device stays a device."""
    full = tmp_path / "full"
    os.mknod(full, 0o666 | 0o020000, os.makedev(1, 7))  # S_IFCHR, as /dev/full
    p = nanobox_cli("run", "--result", str(full), "--", "true")
    assert p.returncode == 125, p
    said = f"nanobox: error: --result: cannot write {str(full)!r}: No space left on device\n"
    assert p.stderr == said.encode()
    assert full.is_char_device()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["full", "ws"]  # (no temporary file)


def test_what_a_command_leaves_at_the_result_name_is_replaced(
    workspace: Path, tmp_path: Path
) -> None:
    """The result's name is often in the command's workspace. A link the
    command leaves there is replaced, not followed (it was: where the name
    led was settled only after the run, so a root CLI wrote the JSON over
    any file the command named); a FIFO is replaced too (the CLI waited on
    it for ever). Control: the shell's ``>`` follows the same link."""
    victim = tmp_path / "victim"
    victim.write_text("ORIGINAL\n")
    for plant in (f"ln -s {victim} r.json", "mkfifo r.json"):
        p = nanobox_cli("run", "--result", "r.json", "--", "sh", "-c", plant, timeout=30)
        assert p.returncode == 0, p
        res = workspace / "r.json"
        assert not res.is_symlink() and res.is_file(), plant
        assert _result(res)["outcome"] == "exited"
        assert victim.read_text() == "ORIGINAL\n"
        assert sorted(x.name for x in workspace.iterdir()) == ["r.json"]
        res.unlink()
    subprocess.run(["sh", "-c", f"ln -s {victim} r.json && echo followed > r.json"], cwd=workspace)
    assert victim.read_text() == "followed\n"


@pytest.mark.skipif(
    int(Path("/proc/sys/kernel/pid_max").read_text()) > 65536, reason="too many pids to plant"
)
def test_links_planted_at_every_temporary_name_are_not_followed(
    workspace: Path, tmp_path: Path
) -> None:
    """The result was first written to ``NAME.tmp<pid>``, opened following
    links: a command that left a link at that name for every pid had the
    CLI write through it (found by the review). Now the temporary file has
    an unguessable name, made with ``O_EXCL | O_NOFOLLOW``."""
    victim = tmp_path / "victim"
    victim.write_text("ORIGINAL\n")
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    plant = (
        "import os\n"
        f"for i in range({pid_max + 1}):\n"
        f"    os.symlink({str(victim)!r}, 'r.json.tmp%d' % i)\n"
    )
    p = nanobox_cli("run", "--result", "r.json", "--", "python3", "-c", plant, timeout=60)
    assert p.returncode == 0, p
    assert victim.read_text() == "ORIGINAL\n"
    assert _result(workspace / "r.json")["outcome"] == "exited"


def test_a_result_name_the_command_made_a_directory_keeps_the_record(workspace: Path) -> None:
    """The command makes the result's name a directory: the record cannot
    go there, but it is kept beside it (it was lost) and the message says
    where; exit 125."""
    p = nanobox_cli("run", "--result", "r.json", "--", "sh", "-c", "mkdir -p r.json/x; exit 3")
    assert p.returncode == 125, p
    kept = [x for x in workspace.iterdir() if x.name.startswith(".nanobox-result.")]
    assert len(kept) == 1, list(workspace.iterdir())
    assert p.stderr == (
        b"nanobox: error: --result: cannot write 'r.json': Is a directory; the result is in "
        + repr(kept[0].name).encode()
        + b"\n"
    )
    data = json.loads(kept[0].read_text())
    assert (data["outcome"], data["exit_code"]) == ("exited", 3)


def test_a_result_directory_moved_during_the_run_is_not_written(workspace: Path) -> None:
    """The command moves the result's directory away and leaves another,
    with a forged record, in its place: the CLI writes neither, says so and
    exits 125 (it wrote the real record into the moved directory, and the
    judge read the forged one)."""
    (workspace / "sub").mkdir()
    forge = "mv sub sub2 && mkdir sub && echo '{\"forged\": true}' > sub/r.json; exit 3"
    p = nanobox_cli("run", "--result", "sub/r.json", "--", "sh", "-c", forge)
    assert p.returncode == 125, p
    assert p.stderr == (
        b"nanobox: error: --result: cannot write 'sub/r.json': its directory was moved "
        b"or removed during the run\n"
    )
    assert json.loads((workspace / "sub/r.json").read_text()) == {"forged": True}
    assert sorted(x.name for x in (workspace / "sub2").iterdir()) == []


def test_a_closed_output_pipe_kills_the_run_and_keeps_the_record(
    workspace: Path, tmp_path: Path
) -> None:
    """``nanobox run ... | head -c N``: the reader goes away, the run is
    killed (as SIGPIPE kills a writer) and the CLI exits 141, quietly, and
    the record is still written. It was lost: a judge truncating output
    with ``head`` had none for any run whose output was longer."""
    res = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "nanobox", "run", "--result", str(res), "--", "yes"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    assert p.stdout.read(100) == b"y\n" * 50
    p.stdout.close()
    assert p.wait(timeout=30) == 141
    assert p.stderr.read() == b""
    data = _result(res)
    assert data["outcome"] == "signaled"
    assert [v["signal"] for v in data["violations"]] == ["SIGPIPE"]  # type: ignore[union-attr]


def test_a_reader_gone_after_the_command_ended_changes_nothing(
    workspace: Path, tmp_path: Path
) -> None:
    """``... -- echo hi | true``: the output's reader is gone, but so is the
    command, by itself. The run is reported as it ended (not as killed),
    with its status; the kill request that crossed the reply did not lose
    the reply ("the fork server died during the run", 4 times in 20)."""
    res = tmp_path / "r.json"
    cli = f"{sys.executable} -m nanobox run --result {res} -- sh -c 'echo hi' | true"
    for _ in range(20):
        p = subprocess.run(["bash", "-c", cli + "; exit ${PIPESTATUS[0]}"], capture_output=True)
        data = _result(res)
        if data["outcome"] == "exited":  # (as a rule: the command ends first)
            assert p.returncode == 0 and p.stderr == b"", p
            assert (data["exit_code"], data["violations"]) == (0, []), data
        else:  # (the kill came between its echo and its exit)
            assert p.returncode == 141 and data["outcome"] == "signaled", (p, data)


def _file_size_limit(limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (a write past it then fails: EFBIG)
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_output_that_cannot_be_written_kills_the_run_and_keeps_the_record(
    workspace: Path, tmp_path: Path
) -> None:
    """The CLI's stdout is a file that cannot grow (a full disk; here a
    file-size limit, EFBIG): the run is killed and reported (a violation of
    kind ``output_error``), the CLI says why and exits 125. It ended with
    the error and no record. Control: ``yes`` itself, started the same way,
    gets the same error."""
    res, out = tmp_path / "r.json", tmp_path / "out"
    cmd = [sys.executable, "-m", "nanobox", "run", "--result", str(res), "--", "yes"]
    with out.open("wb") as f:
        p = subprocess.run(
            cmd, stdout=f, stderr=subprocess.PIPE, preexec_fn=lambda: _file_size_limit(100_000)
        )
    assert p.returncode == 125, p
    assert p.stderr == (
        b"nanobox: error: cannot write the command's stdout: File too large; the run was killed\n"
    )
    assert out.stat().st_size == 100_000
    data = _result(res)
    assert data["outcome"] == "signaled", data
    kinds = [(v["kind"], v["stream"], v["errno"]) for v in data["violations"]]  # type: ignore[union-attr]
    assert kinds == [("output_error", "stdout", "EFBIG")], data
    with out.open("wb") as f:
        p = subprocess.run(
            ["yes"], stdout=f, stderr=subprocess.PIPE, preexec_fn=lambda: _file_size_limit(100_000)
        )
    assert p.returncode == 1 and b"File too large" in p.stderr, p


def test_output_lost_after_the_command_ended_is_still_in_the_record(
    workspace: Path, tmp_path: Path
) -> None:
    """A short command whose output cannot all be written (it ended before
    the CLI wrote it): the record says so too (it said a clean exit while
    the CLI exited 125), and the run is not said to be killed."""
    res, out = tmp_path / "r.json", tmp_path / "out"
    cmd = [sys.executable, "-m", "nanobox", "run", "--result", str(res), "--"]
    with out.open("wb") as f:
        p = subprocess.run(
            [*cmd, "head", "-c", "300000", "/dev/zero"],
            stdout=f,
            stderr=subprocess.PIPE,
            preexec_fn=lambda: _file_size_limit(8192),
        )
    assert p.returncode == 125, p
    data = _result(res)
    kinds = [v["kind"] for v in data["violations"]]  # type: ignore[union-attr]
    assert kinds == ["output_error"], data
    if data["outcome"] == "exited":  # (as a rule: it ends before its output is written)
        assert p.stderr == b"nanobox: error: cannot write the command's stdout: File too large\n"


def test_all_output_reaches_a_non_blocking_stdout(workspace: Path) -> None:
    """A stdout left non-blocking by whoever started the CLI: the output is
    relayed whole (the buffered stream dropped what did not fit)."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    cmd = [sys.executable, "-m", "nanobox", "run", "--", "head", "-c", "2000000", "/dev/zero"]
    p = subprocess.Popen(cmd, stdout=w, stderr=subprocess.PIPE)
    os.close(w)
    got = 0
    while chunk := os.read(r, 1 << 16):
        got += len(chunk)
        time.sleep(0.001)
    os.close(r)
    assert p.wait(timeout=60) == 0 and got == 2_000_000, got


def _default_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP as a terminal's shell leaves them: the
    tests that send them must not depend on how the suite was started
    (``nohup`` ignores SIGHUP, a shell's background job SIGINT, and the CLI
    keeps a signal ignored that it was started ignoring)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def _started(*args: str, **kw: Any) -> subprocess.Popen[bytes]:
    """``nanobox run ARGS -- sh`` that prints "started" and sleeps: returned
    once the line is read (the run is going on)."""
    kw.setdefault("preexec_fn", _default_signals)
    p = subprocess.Popen(
        [sys.executable, "-m", "nanobox", "run", *args, "--", "sh", "-c", INTERRUPTED],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )
    assert p.stdout is not None and p.stdout.readline() == b"started\n"
    return p


INTERRUPTED = "echo started; exec sleep 31.25"


def _leftovers() -> str:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return "\n".join(line for line in ps.splitlines() if line == "sleep 31.25")


@pytest.mark.parametrize(
    "sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name
)
def test_an_interrupted_cli_kills_the_run_and_reports_it(
    workspace: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    """Ctrl-C, an outer ``timeout`` or a closed terminal: the run is killed
    (nothing left behind), ``--result`` says what happened, and the exit
    status is 128+N. Before, the CLI died at once and wrote no result."""
    res = tmp_path / "r.json"
    p = _started("--result", str(res))
    p.send_signal(sig)
    _out, err = p.communicate(timeout=30)
    assert p.returncode == 128 + sig, (p.returncode, err)
    assert err == f"nanobox: {sig.name}: the run was killed\n".encode(), err
    data = _result(res)
    assert (data["outcome"], data["signal"], data["exit_code"]) == ("signaled", 9, None)
    assert data["violations"] == [
        {
            "kind": "interrupted",
            "detail": f"nanobox received {sig.name}: the run was killed",
            "signal": sig.name,
        }
    ]
    assert _leftovers() == ""


def test_a_terminal_that_hangs_up_ends_the_run_with_a_result(
    workspace: Path, tmp_path: Path
) -> None:
    """The CLI on a terminal that goes away (its window closed): SIGHUP,
    and every write to the terminal fails with EIO. It exited 1 with a
    traceback and no result (found by the review); now the run is killed
    and reported, and the CLI exits 129."""
    import pty

    res = tmp_path / "r.json"
    pid, master = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            _default_signals()
            argv = [sys.executable, "-m", "nanobox", "run", "--result", str(res)]
            os.execv(sys.executable, [*argv, "--", "sh", "-c", INTERRUPTED])
        finally:
            os._exit(127)
    seen = b""
    try:
        while b"started" not in seen:
            seen += os.read(master, 100)
    finally:
        os.close(master)  # the terminal hangs up
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 129, seen
    data = _result(res)
    assert data["outcome"] == "signaled" and data["violations"][0]["signal"] == "SIGHUP"
    assert _leftovers() == ""


def test_a_signal_the_cli_was_started_ignoring_stays_ignored(workspace: Path) -> None:
    """``nohup nanobox run ...``: SIGHUP is ignored (the run goes on); the
    next SIGTERM still ends it."""

    def ignore_hup() -> None:
        _default_signals()
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    p = _started(preexec_fn=ignore_hup)
    p.send_signal(signal.SIGHUP)
    with pytest.raises(subprocess.TimeoutExpired):
        p.wait(timeout=0.5)
    p.send_signal(signal.SIGTERM)
    _out, err = p.communicate(timeout=30)
    assert p.returncode == 128 + signal.SIGTERM and b"SIGTERM" in err, err
    assert _leftovers() == ""


def test_stdin_passes_through(workspace: Path) -> None:
    p = nanobox_cli("run", "cat", input=b"piped")
    assert p.stdout == b"piped"


def test_env_options(workspace: Path) -> None:
    p = nanobox_cli("run", "--env", "A=1", "-e", "B=x=y", "--", "sh", "-c", 'echo "$A $B"')
    assert p.stdout == b"1 x=y\n"


def test_cwd_option_is_the_workspace(workspace: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    p = nanobox_cli("run", "--cwd", str(other), "--", "sh", "-c", "pwd; echo hi > f")
    assert p.returncode == 0 and p.stdout == f"{other}\n".encode()
    assert (other / "f").read_text() == "hi\n"


def test_policy_file(workspace: Path, tmp_path: Path) -> None:
    pol = tmp_path / "p.toml"
    pol.write_text('hostname = "judge"\n[limits]\nwall_time = "300ms"\n')
    p = nanobox_cli("run", "--policy", str(pol), "--", "sh", "-c", "hostname; sleep 5")
    assert p.returncode == 124 and p.stdout == b"judge\n"


def test_command_flags_are_not_taken_as_options(workspace: Path) -> None:
    p = nanobox_cli("run", "-q", "sh", "-c", "echo --timeout")
    assert p.returncode == 0 and p.stdout == b"--timeout\n"


def test_json_logging_to_stderr(workspace: Path) -> None:
    p = nanobox_cli("run", "-v", "--log-format", "json", "true")
    assert p.returncode == 0
    lines = [json.loads(line) for line in p.stderr.decode().splitlines()]
    kinds = [line["event"]["kind"] for line in lines if "event" in line]
    assert kinds[0] == "start" and kinds[-1] == "exit"


BAD = [
    (["run", "--timeout", "abc", "true"], "--timeout"),
    (["run", "--timeout", "-1", "true"], "--timeout"),
    (["run", "--cpu-time", "0", "true"], "--cpu-time"),
    (["run", "--file-size", "12Q", "true"], "--file-size"),
    (["run", "--open-files", "many", "true"], "--open-files"),
    (["run", "--output-limit", "-5", "true"], "--output-limit"),
    (["run", "--on-output-limit", "explode", "true"], "--on-output-limit"),
    (["run", "--env", "NOEQUALS", "true"], "--env"),
    (["run", "--env", "=x", "true"], "--env"),
    (["run", "--cwd", "/nonexistent/dir", "true"], "cwd: '/nonexistent/dir' does not exist"),
    (["run", "--cwd", sys.executable, "true"], f"cwd: {sys.executable!r} is not a directory"),
    (["run", "--cwd", "/", "true"], "cwd"),
    (["run", "--policy", "/nonexistent.toml", "true"], "policy"),
    (["run", "--log-format", "xml", "true"], "--log-format"),
    (["run", "--network", "bogus", "true"], "--network"),
    (["run", "--rw", "/", "true"], "--rw"),
    (["run", "--tmpfs", "//", "true"], "--tmpfs"),
    (["run", "--hide", "/", "true"], "--hide"),
    (["run", "--frobnicate", "true"], "--frobnicate"),
    (["run"], "no command"),
    (["run", "--"], "no command"),
    (["run", "--timeout"], "--timeout"),
    (["frob"], "frob"),
]


@pytest.mark.parametrize(("argv", "named"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_125_with_one_line(workspace: Path, argv: list[str], named: str) -> None:
    p = nanobox_cli(*argv)
    assert p.returncode == 125, p.stderr
    lines = p.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("nanobox: error: ") and named in lines[0], lines[0]
    assert "Traceback" not in p.stderr.decode()


def test_a_removed_current_directory_is_a_clear_error(tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    code = "import os, sys, nanobox\nos.rmdir(sys.argv[1])\nnanobox.run(['true'])\n"
    p = subprocess.run([sys.executable, "-c", code, str(gone)], cwd=gone, capture_output=True)
    err = p.stderr.decode()
    assert "PolicyError: cwd: the current directory cannot be used" in err, err
    assert "FileNotFoundError" not in err, err


@pytest.mark.skipif(os.geteuid() == 0, reason="root searches every directory")
def test_an_unreachable_cwd_is_named_with_the_reason(tmp_path: Path) -> None:
    """A directory that exists but that a directory on the way hides from
    this user: the message says so (it used to say it did not exist)."""
    locked = tmp_path / "locked"
    (locked / "ws").mkdir(parents=True)
    locked.chmod(0o000)
    try:
        p = nanobox_cli("run", "--cwd", str(locked / "ws"), "true")
    finally:
        locked.chmod(0o700)
    assert p.returncode == 125, p.stderr
    line = p.stderr.decode().strip()
    assert "cwd:" in line and "/locked/ws' cannot be reached" in line and "denied" in line, line


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ('[limits]\nwalltime = "1s"\n', "limits.walltime"),
        ('[limits]\nwall_time = "soon"\n', "limits.wall_time"),
        ("nonsense = 1\n", "nonsense"),
        ("[limits\n", "not valid TOML"),
        ('[network]\nmode = "everywhere"\n', "network.mode"),
        ("inherit_env = 3\n", "inherit_env"),
        ("# caf\xe9 in Latin-1\n", "not UTF-8 text (byte 0xe9 at offset 5)"),
    ],
)
def test_bad_policy_files_exit_125(
    workspace: Path, tmp_path: Path, content: str, named: str
) -> None:
    pol = tmp_path / "bad.toml"
    pol.write_bytes(content.encode("latin-1"))
    p = nanobox_cli("run", "--policy", str(pol), "true")
    assert p.returncode == 125
    lines = p.stderr.decode().splitlines()
    assert len(lines) == 1 and named in lines[0], lines


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ('deny = ["nosuchcall"]\n', "deny: unknown syscall 'nosuchcall'"),
        ("[syscalls]\n", "syscalls: unknown key"),
        ("x = \n", "is not valid TOML"),
    ],
)
def test_bad_seccomp_files_name_the_option_and_the_file(
    workspace: Path, tmp_path: Path, content: str, named: str
) -> None:
    rules = tmp_path / "bad.toml"
    rules.write_text(content)
    p = nanobox_cli("run", "--seccomp", str(rules), "true")
    assert p.returncode == 125
    lines = p.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"nanobox: error: --seccomp {rules}: "), lines
    assert named in lines[0], lines


@pytest.mark.parametrize("option", ["--policy", "--seccomp"])
def test_a_policy_file_that_never_ends_is_refused(workspace: Path, option: str) -> None:
    """``/dev/zero`` (or any wrong name for a huge file) was read until memory
    ran out; a policy file is read up to 1 MiB. A pipe (``<(...)``) still
    works."""
    p = nanobox_cli("run", option, "/dev/zero", "true")
    assert p.returncode == 125, p
    assert p.stderr.startswith(f"nanobox: error: {option} /dev/zero: ".encode()), p.stderr
    assert b"'/dev/zero' is larger than 1 MiB" in p.stderr, p.stderr
    policy = b'[limits]\nwall_time = "0.1s"\n'
    p = nanobox_cli("run", "--policy", "/dev/stdin", "sleep", "5", input=policy)
    assert p.returncode == 124 and b"wall-clock limit of 0.1" in p.stderr, p


def test_check_json(workspace: Path) -> None:
    p = nanobox_cli("check", "--json")
    data = json.loads(p.stdout)
    assert p.returncode == (0 if data["default_policy_enforceable"] else 1)
    mech = data["mechanisms"]
    for name in (
        "user_namespace",
        "pid_namespace",
        "network_namespace",
        "seccomp",
        "landlock",
        "cgroups",
        "sandbox",
    ):
        assert name in mech and "available" in mech[name] and "detail" in mech[name]
    # This host (and CI) can enforce the default policy.
    assert data["default_policy_enforceable"] is True


def test_check_text(workspace: Path) -> None:
    p = nanobox_cli("check")
    assert p.returncode == 0 and b"can enforce its default policy" in p.stdout


def test_run_without_options_uses_the_parsers_defaults() -> None:
    """`nanobox run CMD` skips building the parser: its stand-in values must
    be exactly what the parser gives for no options."""
    from nanobox import cli

    cli._build_parser()
    assert vars(cli._RUN_PARSER[0].parse_args([])) == cli._RUN_DEFAULTS


PLAIN_RUN = """
import os, sys
sys.argv = ["nanobox", "run", "--", "/bin/true"]
me = os.getpid()
def report(code):
    if os.getpid() != me:  # the server, forked from here
        exit_now(code)
    real = [m for m in ("argparse", "inspect") if type(sys.modules.get(m)).__name__ == "module"]
    print(code, *real, flush=True)
    exit_now(code)
exit_now, os._exit = os._exit, report
from nanobox._entry import entry
try:
    entry()
except SystemExit as exc:
    report(exc.code)
"""


def test_plain_run_loads_neither_argparse_nor_inspect(workspace: Path) -> None:
    """`nanobox run CMD`'s start-up: no option parser, and the public
    dataclasses created without ``inspect`` (which Python 3.10 and 3.11
    need only for a dataclass without a docstring; ~8 ms of the CLI's
    start here). A new docstring-less dataclass on the way fails this."""
    p = subprocess.run([sys.executable, "-c", PLAIN_RUN], capture_output=True, timeout=60)
    expected = "0" if sys.version_info < (3, 12) else "0 inspect"
    assert p.stdout.decode().split() == expected.split(), (p.stdout, p.stderr)


AT_SUBMIT = """
import sys
from nanobox import cli
from nanobox._linux import client
LATER = ("nanobox.sandbox", "nanobox.result", "nanobox.events", "nanobox._io")
seen = []
pending = []
submit = client.ForkServer.submit
def watched(self, plan, fds):
    seen.append([m for m in LATER if m in sys.modules])
    return submit(self, plan, fds)
client.ForkServer.submit = watched
hello_pending = client.ForkServer.hello_pending
typing_at_plan = []
def watched_pending(self):
    if not pending:  # the plan is made: nothing of typing's on the way to it
        typing_at_plan.append("typing" in sys.modules)
    pending.append(hello_pending(self))
    return pending[-1]
client.ForkServer.hello_pending = watched_pending
code = cli.main(["run", "--", "/bin/true"])
client.shutdown_before_exit()
# (more than one submit: the server was gone and started again)
early = bool(seen) and any(seen) and not any(pending)
print(code, bool(seen) and not early, [m for m in LATER if m not in sys.modules],
      typing_at_plan, flush=True)
"""


def test_the_cli_sends_its_plan_before_it_imports_the_rest(workspace: Path) -> None:
    """`nanobox run CMD`: what the run needs besides its plan (the Sandbox,
    the Result, the event stream, the I/O loop) is imported while the
    server starts (if it has yet to say hello once the plan is made) or
    builds the sandbox, never on the way to the plan; nor is ``typing``
    (~3 ms: the public modules the plan needs bind a stand-in for it)."""
    p = subprocess.run([sys.executable, "-c", AT_SUBMIT], capture_output=True, timeout=60)
    assert p.stdout.decode().split() == ["0", "True", "[]", "[False]"], (p.stdout, p.stderr)


GC_STATES = """
import gc, os, sys
from nanobox import _entry
from nanobox._linux import client
HEAVY = ("threading", "socket", "selectors", "signal")
NOT_BEFORE_SUBMIT = HEAVY + ("json",)
states = []
submit = client.ForkServer.submit
def watched(self, plan, fds):
    states.append((gc.isenabled(), [m for m in NOT_BEFORE_SUBMIT if m in sys.modules]))
    return submit(self, plan, fds)
client.ForkServer.submit = watched
real_exit, me = os._exit, os.getpid()
def exit_(code):
    if os.getpid() == me:
        later = [m for m in HEAVY + ("json",) if m in sys.modules]
        print(code, states, later, gc.isenabled(), gc.get_freeze_count() > 0, flush=True)
    elif os.getppid() == me:  # the fork server's end (its stdout is /dev/null)
        print("server", [m for m in HEAVY + ("json", "re", "collections") if m in sys.modules],
              file=sys.stderr, flush=True)
    real_exit(code)
os._exit = exit_
sys.argv = ["nanobox", "run", "--", "/bin/true"]
_entry.entry()
"""


def test_the_cli_collects_garbage_again_once_it_has_imported(workspace: Path) -> None:
    """The console script turns the collector off while it imports, and
    back on, with what it imported frozen, for the run. Neither the CLI
    nor its fork server imports ``threading``, ``socket``, ``selectors`` or
    ``signal`` (~1, ~4, ~2 and ~1 ms of a cold start's CPU on two busy
    cores), the CLI never imports ``json`` (~1.5 ms) unless it writes
    some, and the server imports neither ``json`` nor ``re`` (~5-10 ms
    with ``enum``, ``functools`` and ``collections``) nor ``collections``
    itself (~2-3 ms) for a run that goes well."""
    p = subprocess.run([sys.executable, "-c", GC_STATES], capture_output=True, timeout=60)
    assert p.stdout.decode() == "0 [(False, [])] [] True True\n", (p.stdout, p.stderr)
    assert p.stderr.decode() == "server []\n", (p.stdout, p.stderr)


NOT_LINUX = """
import sys
sys.platform = "darwin"
from nanobox import cli
cli.main(["run", "--result", sys.argv[1], "--", "/bin/true"])
"""


def test_run_on_another_platform_fails_closed_with_a_result(tmp_path: Path) -> None:
    """Until the other backends exist: exit 125, the reason, and a
    ``--result`` that says the command never ran (no traceback)."""
    out = tmp_path / "result.json"
    p = subprocess.run([sys.executable, "-c", NOT_LINUX, str(out)], capture_output=True, timeout=60)
    assert p.returncode == 125, (p.stdout, p.stderr)
    assert p.stderr.decode() == (
        "nanobox: error: nanobox supports Linux only for now (this is darwin)\n"
    )
    result = json.loads(out.read_text())
    assert result["outcome"] == "setup_failed" and result["exit_code"] is None


def test_cli_main_in_a_process_with_a_server_starts_no_second_one(workspace: Path) -> None:
    """``cli.main(["run", ...])`` called by a library user: the one-shot
    server forked ahead is for a fresh CLI process only."""
    import nanobox
    from nanobox import cli
    from nanobox._linux import client, early

    assert nanobox.run(["true"]).returncode == 0
    assert client.has_server()
    assert cli.main(["run", "--", "true"]) == 0
    assert early.take() is None


def test_the_installed_command_forks_its_server_before_anything_heavy(workspace: Path) -> None:
    """The ``nanobox`` command is ``scripts/nanobox``, not a console_scripts
    wrapper: pip's imports ``re`` (with ``enum``, ``functools`` and
    ``collections``: ~8-12 ms here) before any of nanobox's code runs. The
    CLI's first imports are its own, then it forks its server; neither
    needs ``re`` before the run is sent (see the tests above)."""
    script = Path(sys.executable).parent / "nanobox"
    if not script.exists():
        pytest.skip("nanobox is not installed beside this interpreter")
    source = script.read_text()
    ours = (Path(__file__).parent.parent / "scripts" / "nanobox").read_text()
    assert source.partition("\n")[2] == ours.partition("\n")[2]  # (pip rewrites line 1)
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    p = subprocess.run(
        [str(script), "run", "--", "/bin/true"], capture_output=True, env=env, timeout=60
    )
    assert p.returncode == 0, p.stderr
    imported = [
        line.rpartition("|")[2].strip()
        for line in p.stderr.decode().splitlines()
        if line.startswith("import time:") and "|" in line
    ]
    first = imported[: imported.index("nanobox._linux.early")]
    assert not {"re", "enum", "functools", "collections"} & set(first), first


def test_the_deferred_inspect_is_the_real_one_when_used() -> None:
    code = (
        "import sys; from nanobox._deferred import defer_inspect; defer_inspect(); "
        "import inspect; sig = inspect.signature(len); "
        "assert sys.modules['inspect'] is not inspect and inspect.signature is "
        "sys.modules['inspect'].signature; print(sig)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert p.returncode == 0 and p.stdout == b"(obj, /)\n", p.stderr


@pytest.mark.parametrize(
    ("argv", "opts", "command"),
    [
        (["echo", "--", "hi"], [], ["echo", "--", "hi"]),
        (["--", "echo", "--", "hi"], [], ["echo", "--", "hi"]),
        (["--timeout", "5", "echo", "--", "-x"], ["--timeout", "5"], ["echo", "--", "-x"]),
        (["-q", "--", "--weird"], ["-q"], ["--weird"]),
        (["-", "x"], [], ["-", "x"]),
        (["--time", "5", "--", "echo", "hi"], ["--time", "5"], ["echo", "hi"]),  # abbreviated
        (["-qe", "A=1", "--", "echo"], ["-qe", "A=1"], ["echo"]),  # a cluster ending in -e
        (["-qeA=1", "echo"], ["-qeA=1"], ["echo"]),
        (["--env=A=1", "echo", "--", "x"], ["--env=A=1"], ["echo", "--", "x"]),
        (["-vv", "--inherit", "echo"], ["-vv", "--inherit"], ["echo"]),  # flags
    ],
)
def test_options_end_at_the_command(argv: list[str], opts: list[str], command: list[str]) -> None:
    from nanobox import cli

    cli._build_parser()
    assert cli._split_command(argv) == (opts, command)


def test_a_double_dash_after_the_command_is_the_commands(workspace: Path) -> None:
    p = nanobox_cli("run", "echo", "a", "--", "b")
    assert p.returncode == 0 and p.stdout == b"a -- b\n", p.stderr


def test_an_internal_error_is_one_line_not_a_traceback(workspace: Path) -> None:
    """A bug surfacing in the CLI (here: planning raises): exit 125 and one
    line; the traceback only with NANOBOX_DEBUG=1."""
    import os
    import subprocess

    script = (
        "import nanobox.cli as c, nanobox._linux.plan as p\n"
        "def boom(*a, **k): raise RuntimeError('boom')\n"
        "p.build_plan = boom\n"
        "raise SystemExit(c.main(['run', 'true']))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NANOBOX_DEBUG"}
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, env=env, timeout=60)
    assert p.returncode == 125, p
    lines = p.stderr.decode().splitlines()
    assert lines == [
        "nanobox: error: internal error: RuntimeError: boom (NANOBOX_DEBUG=1 shows where)"
    ]
    env["NANOBOX_DEBUG"] = "1"
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, env=env, timeout=60)
    assert b"Traceback" in p.stderr and p.returncode == 1


def test_a_reader_that_goes_away_ends_the_run_quietly(workspace: Path) -> None:
    """`nanobox run yes | head -1`: the closed pipe ends the run (it would
    never end otherwise) with the status of a SIGPIPE death, no traceback,
    no 'internal error'."""
    import subprocess

    from conftest import PY

    p = subprocess.Popen(
        [PY, "-m", "nanobox", "run", "--", "yes"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert p.stdout is not None and p.stderr is not None
    assert p.stdout.readline() == b"y\n"
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=30) == 141, err
    assert err == b"", err


NO_PROCESS_LEFT = r"""
import ctypes, os, subprocess, sys
# This process adopts whatever the CLI leaves running when it exits.
assert ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
for argv in (
    ["run", "--", "true"],
    ["run", "--", "sh", "-c", "exit 3"],
    ["run", "--memory", "lots", "--", "true"],  # a usage error, after the server's fork
    ["run", "--", "/nonexistent/command"],
):
    p = subprocess.run([sys.executable, "-m", "nanobox", *argv], stderr=subprocess.DEVNULL)
    me = os.getpid()
    with open(f"/proc/{me}/task/{me}/children") as fh:
        print(p.returncode, fh.read().split())
"""


def test_no_process_of_nanobox_outlives_the_cli(workspace: Path) -> None:
    """The CLI's fork server (its child) ends its sandboxes and exits
    before the CLI does: right after ``nanobox run`` returns, nothing of it
    is left (it used to exit a few ms after the CLI, adopted by init). A
    subreaper around the CLI sees any such process as its child."""
    p = subprocess.run(
        [sys.executable, "-c", NO_PROCESS_LEFT], capture_output=True, timeout=60, check=True
    )
    assert p.stdout.decode().splitlines() == ["0 []", "3 []", "125 []", "127 []"], p.stderr


MEANWHILE = """
import sys, time
from nanobox._linux import client, early
from nanobox import _prepare
from nanobox.policy import Policy
early.fork_oneshot()
ran = []
def until_hello():
    ran.append("first")
    server = client.get_server(fork=True, hello=False)
    deadline = time.monotonic() + 30
    while server.hello_pending() and time.monotonic() < deadline:
        time.sleep(0.001)
def second():
    ran.append("second")
prep = _prepare.prepare(Policy(), ["/bin/true"], fork_server=True, input=None, stdin=None,
    cwd=None, env=None, timeout=None, text=False, check=False, meanwhile=[until_hello, second])
print(ran, prep.plan[:0])
client.shutdown_before_exit()
"""


def test_the_cli_imports_later_modules_only_while_its_server_starts(workspace: Path) -> None:
    """``prepare``'s ``meanwhile`` steps (the CLI's later imports) run only
    while the server it forked has yet to say hello: once it has, the
    plan goes out at once and the remaining steps wait until after it."""
    p = subprocess.run([sys.executable, "-c", MEANWHILE], capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode() in ("['first'] b''\n", "[] b''\n"), (p.stdout, p.stderr)
