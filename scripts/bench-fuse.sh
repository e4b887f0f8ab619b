#!/usr/bin/env bash
# fio through a loop device on the FUSE file vs fio on the plain backing file, in
# one session, interleaved per round (see docs/FUSE.md, "Performance"):
#   randwrite: 4 KiB random writes, io_uring, iodepth 32, direct=1
#   seqwrite:  1 MiB sequential writes, io_uring, iodepth 8, direct=1
# on four targets:
#   file-direct    the backing image itself, O_DIRECT (the device's speed)
#   file-buffered  the backing image itself, through the page cache (what the
#                  FUSE server does with each request: a buffered pwrite)
#   loop-dio       /dev/loopN (--direct-io=on) on the FUSE file
#   loop-buffered  /dev/loopN (buffered loop) on the FUSE file
# Usage: scripts/bench-fuse.sh [rounds] [seconds] [fuse_serve options...]
# (defaults: 3 rounds of 10 s; e.g. `scripts/bench-fuse.sh 3 10 --threads 2`).
# BENCH_DIR (default /var/tmp) holds the image, BENCH_SIZE (default 2G) sizes it;
# BENCH_DIR=/dev/shm takes the device out of the comparison (CPU cost only).
# Needs root, fio, losetup; builds the fuse_serve example in release.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
secs=${2:-10}
shift $(( $# >= 2 ? 2 : $# ))
cargo build --release --quiet --example fuse_serve
bin=${CARGO_TARGET_DIR:-target}/release/examples/fuse_serve
size=${BENCH_SIZE:-2G}
dir=$(mktemp -d "${BENCH_DIR:-/var/tmp}/tidemark-fuse-bench.XXXXXX")
pid= ; lo_dio= ; lo_buf=
cleanup() {
    [ -n "$lo_dio" ] && losetup -d "$lo_dio" || true
    [ -n "$lo_buf" ] && losetup -d "$lo_buf" || true
    if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" || true; fi
    rm -rf "$dir"
}
trap cleanup EXIT
fallocate -l "$size" "$dir/disk.img"
mkdir "$dir/mnt" "$dir/out"
"$bin" "$@" "$dir/mnt" "$dir/disk.img" > "$dir/serve.out" 2> "$dir/serve.err" &
pid=$!
for _ in $(seq 1 100); do [ -s "$dir/serve.out" ] && break; sleep 0.1; done
[ -s "$dir/serve.out" ] || { cat "$dir/serve.err" >&2; exit 1; }
lo_dio=$(losetup --find --show --direct-io=on "$dir/mnt/disk.img")
lo_buf=$(losetup --find --show "$dir/mnt/disk.img")
echo "== $(nproc) cores, $(uname -r); fuse_serve $*; loop dio $lo_dio (dio=$(cat /sys/block/${lo_dio#/dev/}/loop/dio)), buffered $lo_buf"

run() { # name target job round
    local name=$1 target=$2 job=$3 round=$4 extra=()
    case $job in
        randwrite) extra=(--rw=randwrite --bs=4k --iodepth=32) ;;
        seqwrite) extra=(--rw=write --bs=1M --iodepth=8) ;;
    esac
    local direct=1
    [ "$name" = file-buffered ] && direct=0
    fio --name="$job" --filename="$target" --ioengine=io_uring --direct=$direct \
        --size="$size" --runtime="$secs" --time_based --group_reporting \
        --output-format=json "${extra[@]}" > "$dir/out/$name.$job.$round.json"
    # Start the next run without this one's dirty pages of the image.
    sync "$dir/disk.img"
}
for r in $(seq 1 "$rounds"); do
    for job in randwrite seqwrite; do
        run file-direct "$dir/disk.img" $job $r
        run file-buffered "$dir/disk.img" $job $r
        run loop-dio "$lo_dio" $job $r
        run loop-buffered "$lo_buf" $job $r
    done
done
python3 - "$dir/out" "$rounds" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
names = ["file-direct", "file-buffered", "loop-dio", "loop-buffered"]
for job in ["randwrite", "seqwrite"]:
    med = {}
    for n in names:
        vals = []
        for r in range(1, rounds + 1):
            w = json.load(open(f"{out}/{n}.{job}.{r}.json"))["jobs"][0]["write"]
            vals.append(w["iops"] if job == "randwrite" else w["bw_bytes"] / 1e6)
        med[n] = statistics.median(vals)
        unit = "IOPS" if job == "randwrite" else "MB/s"
        print(f"{job:9} {n:13} median {med[n]:9.0f} {unit}  ({', '.join(f'{v:.0f}' for v in vals)})")
    for n in ["loop-dio", "loop-buffered"]:
        print(f"{job:9} {n:13} / file-direct {med[n] / med['file-direct']:.2f}, / file-buffered {med[n] / med['file-buffered']:.2f}")
PY
losetup -d "$lo_dio"; lo_dio=
losetup -d "$lo_buf"; lo_buf=
kill -TERM "$pid"; wait "$pid" || true; pid=
tail -1 "$dir/serve.err"
