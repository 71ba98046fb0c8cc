#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-only
#
# CI of the Intel half of the nested test bed: Bochs (VMX + EPT) packages, the
# Debian kernel (cached under ~/.cache/kvmpy/bed), the Bochs backend's unit tests,
# then one boot of Bochs that loads kvm_intel nested=1 ept=1 and runs a KVM guest
# inside through kvmpy (tests/test_bed_bochs.py -m bed), and one that runs the guest-runtime
# and nested VMX selftests.  A Bochs boot is several
# minutes of single-threaded emulation: keep what runs inside batched in one boot.
#
# usage: ci/bed-bochs.sh           PYTHON=... picks the interpreter
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ -z "${PYTHON:-}" ]; then
	PYTHON=python3
	[ -x .venv/bin/python ] && PYTHON=.venv/bin/python
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

missing=()
for p in bochs bochsbios vgabios bochs-term isolinux syslinux-common xorriso busybox-static cpio; do
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
	echo "=== bochs $name: $*"
	"$@"
	echo "=== bochs $name: ok in $((SECONDS - t0))s"
}

step setup timeout 900 "$PYTHON" -m kvmpy.cli bed setup --backend bochs
step unit timeout 300 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_bed_bochs.py
step boot timeout 1500 "$PYTHON" -m pytest -q -p no:cacheprovider -m bed tests/test_bed_bochs.py
# The guest runtime and the nested VMX probe (L1 VMXON/VMLAUNCH of an L2, EPT) in one boot.
step selftests timeout 1500 "$PYTHON" -m kvmpy.cli selftest --bed --backend bochs -k "guest_runtime or nested_vmx"
