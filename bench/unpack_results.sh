#!/usr/bin/env bash
# Unpack what bench/gpu_suite.sh returned (OUTDIR: summary.md, results.json, tuned-configs.json,
# logs.tar.gz) into the folder that is committed, bench/results/<date>-<gpu>/ (part 2 of the
# suite, or a run of chosen steps, into its part-<part>/ subfolder).
#
#   bash bench/unpack_results.sh RETURNED_DIR [RESULTS_ROOT]    (RESULTS_ROOT: bench/results)
#
# The per-step snapshots of results.json inside the tarball are left out (they are there to
# check the suite itself); logs/, data/ (each step's raw JSON) and files/ (PNGs) are kept.
set -u -o pipefail

main() {
die() { echo "unpack_results: $*" >&2; exit 2; }
(( $# >= 1 && $# <= 2 )) || die "usage: bash bench/unpack_results.sh RETURNED_DIR [RESULTS_ROOT]"
local src=$1 root=${2:-$(cd "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)/results}
local py=${PYTHON:-python3}
[ -s "$src/results.json" ] || die "$src/results.json is missing: is $src a folder the GPU suite wrote?"
local where
where=$("$py" -c "
import json, sys
s = json.load(open(sys.argv[1]))['suite']
part = str(s.get('part', '1'))
print(f\"{s['date']}-{s['slug']}\" + ('' if part in ('1', 'all') else f'/part-{part}'))
" "$src/results.json") || die "$src/results.json has no suite date and GPU (not written by bench/gpu_suite.sh?)"
local dest="$root/$where"
[ -e "$dest/results.json" ] && die "$dest already holds results: move them away first"
mkdir -p -- "$dest" || die "cannot create $dest"
local f
for f in summary.md results.json tuned-configs.json; do
    [ -e "$src/$f" ] && cp -- "$src/$f" "$dest/$f"
done
if [ -e "$src/logs.tar.gz" ]; then
    tar -xzf "$src/logs.tar.gz" -C "$dest" --exclude=./snapshots --exclude=snapshots \
        || die "cannot unpack $src/logs.tar.gz into $dest"
fi
echo "unpacked into $dest:"
(cd "$dest" && find . -type f | sort | sed 's|^\./|  |')
}

# one compound command: parsed whole before it runs, so an edit of this file meanwhile is harmless
{ main "$@"; exit $?; }
