#!/usr/bin/env bash
# Install the peers that the benchmarks compare nanobox with. Idempotent:
# re-running it only installs what is missing. Every step that fails is
# reported and skipped; bench/run_all.py then records the peer as missing.
#
#   bash bench/install_peers.sh            # apt peers + sandbox-runtime (npm)
#   NO_NPM=1 bash bench/install_peers.sh   # skip sandbox-runtime
#   PYTHON=.venv/bin/python bash bench/install_peers.sh   # also matplotlib for plots
set -u
here="$(cd "$(dirname "$0")" && pwd)"
peers="$here/.peers"
status=0

have() { command -v "$1" >/dev/null 2>&1; }
note() { printf 'install_peers: %s\n' "$*" >&2; }

sudo_=""
if [ "$(id -u)" != 0 ]; then
    if have sudo; then sudo_="sudo"; else note "not root and no sudo: apt installs may fail"; fi
fi

# Debian packages: peers (bwrap, firejail, unshare), hyperfine, and what
# sandbox-runtime needs at run time (socat, ripgrep), curl for proxy tests.
want=()
for pair in bwrap:bubblewrap firejail:firejail unshare:util-linux hyperfine:hyperfine \
            socat:socat rg:ripgrep curl:curl; do
    bin="${pair%%:*}"; pkg="${pair#*:}"
    have "$bin" || want+=("$pkg")
done
if [ ${#want[@]} -gt 0 ]; then
    note "apt-get install ${want[*]}"
    if ! $sudo_ apt-get install -y -q --no-install-recommends "${want[@]}" >/dev/null 2>&1; then
        $sudo_ apt-get update -q >/dev/null 2>&1 || true
        for pkg in "${want[@]}"; do
            $sudo_ apt-get install -y -q --no-install-recommends "$pkg" >/dev/null 2>&1 \
                || { note "could not install $pkg (skipped)"; status=1; }
        done
    fi
fi

# sandbox-runtime (srt) from npm, into bench/.peers/ (gitignored).
if [ -z "${NO_NPM:-}" ]; then
    if [ -x "$peers/node_modules/.bin/srt" ]; then
        :
    elif have npm; then
        mkdir -p "$peers"
        note "npm install @anthropic-ai/sandbox-runtime into $peers"
        if ! (cd "$peers" && timeout 300 npm install --no-audit --no-fund --silent \
                @anthropic-ai/sandbox-runtime >/dev/null 2>&1); then
            note "sandbox-runtime could not be installed (registry unreachable?): srt skipped"
            status=1
        fi
    else
        note "npm not found: sandbox-runtime (srt) skipped (apt-get install nodejs npm)"
        status=1
    fi
fi

# Optional: matplotlib for bench/plot.py (the 'bench' extra of nanobox).
if [ -n "${PYTHON:-}" ]; then
    if ! "$PYTHON" -c 'import matplotlib' >/dev/null 2>&1; then
        note "pip install matplotlib into $PYTHON"
        "$PYTHON" -m pip install -q 'matplotlib>=3.8' >/dev/null 2>&1 \
            || { note "matplotlib could not be installed: no plots"; status=1; }
    fi
fi

for bin in bwrap firejail unshare hyperfine socat rg "$peers/node_modules/.bin/srt"; do
    if have "$bin" || [ -x "$bin" ]; then
        note "ok: $bin"
    else
        note "missing: $bin"
    fi
done
exit $status
