"""Common real workloads still work under the default policy (seccomp,
Landlock, read-only view): python, pip, gcc, node, git, make, bash, sqlite."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

import nanobox
from conftest import SPY


def sh(cmd: str, **kw: object) -> nanobox.Result:
    return nanobox.run(["bash", "-c", cmd], timeout=120, **kw)  # type: ignore[arg-type]


def need(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")


def test_python_threads_subprocess_and_multiprocessing(workspace: Path) -> None:
    code = (
        "import concurrent.futures as f, multiprocessing as m, subprocess, sqlite3, tempfile\n"
        "with f.ThreadPoolExecutor(4) as p: assert sum(p.map(abs, range(-5, 5))) == 25\n"
        "with m.get_context('fork').Pool(2) as p: assert p.map(abs, [-1, -2]) == [1, 2]\n"
        "assert subprocess.run(['echo', 'hi'], capture_output=True).stdout == b'hi\\n'\n"
        "tempfile.TemporaryFile().write(b'x')\n"
        "print('python ok')\n"
    )
    r = nanobox.run([SPY, "-c", code], timeout=120)
    assert r.stdout == b"python ok\n", r.stderr


def test_gcc_compile_and_run(workspace: Path) -> None:
    need("gcc")
    (workspace / "m.c").write_text('#include <stdio.h>\nint main(){puts("compiled");return 0;}\n')
    r = sh("gcc -O1 -o m m.c && ./m")
    assert r.stdout == b"compiled\n", r.stderr


def test_make(workspace: Path) -> None:
    need("make")
    (workspace / "Makefile").write_text("all: out.txt\nout.txt:\n\techo made > out.txt\n")
    r = sh("make -s && cat out.txt")
    assert r.stdout == b"made\n", r.stderr


def test_node(workspace: Path) -> None:
    need("node")
    r = sh(
        'node -e \'const fs=require("fs"); fs.writeFileSync("n.txt","js"); '
        'console.log(fs.readFileSync("n.txt","utf8"), [1,2,3].map(x=>x*2).join())\''
    )
    assert r.stdout == b"js 2,4,6\n", r.stderr


def test_git_init_commit_log(workspace: Path) -> None:
    need("git")
    r = sh(
        "mkdir repo && cd repo && git init -q && echo a > a && git add a && "
        "git -c user.email=a@b -c user.name=n commit -qm first && git log --oneline | wc -l"
    )
    assert r.stdout == b"1\n", r.stderr


def test_bash_pipelines(workspace: Path) -> None:
    r = sh(
        "seq 1 10000 | sort -rn | head -3 | tr '\\n' ' '; "
        "yes | head -c 1000000 | wc -c; ( sleep 0.1 & wait ); echo $((6*7))"
    )
    assert r.stdout == b"10000 9999 9998 1000000\n42\n", r.stderr


def test_sqlite(workspace: Path) -> None:
    need("sqlite3")
    r = sh(
        "sqlite3 db.sqlite 'create table t(x); insert into t values (1),(2); select sum(x) from t;'"
    )
    assert r.stdout == b"3\n", r.stderr


def test_pip_offline_install_of_a_local_wheel(workspace: Path) -> None:
    r = nanobox.run([SPY, "-m", "pip", "--version"], timeout=60)
    if r.returncode != 0:
        pytest.skip("no pip for the sandbox's interpreter")
    # (pip against a local index through the proxy: test_network.py)
    r = sh(f"{SPY} -m venv --without-pip v && v/bin/python -c 'import sys; print(sys.prefix)'")
    assert r.returncode == 0 and r.stdout.strip().endswith(b"/v"), r.stderr


def test_a_command_line_as_long_as_the_kernel_allows(workspace: Path) -> None:
    """argv and environment of ~1.5 MiB, far beyond one message on the fork
    chain's sockets (~208 KiB): they failed with "Message too long" where
    the same command runs outside; one past the kernel's own limit fails
    as it does outside (E2BIG), as a command that cannot be executed."""
    import os
    import subprocess

    if os.sysconf("SC_ARG_MAX") < 2 << 20:
        pytest.skip("the stack limit here allows less than 2 MiB of arguments")
    args = ["sh", "-c", 'echo "$# ${#V7}"', "sh", *["a" * 1000] * 1200]
    env = {f"V{i}": "v" * 1000 for i in range(300)}
    outside = subprocess.run(args, env=env, capture_output=True, check=True).stdout
    assert outside == b"1200 1000\n"
    r = nanobox.run(args, env=env)
    assert (r.returncode, r.stdout) == (0, outside), r
    cli = subprocess.run(
        [sys.executable, "-m", "nanobox", "run", "--", *args], capture_output=True, timeout=60
    )
    assert (cli.returncode, cli.stdout, cli.stderr) == (0, b"1200 0\n", b"")
    # 7 MB: over the kernel's cap (6 MiB) anywhere. (A path, not a PATH
    # search: an unsearchable PATH entry would be the error reported.)
    too_long = ["/bin/true", *["a" * 100_000] * 70]
    with pytest.raises(OSError) as exc:
        subprocess.run(too_long)
    assert exc.value.errno == 7  # E2BIG
    r = nanobox.run(too_long)
    assert r.returncode == 126 and r.violations[0].kind == "exec", r
    assert "Argument list too long" in r.violations[0].detail
