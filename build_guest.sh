#!/usr/bin/env bash
# SPDX-License-Identifier: GPL-2.0-only
#
# Build every guests/<name>.c into a static x86-64 ELF <build-dir>/<name>.elf,
# linked with the runtime in guests/lib.  Incremental: an output is rebuilt
# only when its inputs (program source, runtime sources/headers, linker
# script, this script, or the compiler flags) are newer or changed.
#
# usage: build_guest.sh [BUILD_DIR] [PROGRAM...]
#   BUILD_DIR defaults to $KVMPY_GUEST_BUILD_DIR, else build/guests
#   PROGRAM names limit the build to those programs (default: all)
# env: CC (default gcc), EXTRA_CFLAGS, V=1 to echo commands
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$ROOT"

OUT=${1:-${KVMPY_GUEST_BUILD_DIR:-build/guests}}
[ $# -gt 0 ] && shift
CC=${CC:-gcc}

die() { echo "build_guest.sh: $*" >&2; exit 1; }

command -v "$CC" >/dev/null 2>&1 ||
	die "C compiler '$CC' not found; install the Debian package 'gcc' (apt-get install gcc)"
case "$("$CC" -dumpmachine 2>/dev/null)" in
x86_64-*) ;;
*) die "'$CC' does not target x86-64; install the Debian package 'gcc-x86-64-linux-gnu' and set CC=x86_64-linux-gnu-gcc" ;;
esac

CFLAGS="-std=gnu11 -O2 -g -Wall -Wextra -Wno-unused-parameter -Werror=implicit-function-declaration \
 -ffreestanding -fno-builtin -fno-pic -fno-pie -fno-stack-protector -fcf-protection=none \
 -fno-asynchronous-unwind-tables -fno-tree-loop-distribute-patterns \
 -mno-red-zone -mgeneral-regs-only -mcmodel=small -fno-common ${EXTRA_CFLAGS:-}"
LDFLAGS="-nostdlib -static -no-pie -Wl,--build-id=none -Wl,-z,noexecstack -Wl,-T,guests/lib/guest.ld"

mkdir -p "$OUT/lib"
OUT=$(cd "$OUT" && pwd)

# A change of compiler or flags invalidates every object.
STAMP="$OUT/.flags"
SIG="$CC $("$CC" -dumpversion) $CFLAGS $LDFLAGS"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$SIG" ]; then
	rm -f "$OUT"/*.elf "$OUT"/*.o "$OUT"/lib/*.o
	printf '%s' "$SIG" > "$STAMP"
fi

run() { [ "${V:-0}" = 1 ] && echo "$*"; "$@"; }

# newer OUT INPUT...: true if OUT is missing or older than any input.
stale() {
	local out=$1; shift
	[ -e "$out" ] || return 0
	local f
	for f in "$@"; do [ "$f" -nt "$out" ] && return 0; done
	return 1
}

HEADERS=(guests/lib/*.h)
COMMON=("${HEADERS[@]}" build_guest.sh)

LIB_OBJS=()
for src in guests/lib/*.c guests/lib/*.S; do
	[ -e "$src" ] || continue
	obj="$OUT/lib/$(basename "${src%.*}").o"
	LIB_OBJS+=("$obj")
	if stale "$obj" "$src" "${COMMON[@]}"; then
		echo "  CC      $src"
		# shellcheck disable=SC2086
		run "$CC" $CFLAGS -c "$src" -o "$obj.tmp" || die "compiling $src failed"
		mv -f "$obj.tmp" "$obj"
	fi
done

if [ $# -gt 0 ]; then
	PROGS=()
	for p in "$@"; do
		[ -f "guests/$p.c" ] || die "no guest program guests/$p.c"
		PROGS+=("guests/$p.c")
	done
else
	PROGS=(guests/*.c)
fi

built=0
for src in "${PROGS[@]}"; do
	[ -e "$src" ] || continue
	name=$(basename "$src" .c)
	obj="$OUT/$name.o"
	elf="$OUT/$name.elf"
	if stale "$obj" "$src" "${COMMON[@]}"; then
		echo "  CC      $src"
		# shellcheck disable=SC2086
		run "$CC" $CFLAGS -c "$src" -o "$obj.tmp" || die "compiling $src failed"
		mv -f "$obj.tmp" "$obj"
	fi
	if stale "$elf" "$obj" "${LIB_OBJS[@]}" guests/lib/guest.ld; then
		echo "  LD      $elf"
		# shellcheck disable=SC2086
		run "$CC" $LDFLAGS -o "$elf.tmp" "$obj" "${LIB_OBJS[@]}" -lgcc || die "linking $elf failed"
		mv -f "$elf.tmp" "$elf"
		built=$((built + 1))
	fi
done
echo "build_guest.sh: $built program(s) linked, output in $OUT"
