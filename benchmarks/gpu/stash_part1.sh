#!/usr/bin/env bash
# First, short call on the GPU machine (while it is warm): keep model part 1 outside the repo copy, so the
# next call only has to carry .whl/ and .gpu_b/ (part 2 + sha256). setup_remote.sh picks it up from there.
#
#     bash benchmarks/gpu/stash_part1.sh
set -u
dest="${QRA_PARTS_DIR:-/root/qra_parts}"
src=".gpu_a/model.part1"
want=50000000
[ -f "$src" ] || { echo "stash_part1: FAILED: $src missing (run from the repo root, carry .gpu_a)" >&2; exit 1; }
size="$(stat -c %s "$src")"
[ "$size" -eq "$want" ] || { echo "stash_part1: FAILED: $src is $size bytes, want $want" >&2; exit 1; }
mkdir -p "$dest" || { echo "stash_part1: FAILED: cannot create $dest" >&2; exit 1; }
cp -f "$src" "$dest/model.part1.tmp" && mv -f "$dest/model.part1.tmp" "$dest/model.part1" \
    || { echo "stash_part1: FAILED: copy to $dest failed" >&2; exit 1; }
[ "$(stat -c %s "$dest/model.part1")" -eq "$want" ] || { echo "stash_part1: FAILED: short copy in $dest" >&2; exit 1; }
echo "stash_part1: OK $dest/model.part1 ($want bytes, sha256 $(sha256sum "$dest/model.part1" | cut -c1-16)...)"
