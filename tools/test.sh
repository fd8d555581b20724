#!/usr/bin/env bash
# The whole test suite: installs the dev dependencies into .venv, then runs
# ruff, mypy, the syscall-table freshness check and pytest (extra arguments
# go to pytest). Set NANOBOX_PYTHON to choose the interpreter for .venv and
# NANOBOX_SKIP_LINT=1 to run only pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${NANOBOX_PYTHON:-python3}
[ -x .venv/bin/python ] || "$py" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
if [ "${NANOBOX_SKIP_LINT:-0}" != 1 ]; then
    lint=(src tests tools)
    [ -d bench ] && lint+=(bench)
    echo "== ruff"; .venv/bin/ruff check "${lint[@]}"
    echo "== mypy"; .venv/bin/mypy
    echo "== syscall tables"; .venv/bin/python tools/gen_syscall_tables.py --check
    echo "== default filter"; .venv/bin/python tools/gen_default_filter.py --check
fi
echo "== pytest"
exec .venv/bin/python -m pytest "$@"
