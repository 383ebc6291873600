#!/usr/bin/env bash
# Prepare this checkout to run and test Cairn on Debian: system packages, a virtual
# environment in .venv, and the project installed in it (editable, with every extra: the agent,
# the appliance, the FUSE drive and the development tools).
#
# Idempotent and quiet: each step checks first and does nothing when already done, so
# `make run` and `make test` can call it every time. Needs root only when a system package is
# missing. Environment: PYTHON (interpreter to build the venv from, default python3),
# CAIRN_VENV (default .venv).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
VENV="${CAIRN_VENV:-.venv}"
STAMP="$VENV/.cairn-install-stamp"
LOG="${TMPDIR:-/tmp}/cairn-bootstrap.$$.log"
trap 'rm -f "$LOG"' EXIT

# fuse3 + libfuse3-dev: FUSE mounts and building pyfuse3 (sdist only); gcc, pkg-config and
# python3-dev: the compiler, flags and headers that build; python3-venv: `python3 -m venv`;
# make: the README's commands themselves. rsync, sqlite3, git: real programs the drive's
# tests use as its clients.
APT_PACKAGES=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv make rsync sqlite3 git)

say() { printf 'bootstrap: %s\n' "$*"; }
die() { printf 'bootstrap: error: %s\n' "$*" >&2; exit 1; }
# Run a noisy command with its output in $LOG; show the output only if it fails.
quietly() {
    if ! "$@" >"$LOG" 2>&1; then
        printf 'bootstrap: error: this failed: %s\n' "$*" >&2
        tail -n 40 "$LOG" >&2
        exit 1
    fi
}

# --- 1. system packages -----------------------------------------------------------------
missing=()
for package in "${APT_PACKAGES[@]}"; do
    status="$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)"
    [[ "$status" == "install ok installed" ]] || missing+=("$package")
done
if ((${#missing[@]})); then
    command -v apt-get >/dev/null || die "missing packages (${missing[*]}) and no apt-get: install them by hand"
    [[ "$(id -u)" -eq 0 ]] || die "missing packages (${missing[*]}): run as root, or install them with apt-get first"
    say "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    quietly apt-get update -q
    quietly apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    say "system packages present"
fi

# --- 2. python ----------------------------------------------------------------------------
command -v "$PYTHON" >/dev/null || die "$PYTHON not found; Cairn needs Python 3.11 or newer"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
    || die "$PYTHON is $("$PYTHON" -c 'import sys; print(sys.version.split()[0])'); Cairn needs 3.11 or newer"

# --- 3. virtual environment -----------------------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
    say "creating virtual environment in $VENV"
    rm -rf "$VENV"
    quietly "$PYTHON" -m venv "$VENV"
fi

# --- 4. the project -----------------------------------------------------------------------
# Reinstall only when pyproject.toml (the dependency list) changed since the last install.
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
if [[ "$want" != "$have" ]]; then
    say "installing cairn and its dependencies into $VENV (a few minutes the first time)"
    rm -f "$STAMP"
    quietly "$VENV/bin/python" -m pip install --disable-pip-version-check --upgrade pip
    quietly "$VENV/bin/python" -m pip install --disable-pip-version-check -e '.[dev]'
    printf '%s\n' "$want" >"$STAMP"
else
    say "python packages up to date"
fi
say "ready ($("$VENV/bin/python" -c 'import sys; print("Python", sys.version.split()[0])') in $VENV)"
