#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-only
#
# One-step set-up on a fresh Debian machine: the Debian packages kvmpy builds
# with, a virtualenv in .venv, and kvmpy installed into it (editable, so the
# compiled binding and the guests are built in this tree). Idempotent and quick
# when everything is already there.
#
# usage: ci/setup.sh [--bed]     --bed also sets up the nested test beds: QEMU (AMD)
#                                and Bochs (Intel) packages and the Debian kernel
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PKGS=(gcc libc6-dev libffi-dev python3-dev python3-venv linux-libc-dev)
BED=0
if [ "${1:-}" = "--bed" ]; then
	BED=1
	PKGS+=(qemu-system-x86 busybox-static xz-utils zstd cpio
	       bochs bochsbios vgabios bochs-term isolinux syslinux-common xorriso)
fi

missing=()
for p in "${PKGS[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "ci/setup.sh: installing Debian packages: ${missing[*]}"
	SUDO=""
	[ "$(id -u)" -eq 0 ] || SUDO="sudo"
	$SUDO apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's own interpreter, the one python3-venv and python3-dev are for (PYTHON= another),
# not whichever python3 PATH finds first: a pyenv build here (no PGO/LTO, shared libpython)
# ran kvmpy's Python slower (`kvmpy perf` start and exit 76 ms against 65; see the README).
PY=${PYTHON:-/usr/bin/python3}
if ! command -v "$PY" >/dev/null; then
	echo "ci/setup.sh: no interpreter $PY (Debian's python3 package has it; PYTHON= names another)" >&2
	exit 1
fi
want=$("$PY" -c 'import os, sys; print(os.path.realpath(sys.executable))')
if [ -x .venv/bin/python ] && [ "$(realpath .venv/bin/python)" != "$want" ]; then
	echo "ci/setup.sh: .venv is built on $(realpath .venv/bin/python), not $want: making it again"
	rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
	"$PY" -m venv .venv
fi
# Reinstall only when the build inputs changed since the last install.
stamp=.venv/.kvmpy-installed
inputs=$(cat pyproject.toml setup.py kvmpy/_ffi_build.py kvmpy/_bulk.c kvmpy/_stats_snapshot.c 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$inputs" ] || ! .venv/bin/python -c "import kvmpy.abi" 2>/dev/null; then
	.venv/bin/python -m pip install -q --upgrade pip
	.venv/bin/python -m pip install -q -e .
	echo "$inputs" > "$stamp"
fi
# Byte-compile kvmpy, as a non-editable install does: an editable one leaves that to the
# first import, which never writes where PYTHONDONTWRITEBYTECODE is set, and then every
# `kvmpy` start compiled its modules again (30 ms of a 0.13 s start here).
.venv/bin/python -m compileall -q kvmpy >/dev/null
./build_guest.sh >/dev/null
if [ $BED -eq 1 ]; then
	# Fetch and unpack the bed kernel (cached under ~/.cache/kvmpy/bed) for both backends.
	.venv/bin/kvmpy bed setup --backend qemu >/dev/null
	.venv/bin/kvmpy bed setup --backend bochs >/dev/null
fi
