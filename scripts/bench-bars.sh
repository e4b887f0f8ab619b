#!/usr/bin/env bash
# Measures the pipeline issue's bars with `tidemark bench` (release build), each
# figure from runs on this machine in one go, and prints a summary:
#   1. efficiency: N unthrottled default runs (30 s, 64 KiB random, 50 %, zstd 1),
#      median of applied MB/s, bound and efficiency;
#   2. lag p99 with the workload throttled to half the median unthrottled rate;
#   3. peak RSS per role, including a run with a 64 GiB sparse image;
#   4. a diagnostic: the default run with the relay's spool in /dev/shm, i.e. off
#      the disk the replica is on (tmpfs is NOT durable: a stand-in for the relay's
#      own disk in a real deployment, to show what sharing one disk costs).
# Usage: scripts/bench-bars.sh [runs] [seconds]     (defaults: 3 runs of 30 s)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
secs=${2:-30}
cargo build --release --quiet
bin=target/release/tidemark
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "== machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for i in $(seq 1 "$runs"); do
    "$bin" bench --seconds "$secs" --json > "$out/run$i.json" 2> "$out/run$i.err" || { cat "$out/run$i.err" >&2; exit 1; }
done
python3 - "$out" "$runs" <<'PY'
import json, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
rs = [json.load(open(f"{out}/run{i}.json")) for i in range(1, runs + 1)]
for i, r in enumerate(rs, 1):
    print(f"run {i}: verified={r['verified']} source {r['source_mb_s']:.0f} MB/s, applied {r['applied_mb_s']:.0f} MB/s, "
          f"bound {r['bound_mb_s']:.0f} MB/s, efficiency {r['efficiency']:.2f}, lag p99 {r['lag_p99_ms']:.0f} ms, "
          f"cpu s/GB a/r/t {r['cpu_s_per_gb']['agent']:.2f}/{r['cpu_s_per_gb']['relay']:.2f}/{r['cpu_s_per_gb']['target']:.2f}, "
          f"peak RSS MiB a/r/t {r['peak_rss_mib']['agent']:.0f}/{r['peak_rss_mib']['relay']:.0f}/{r['peak_rss_mib']['target']:.0f}")
med = lambda k: statistics.median(r[k] for r in rs)
print(f"median: applied {med('applied_mb_s'):.0f} MB/s, bound {med('bound_mb_s'):.0f} MB/s, efficiency {med('efficiency'):.2f}")
open(f"{out}/half", "w").write(f"{med('applied_mb_s') / 2:.1f}")
PY
half=$(cat "$out/half")
echo "== half rate: --rate-mb-s $half"
"$bin" bench --seconds "$secs" --rate-mb-s "$half" --skip-bound --json > "$out/half.json" 2> "$out/half.err" || { cat "$out/half.err" >&2; exit 1; }
echo "== 64 GiB sparse image"
"$bin" bench --seconds "$secs" --image-size 64G --skip-bound --json > "$out/big.json" 2> "$out/big.err" || { cat "$out/big.err" >&2; exit 1; }
if [ -d /dev/shm ]; then
    echo "== diagnostic: spool on /dev/shm (not durable), $runs runs"
    for i in $(seq 1 "$runs"); do
        "$bin" bench --seconds "$secs" --spool-dir "/dev/shm/tidemark-spool-$$-$i" --json > "$out/shm$i.json" 2> "$out/shm$i.err" || { cat "$out/shm$i.err" >&2; exit 1; }
    done
fi
python3 - "$out" "$runs" <<'PY'
import json, os, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
shm = [json.load(open(f"{out}/shm{i}.json")) for i in range(1, runs + 1) if os.path.exists(f"{out}/shm{i}.json")]
for i, r in enumerate(shm, 1):
    print(f"shm {i}: verified={r['verified']} applied {r['applied_mb_s']:.0f} MB/s, bound {r['bound_mb_s']:.0f} MB/s, efficiency {r['efficiency']:.2f}")
if shm:
    print(f"shm median efficiency {statistics.median(r['efficiency'] for r in shm):.2f}")
for name in ("half", "big"):
    r = json.load(open(f"{out}/{name}.json"))
    print(f"{name}: verified={r['verified']} source {r['source_mb_s']:.0f} MB/s, applied {r['applied_mb_s']:.0f} MB/s, "
          f"lag p50/p99 {r['lag_p50_ms']:.0f}/{r['lag_p99_ms']:.0f} ms, "
          f"peak RSS MiB a/r/t {r['peak_rss_mib']['agent']:.0f}/{r['peak_rss_mib']['relay']:.0f}/{r['peak_rss_mib']['target']:.0f}")
PY
