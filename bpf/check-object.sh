#!/usr/bin/env bash
# Fail when the committed BPF object is not what its source compiles to.
#
# CI runs this so that a change to bpf/src/bpf/*.{c,h} without a rebuilt object (or an object
# edited by hand) cannot land. Rebuild with bpf/build-bpf.sh and commit the result.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
committed="$here/src/bpf/sluice.bpf.o"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

if [ ! -f "$committed" ]; then
	echo "check-object.sh: FAIL: $committed is missing; run bpf/build-bpf.sh and commit it" >&2
	exit 1
fi
"$here/build-bpf.sh" "$tmp/sluice.bpf.o" >/dev/null
if cmp -s "$committed" "$tmp/sluice.bpf.o"; then
	echo "check-object.sh: OK: bpf/src/bpf/sluice.bpf.o matches its source"
	exit 0
fi
echo "check-object.sh: FAIL: bpf/src/bpf/sluice.bpf.o is stale or was built differently." >&2
echo "  committed: $(sha256sum "$committed" | cut -d' ' -f1)" >&2
echo "  rebuilt:   $(sha256sum "$tmp/sluice.bpf.o" | cut -d' ' -f1)" >&2
echo "  compiler:  $(${CLANG:-clang} --version | head -n1)" >&2
echo "  Run bpf/build-bpf.sh and commit the object (the build needs Debian's clang 14 to be byte-identical)." >&2
exit 1
