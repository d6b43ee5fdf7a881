#!/usr/bin/env bash
# Compile the fast-path BPF programs into the object that the crate embeds.
#
#   bpf/build-bpf.sh            rebuild bpf/src/bpf/sluice.bpf.o in place
#   bpf/build-bpf.sh OUT.o      write the object elsewhere (used by check-object.sh)
#
# Needs Debian's clang and libbpf-dev (apt-get install -y clang libbpf-dev llvm).
# The build is reproducible: it runs from the source directory with relative paths, maps the
# compilation directory to ".", and strips DWARF (keeping BTF, which SK_STORAGE and aya need),
# so the object carries no absolute path and no build-machine detail.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src_dir="$here/src/bpf"
out="${1:-$src_dir/sluice.bpf.o}"
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac

CLANG="${CLANG:-clang}"
STRIP="${LLVM_STRIP:-llvm-strip}"
for tool in "$CLANG" "$STRIP"; do
	if ! command -v "$tool" >/dev/null 2>&1; then
		echo "build-bpf.sh: '$tool' not found; install it with: apt-get install -y clang llvm libbpf-dev" >&2
		exit 2
	fi
done
if [ ! -f /usr/include/bpf/bpf_helpers.h ]; then
	echo "build-bpf.sh: /usr/include/bpf/bpf_helpers.h not found; install it with: apt-get install -y libbpf-dev" >&2
	exit 2
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

cd "$src_dir"
"$CLANG" -O2 -g -target bpf \
	-I/usr/include/x86_64-linux-gnu \
	-Wall -Werror \
	-fdebug-compilation-dir=. \
	-fdebug-prefix-map="$src_dir"=. \
	-c sluice.bpf.c -o "$tmp/sluice.bpf.o"
# Drop DWARF (.debug_*): it is not needed at load time. .BTF and .BTF.ext stay.
"$STRIP" --strip-debug "$tmp/sluice.bpf.o" -o "$out"
echo "build-bpf.sh: wrote $out ($("$CLANG" --version | head -n1))"
