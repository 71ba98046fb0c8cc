#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-only
#
# The nested test bed's own CI: its packages, the Debian kernel (cached under
# ~/.cache/kvmpy/bed), the unit tests and the tests that boot QEMU, and, with
# --matrix, a command run once per KVM MMU configuration with its table.
#
# usage: ci/bed.sh [--matrix]      PYTHON=... picks the interpreter
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ -z "${PYTHON:-}" ]; then
	PYTHON=python3
	[ -x .venv/bin/python ] && PYTHON=.venv/bin/python
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

missing=()
for p in qemu-system-x86 busybox-static; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	SUDO=""
	[ "$(id -u)" -eq 0 ] || SUDO="sudo"
	DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

step() {
	local name=$1; shift
	local t0=$SECONDS
	echo "=== bed $name: $*"
	"$@"
	echo "=== bed $name: ok in $((SECONDS - t0))s"
}

step setup timeout 900 "$PYTHON" -m kvmpy.cli bed setup
step unit timeout 300 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_bed_unit.py tests/test_bed_splat.py
step boot timeout 900 "$PYTHON" -m pytest -q -p no:cacheprovider -m bed tests/test_bed_qemu.py
if [ "${1:-}" = "--matrix" ]; then
	mkdir -p results
	step matrix timeout 900 "$PYTHON" -m kvmpy.cli bed matrix --timeout 200 --results results/bed-matrix \
		-- python3 -c 'import os; os.open("/dev/kvm", os.O_RDWR)'
fi
