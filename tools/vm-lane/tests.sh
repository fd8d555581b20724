#!/usr/bin/env bash
# The VM lane as CI runs it: set-up, then the project's VM-marked tests
# (pytest -m vm) in one fresh VM per kernel configuration, each with the
# test files it adds coverage for (see "leave" below).
#
#   tools/vm-lane/tests.sh [CONFIG...] [-- PYTEST_ARGS...]
#
# CONFIG: v2 (pure cgroup v2), v1 (systemd's hybrid cgroup layout),
# no-userns-all (cgroup v2, user.max_user_namespaces=0), no-userns (cgroup
# v2, Debian's kernel.unprivileged_userns_clone=0). Default: v2 v1
# no-userns-all. PYTEST_ARGS are added to the pytest command (e.g. -k oom).
#
# /tmp in the guest (pytest's tmp_path, the tests' workspaces) is a fresh ext4
# disk, as on a stock Debian 12 host: nanobox as root maps the workspace with
# an idmapped mount, which kernel 6.1 supports on ext4 but not on tmpfs.
#
# Needs the checkout's .venv (CI runs `bash tools/test.sh` first) and, the
# first time, root for setup.sh. Per configuration it writes
# reports/vm-<config>/{junit.xml,output.log}, prints the tests' output live
# and a one-line summary at the end. Exit status 1 if any configuration
# failed. NANOBOX_VMLANE_TIMEOUT (seconds per configuration, default 1200)
# and the other NANOBOX_VMLANE_* variables of run.sh apply.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
lane=tools/vm-lane
err() { echo "vm-lane tests: $*" >&2; }

configs=() pytest_extra=()
while [ $# -gt 0 ]; do
  case $1 in
    --) shift; pytest_extra=("$@"); break ;;
    v2|v1|no-userns|no-userns-all) configs+=("$1"); shift ;;
    -h|--help) sed -n '2,/^set -uo/{/^set -uo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) err "unknown configuration '$1' (v2, v1, no-userns-all, no-userns)"; exit 2 ;;
  esac
done
[ ${#configs[@]} -gt 0 ] || configs=(v2 v1 no-userns-all)

bash "$lane/setup.sh" || { err "set-up failed"; exit 1; }

# The venv's interpreter: a symlink to a real binary. Under TCG every
# interpreter start costs seconds, and a pyenv shim (a bash script that runs
# pyenv) several more, so never go through PATH.
PY=.venv/bin/python
[ -x "$PY" ] || { err "no $PY: run 'bash tools/test.sh' first (it creates the venv)"; exit 1; }
if [ "$(head -c2 "$(readlink -f "$PY")")" = '#!' ]; then
  err "warning: $PY resolves to a script ($(readlink -f "$PY")), not an interpreter; slow in the VM"
fi

# Compile the C test programs on the host (the cbin fixture in
# tests/conftest.py does the same when they are missing; in the guest that
# would happen ~20x slower, into the throw-away overlay, on every boot).
if command -v cc >/dev/null; then
  "$PY" -c 'import sys; sys.path.insert(0, "tests"); from conftest import build_cbin; print(build_cbin())' \
    || { err "cannot compile the C test programs"; exit 1; }
fi

# Only the files that hold VM-marked tests: collecting the whole suite under
# TCG (importing every test module) cost about a minute per configuration.
mapfile -t files < <(grep -l 'pytest.mark.vm' tests/test_*.py)
[ ${#files[@]} -gt 0 ] || { err "no VM-marked tests under tests/"; exit 1; }
# Byte-code for the guest, compiled here in a second: the guest's writes go
# to a throw-away overlay (and PYTHONDONTWRITEBYTECODE may be set), so every
# interpreter there, the fork servers' included, would compile the sources
# it imports again. The test modules and conftest.py are loaded from
# pytest's assertion-rewritten byte-code, cached by a collection here (plain
# compileall output of them would go unused). (Hypothesis's pytest plugin is
# off in the guest: no VM test uses it, and it imports all of Hypothesis at
# the end of the run.)
env -u PYTHONDONTWRITEBYTECODE "$PY" -m compileall -q src >/dev/null \
  || { err "cannot compile src"; exit 1; }
pytest_args=(-m vm -q -p no:cacheprovider -p no:hypothesispytest)
env -u PYTHONDONTWRITEBYTECODE "$PY" -m pytest --collect-only "${pytest_args[@]}" "${files[@]}" >/dev/null \
  || { err "the VM-marked tests do not collect on the host"; exit 1; }

timeout=${NANOBOX_VMLANE_TIMEOUT:-1200}
summary=() failed=0
for cfg in "${configs[@]}"; do
  case $cfg in
    v2) flags=(--cgroup v2) ;;
    v1) flags=(--cgroup v1) ;;
    no-userns) flags=(--cgroup v2 --no-userns) ;;
    no-userns-all) flags=(--cgroup v2 --no-userns-all) ;;
  esac
  # What each configuration adds over the others and the host suite. The
  # no-user-namespace mode's tests run where user namespaces really are
  # missing (their cgroup is v2 there too), not again in v2 and v1. The v1
  # layout is the development host's (which runs everything on a newer
  # kernel): there, only what involves cgroups; the sandboxes built ahead
  # (test_warm.py) do not depend on the cgroup version.
  case $cfg in
    v2) leave=(tests/test_nouserns.py) ;;
    v1) leave=(tests/test_nouserns.py tests/test_warm.py) ;;
    *) leave=() ;;
  esac
  cfg_files=()
  for f in "${files[@]}"; do
    case " ${leave[*]} " in *" $f "*) ;; *) cfg_files+=("$f") ;; esac
  done
  out=reports/vm-$cfg
  rm -rf "$out"; mkdir -p "$out"
  echo "=== vm-lane $cfg: run.sh ${flags[*]} --tmp ext4 -- pytest -m vm ${cfg_files[*]#tests/}"
  # The guest runs ~20x slower than the host: tests widen timing tolerances.
  export NANOBOX_VM_LANE=1
  start=$(date +%s%N)
  "$lane/run.sh" "${flags[@]}" --tmp ext4 --rw "$out" --timeout "$timeout" -- \
    "$PY" -m pytest "${pytest_args[@]}" --junitxml="$out/junit.xml" \
    --basetemp=/vmtmp/pytest \
    "${pytest_extra[@]}" "${cfg_files[@]}" | tee "$out/output.log"
  rc=${PIPESTATUS[0]}
  secs=$(( ($(date +%s%N) - start) / 1000000 ))
  secs=$(printf '%d.%01d' $((secs / 1000)) $((secs % 1000 / 100)))
  result=$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|errors?|deselected|xfailed|xpassed)|no tests ran' \
             "$out/output.log" | tail -1 | sed 's/^=* *//; s/ *=*$//')
  case $rc in
    0) status=PASS ;;
    124) status=FAIL result="timed out after ${timeout}s${result:+; $result}" ;;
    125) status=FAIL result="the VM failed (no exit status)${result:+; $result}" ;;
    *) status=FAIL ;;
  esac
  [ "$rc" = 0 ] || failed=1
  summary+=("$(printf 'vm-lane %-14s %s  rc=%-3s %6ss  %s' "$cfg" "$status" "$rc" "$secs" "${result:-no pytest summary}")")
  echo "${summary[-1]}"
done

echo "=== vm-lane summary (kernel $(basename "$(readlink -e "${NANOBOX_VMLANE_CACHE:-/var/cache/nanobox-vmlane}/current")"))"
printf '%s\n' "${summary[@]}"
exit $failed
