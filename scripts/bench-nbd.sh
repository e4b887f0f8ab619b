#!/usr/bin/env bash
# The filter layer's speed and memory bars, measured in one go (see BENCHMARKS.md):
#   1. fio's nbd engine against tidemark's NBD frontend while relay and target
#      replicate on this machine, side by side with qemu-nbd --cache=none
#      --aio=io_uring serving the same kind of file (a sparse raw image on the
#      same filesystem), interleaved per round:
#        randwrite: 4 KiB random writes, iodepth 32
#        seqwrite:  1 MiB sequential writes, iodepth 8
#      Each round starts fresh images; the tidemark run also waits for the
#      replica to catch up and checks it equals the source.
#   2. the agent's peak RSS while fio writes for 60 s with the relay down
#      (capture must degrade to spill and bitmap, not grow), then the catch-up
#      once the relay is back.
# Usage: scripts/bench-nbd.sh [rounds] [seconds] [rss_seconds]   (defaults 3 10 60)
# Needs fio, qemu-nbd, python3; builds tidemark in release. BENCH_DIR (default
# /var/tmp) holds the images. ROLE_NICE (default 0) runs the relay and the target
# at that nice level: with 19 they only take the CPU the protected workload
# leaves, as when they run on machines of their own; BENCHMARKS.md has both.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
secs=${2:-10}
rss_secs=${3:-60}
size=1G
cargo build --release --quiet
bin=$PWD/${CARGO_TARGET_DIR:-target}/release/tidemark
dir=$(mktemp -d "${BENCH_DIR:-/var/tmp}/tidemark-nbd-bench.XXXXXX")
pids=()
cleanup() {
    [ -n "${fio_pid:-}" ] && kill -9 "$fio_pid" 2>/dev/null || true
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
relay_port=$(free_port)
nbd_port=$(free_port)
qemu_port=$(free_port)

"$bin" init --dir "$dir/conf" --relay-listen "127.0.0.1:$relay_port" >/dev/null
# Point every role at loopback, and serve the agent's disk over NBD.
sed -i "s|^relay_name = .*|relay_name = \"127.0.0.1\"|; /^status_listen/d" "$dir/conf/agent.toml" "$dir/conf/target.toml"
sed -i "/^status_listen/d" "$dir/conf/relay.toml"
cat >> "$dir/conf/agent.toml" <<EOF

[group.disk.nbd]
listen = ["127.0.0.1:$nbd_port"]
export = "disk0"
EOF
mkdir -p "$dir/conf/disks" "$dir/conf/replicas"
src=$dir/conf/disks/g1-disk0.img
rep=$dir/conf/replicas/g1-disk0.img

start() { # role: starts it in the background, its PID in $last
    local n=0
    [ "$1" != agent ] && n=${ROLE_NICE:-0}
    nice -n "$n" "$bin" "$1" --config "$dir/conf/$1.toml" > /dev/null 2>> "$dir/$1.log" &
    last=$!
    pids+=("$last")
}
wait_port() { # port
    for _ in $(seq 1 300); do
        (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on port $1" >&2; return 1
}
agent_field() { # python expression over the agent's status `s`
    python3 - "$dir/conf/agent-state/status.json" "$1" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(eval(sys.argv[2]))
PY
}
target_seq() {
    python3 -c "import json; print(json.load(open('$dir/conf/target-state/status.json'))['groups'][0]['watermark']['last_seq'])" 2>/dev/null || echo 0
}
# Caught up: the agent holds nothing unsent and the target applied its last seq.
wait_caught_up() {
    local seq=
    for _ in $(seq 1 2400); do
        seq=$(agent_field "s['groups'][0]['journal']['next_seq'] - 1 if s['groups'][0]['journal']['mode']['mode'] == 'data' and s['groups'][0]['journal']['entries'] == 0 and s['groups'][0]['journal']['pending_bytes'] == 0 else ''" 2>/dev/null || true)
        [ -n "$seq" ] && break
        sleep 0.25
    done
    [ -n "$seq" ] || { echo "the agent did not catch up" >&2; return 1; }
    for _ in $(seq 1 2400); do
        [ "$(target_seq)" -ge "$seq" ] && return 0
        sleep 0.25
    done
    echo "the target did not apply through seq $seq" >&2; return 1
}
stop_pid() { kill -TERM "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
last=

fio_job() { # name uri job seconds out [extra...]
    local name=$1 uri=$2 job=$3 s=$4 out=$5; shift 5
    local args=()
    case $job in
        randwrite) args=(--rw=randwrite --bs=4k --iodepth=32) ;;
        seqwrite) args=(--rw=write --bs=1M --iodepth=8) ;;
        rss) args=(--rw=randwrite --bs=64k --iodepth=16) ;;
    esac
    fio --name="$name" --thread --ioengine=nbd --uri="$uri" --size=$size --runtime="$s" --time_based \
        --group_reporting --output-format=json "${args[@]}" "$@" > "$out"
}

echo "== relay and target at nice ${ROLE_NICE:-0}; $(nproc) cores, $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); ${rounds} rounds of ${secs} s"
mkdir -p "$dir/out"
for r in $(seq 1 "$rounds"); do
    for job in randwrite seqwrite; do
        # tidemark: fresh source and replica, all three roles, fio on the frontend.
        rm -rf "$src" "$rep" "$dir/conf/agent-state" "$dir/conf/target-state" "$dir/conf/spool"
        truncate -s $size "$src"
        start relay; relay=$last; wait_port "$relay_port"
        start target; target=$last
        start agent; agent=$last; wait_port "$nbd_port"
        wait_caught_up
        fio_job tidemark "nbd://127.0.0.1:$nbd_port/disk0" $job "$secs" "$dir/out/tidemark.$job.$r.json"
        t0=$(date +%s.%N)
        wait_caught_up
        t1=$(date +%s.%N)
        stop_pid "$agent"; stop_pid "$target"; stop_pid "$relay"
        if cmp -s "$src" "$rep"; then same=yes; else same=NO; fi
        echo "round $r $job tidemark: replica caught up $(python3 -c "print(round($t1-$t0,1))") s after fio, replica == source: $same"
        [ "$same" = yes ] || exit 1
        # qemu-nbd on the same kind of file.
        rm -f "$dir/q.img"; truncate -s $size "$dir/q.img"
        qemu-nbd -f raw -t -p "$qemu_port" -b 127.0.0.1 --cache=none --aio=io_uring "$dir/q.img" &
        q=$!; pids+=($q); wait_port "$qemu_port"
        fio_job qemu "nbd://127.0.0.1:$qemu_port" $job "$secs" "$dir/out/qemu.$job.$r.json"
        kill -TERM "$q"; wait "$q" 2>/dev/null || true
    done
done
python3 - "$dir/out" "$rounds" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def load(p):
    t = open(p).read()  # fio may print notes before its JSON
    return json.loads(t[t.index("{"):])
def w(name, job, r):
    j = load(f"{out}/{name}.{job}.{r}.json")["jobs"][0]["write"]
    return j["iops"], j["bw_bytes"] / 1e6
for job, unit in (("randwrite", "IOPS"), ("seqwrite", "MB/s")):
    rows = []
    for r in range(1, rounds + 1):
        t, q = w("tidemark", job, r), w("qemu", job, r)
        k = 0 if unit == "IOPS" else 1
        rows.append((t[k], q[k], t[k] / q[k]))
        print(f"{job} round {r}: tidemark {t[k]:.0f} {unit}, qemu-nbd {q[k]:.0f} {unit}, ratio {t[k]/q[k]:.2f}")
    print(f"{job} median: tidemark {statistics.median(x[0] for x in rows):.0f} {unit}, "
          f"qemu-nbd {statistics.median(x[1] for x in rows):.0f} {unit}, ratio {statistics.median(x[2] for x in rows):.2f}")
PY

echo "== agent RSS with the relay down: fio 64 KiB random writes, iodepth 16, ${rss_secs} s"
rm -rf "$src" "$rep" "$dir/conf/agent-state" "$dir/conf/target-state" "$dir/conf/spool"
truncate -s $size "$src"
start relay; relay=$last; wait_port "$relay_port"
start target; target=$last
start agent; agent=$last; wait_port "$nbd_port"
wait_caught_up
kill -9 "$relay"; wait "$relay" 2>/dev/null || true
fio_job rss "nbd://127.0.0.1:$nbd_port/disk0" rss "$rss_secs" "$dir/out/rss.json" &
fio_pid=$!
peak=0
while kill -0 $fio_pid 2>/dev/null; do
    hwm=$(awk '/VmHWM/ {print $2}' /proc/$agent/status)
    [ "$hwm" -gt "$peak" ] && peak=$hwm
    sleep 0.5
done
wait $fio_pid
budget=$(agent_field "s['groups'][0]['journal']['budget'] // 1048576")
mode=$(agent_field "s['groups'][0]['journal']['mode']['mode'] + ' (' + s['groups'][0]['journal']['mode']['reason'] + ')'")
trans=$(agent_field "s['groups'][0]['journal']['mode']['transitions']")
iops=$(python3 -c "import json; t=open('$dir/out/rss.json').read(); print(round(json.loads(t[t.index('{'):])['jobs'][0]['write']['iops']))")
echo "fio wrote at ${iops} IOPS (64 KiB) with the relay down; agent peak RSS $((peak / 1024)) MiB, capture budget ${budget} MiB (bar: ≤ budget + 128 MiB); mode at the end: $mode; transitions: $trans"
start relay; relay=$last; wait_port "$relay_port"
t0=$(date +%s.%N)
wait_caught_up
t1=$(date +%s.%N)
stop_pid "$agent"; stop_pid "$target"; stop_pid "$relay"
if cmp -s "$src" "$rep"; then same=yes; else same=NO; fi
echo "relay back: caught up in $(python3 -c "print(round($t1-$t0,1))") s, replica == source: $same"
[ "$same" = yes ]
