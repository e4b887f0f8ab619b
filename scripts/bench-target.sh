#!/usr/bin/env bash
# The target's bars, measured side by side in one run (examples/target_bench.rs
# says how the apply rate is measured without a network):
#   1. apply of 4 KiB random writes (WRITE_SIZE, default 256M, over a DISK_SIZE,
#      default 1G, replica filled with data first) to a raw replica, retention
#      off, vs fio io_uring randwrite 4k iodepth 32 --direct=1 of the same amount
#      over a file of the same size on the same file system (bar: >= 0.8x fio's
#      IOPS). The target runs with its default direct_io = "auto": this
#      replica, written in full, has no hole, so its 4 KiB writes go O_DIRECT;
#      the raw-fresh context case (sparse) goes through the page cache. For
#      context: fio buffered with --fdatasync=8192 (buffered writes, fdatasync
#      every 32 MiB batch, as the target does through the page cache).
#   2. the same workload on a VMDK monolithicSparse replica (bar: >= 0.6x the
#      raw apply rate), and on a VMDK replica with retention on, before-images
#      kept (bar: >= 0.45x the raw apply rate); for context, raw with retention.
#      Before each case the replica (or fio's file) is written back and its
#      own pages are dropped from the page cache (posix_fadvise DONTNEED on that
#      file only), so every case starts from the same cache state; the -warm
#      and -fresh context cases are described at `cases=` below.
#      Each apply case also records the disk operations during it (the
#      counters of the block device under BENCH_DIR, so anything else using
#      that device counts too), and fio-mixed (random 4 KiB reads
#      and writes at once, depth 32, direct) measures what the disk serves
#      when both share it: with retention, every before-image is such a read,
#      so the table ends with the ceiling those two figures put on vmdk-ret.
#   3. `tidemark target recover --point latest` of a RECOVER_SIZE (4G) raw
#      replica with data in half of its 64 KiB blocks, vs `qemu-img convert -f
#      raw -O raw` of the replica (bar: qemu time / recover time >= 0.7). Each
#      runs once untimed first, so both read from a warm page cache (nothing
#      drops caches here); outputs are removed between runs; both outputs are
#      compared with the replica once. recover fdatasyncs its output at the
#      end, qemu-img convert (default cache mode) does not.
#   4. peak RSS (VmHWM) of a process that only applies RSS_WRITE (512M) of 4 KiB
#      writes scattered over an RSS_SIZE (1T) sparse VMDK replica (bar: <= 256
#      MiB); retention off, and for context on.
# Cases 1-3 run in ROUNDS interleaved rounds (the order rotates every round);
# the table shows medians and the median of the per-round ratios.
# Usage: scripts/bench-target.sh [rounds]   (default 3)
# Needs fio, qemu-img, python3. BENCH_DIR (default /var/tmp) holds the files
# (about 2 GiB for 1-2, 8 GiB for 3); everything is removed at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
disk_size=${DISK_SIZE:-1G}
write_size=${WRITE_SIZE:-256M}
recover_size=${RECOVER_SIZE:-4G}
rss_size=${RSS_SIZE:-1T}
rss_write=${RSS_WRITE:-512M}
tdir=$(realpath -m "${CARGO_TARGET_DIR:-target}")
cargo build --release --quiet
cargo build --release --examples --quiet
bin=$tdir/release/tidemark
tb=$tdir/release/examples/target_bench
for t in fio qemu-img python3; do
    command -v "$t" >/dev/null || { echo "needs $t" >&2; exit 1; }
done
dir=$(mktemp -d "${BENCH_DIR:-/var/tmp}/tidemark-target-bench.XXXXXX")
cleanup() { rm -rf "$dir"; }
trap cleanup EXIT
res=$dir/results.jsonl
: > "$res"

bytes() { python3 -c "import sys; s=sys.argv[1]; m={'K':1<<10,'M':1<<20,'G':1<<30,'T':1<<40}; print(int(s[:-1])*m[s[-1].upper()] if s[-1].upper() in m else int(s))" "$1"; }
settle() { sync -f "$dir"; }
# Drop these files' pages from the page cache (only theirs: after settle, so
# nothing dirty is left), so each case starts from the same cache state.
evict() { python3 -c "import os,sys
for p in sys.argv[1:]:
    fd = os.open(p, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)" "$@"; }
now() { date +%s.%N; }
# The block device under BENCH_DIR (its /sys/class/block stat: read and write
# operations), or nothing when the file system is not on one (tmpfs, overlay).
dev_stat=/sys/class/block/$(basename "$(df --output=source "$dir" | tail -1)")/stat
[ -r "$dev_stat" ] || dev_stat=
disk_ops() { # -> "reads writes" so far (the whole device's), or nothing
    if [ -n "$dev_stat" ]; then awk '{print $1, $5}' "$dev_stat"; fi
}
record() { # case round json-from-stdin
    python3 -c "import json,sys; d=json.loads(sys.stdin.read().strip().splitlines()[-1]); d['case']=sys.argv[1]; d['round']=int(sys.argv[2]); print(json.dumps(d))" "$1" "$2" >> "$res"
}

machine="$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), kernel $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(df -T "$dir" | awk 'NR==2 {print $2}') on $(df "$dir" | awk 'NR==2 {print $1}'), fio $(fio --version), $(qemu-img --version | head -1)"
echo "== machine: $machine"
echo "== files in $dir"

# ---- 1 and 2: apply rate vs fio ---------------------------------------------
fio_file=$dir/fio.img
fio_common=(--name=r --ioengine=io_uring --rw=randwrite --bs=4k --iodepth=32
    --size="$disk_size" --io_size="$write_size" --filename="$fio_file"
    --runtime=120 --time_based=0 --output-format=json)
# fio lays its file out in full before writing: do it once, untimed.
fio --name=layout --filename="$fio_file" --size="$disk_size" --create_only=1 --output-format=json >/dev/null
settle

run_case() { # case round
    local c=$1 r=$2 d=$dir/case
    rm -rf "$d"
    case $c in
    fio-direct)
        evict "$fio_file"
        fio "${fio_common[@]}" --direct=1 > "$dir/fio.json"
        python3 -c "import json,sys; j=json.load(open(sys.argv[1]))['jobs'][0]; w=j['write']; print(json.dumps({'iops': w['total_ios']/(j['job_runtime']/1000), 'fio_iops': w['iops'], 'writes': w['total_ios'], 'secs': j['job_runtime']/1000}))" "$dir/fio.json" | record "$c" "$r"
        ;;
    fio-mixed)
        # Context: what the disk serves when random 4 KiB reads and writes
        # share it, as the before-image reads and the replica's writes do.
        evict "$fio_file"
        fio "${fio_common[@]}" --rw=randrw --direct=1 > "$dir/fio.json"
        python3 -c "import json,sys; j=json.load(open(sys.argv[1]))['jobs'][0]; n=j['read']['total_ios']+j['write']['total_ios']; print(json.dumps({'iops': n/(j['job_runtime']/1000), 'writes': n, 'secs': j['job_runtime']/1000}))" "$dir/fio.json" | record "$c" "$r"
        ;;
    fio-buffered)
        evict "$fio_file"
        fio "${fio_common[@]}" --direct=0 --fdatasync=8192 > "$dir/fio.json"
        python3 -c "import json,sys; j=json.load(open(sys.argv[1]))['jobs'][0]; w=j['write']; print(json.dumps({'iops': w['total_ios']/(j['job_runtime']/1000), 'fio_iops': w['iops'], 'writes': w['total_ios'], 'secs': j['job_runtime']/1000}))" "$dir/fio.json" | record "$c" "$r"
        ;;
    *)
        local args=(--dir "$d" --disk-size "$disk_size" --write-bytes "$write_size" --seed "$r")
        case $c in
        raw* | vmdk*) ;;
        *) echo "unknown case $c" >&2; exit 1 ;;
        esac
        case $c in
        raw*) args+=(--format raw) ;;
        vmdk*) args+=(--format vmdk) ;;
        esac
        case $c in *-ret*) args+=(--retention --granularity-ms 100) ;; esac
        case $c in *-fresh) ;; *) args+=(--fill) ;; esac
        "$tb" prepare "${args[@]}" > "$dir/prepare.json"
        settle
        case $c in *-warm) ;; *) evict "$d"/replica.* ;; esac
        local before after
        before=$(disk_ops)
        "$tb" apply --dir "$d" > "$dir/apply.json"
        after=$(disk_ops)
        python3 -c "import json,sys
d = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
if sys.argv[2] and sys.argv[3]:
    b, a = list(map(int, sys.argv[2].split())), list(map(int, sys.argv[3].split()))
    d['disk_reads'], d['disk_writes'] = a[0] - b[0], a[1] - b[1]
print(json.dumps(d))" "$dir/apply.json" "$before" "$after" | record "$c" "$r"
        rm -rf "$d"
        ;;
    esac
    settle
}

# Cases: raw, vmdk: a replica filled with data first, then evicted from the
# page cache (as fio's file, evicted before each fio run); -ret: retention on;
# -warm: the replica left in the page cache after the fill (context: sequential
# writes leave large folios there, which slow down 4 KiB buffered writes on
# ext4); -fresh: a new sparse replica, no fill (context: VMDK grains allocated
# by the workload).
cases=(fio-direct raw vmdk vmdk-ret fio-buffered raw-ret raw-warm vmdk-ret-warm raw-fresh vmdk-fresh fio-mixed)
for r in $(seq 1 "$rounds"); do
    n=${#cases[@]}
    order=()
    for i in $(seq 0 $((n - 1))); do order+=("${cases[$(((i + r - 1) % n))]}"); done
    echo "== round $r: ${order[*]}"
    for c in "${order[@]}"; do
        run_case "$c" "$r"
        python3 -c "import json,sys; d=json.loads(open(sys.argv[1]).read().splitlines()[-1]); print(f\"   {d['case']:<13} {d['iops']:>9.0f} IOPS  {d['secs']:6.2f} s\" + (f\"  verified={d['verified']} retention {d['retention_mib']:.0f} MiB, open {d['open_secs']:.2f} s (reader thread), RSS {d['peak_rss_mib']:.0f} MiB\" if 'verified' in d else ''))" "$res"
    done
done
rm -f "$fio_file"
settle

# ---- 3: recover vs qemu-img convert -----------------------------------------
echo "== recover: preparing a $recover_size raw replica"
rec=$dir/rec
"$tb" prepare-recover --dir "$rec" --disk-size "$recover_size" | tee "$dir/rec.json" | record prepare-recover 0
settle
tm_out=$dir/out-tidemark.img
q_out=$dir/out-qemu.img
run_tm() { "$bin" target recover --config "$rec/target.toml" --point latest --disk 0 --out "$tm_out" >/dev/null 2>"$dir/recover.err" || { cat "$dir/recover.err" >&2; exit 1; }; }
run_q() { qemu-img convert -f raw -O raw "$rec/replica.img" "$q_out"; }
echo "== recover: untimed warm-up of both, outputs compared with the replica"
run_tm
run_q
cmp "$tm_out" "$rec/replica.img" || { echo "tidemark's output differs from the replica" >&2; exit 1; }
cmp "$q_out" "$rec/replica.img" || { echo "qemu-img's output differs from the replica" >&2; exit 1; }
python3 -c "import json,os,sys; print(json.dumps({'tidemark_alloc_mib': os.stat(sys.argv[1]).st_blocks*512/1048576, 'qemu_alloc_mib': os.stat(sys.argv[2]).st_blocks*512/1048576}))" "$tm_out" "$q_out" | record recover-outputs 0
rm -f "$tm_out" "$q_out"
settle
for r in $(seq 1 "$rounds"); do
    order=(tidemark qemu)
    [ $((r % 2)) -eq 0 ] && order=(qemu tidemark)
    for c in "${order[@]}"; do
        t0=$(now)
        if [ "$c" = tidemark ]; then run_tm; else run_q; fi
        t1=$(now)
        settle
        t2=$(now)
        # secs: the command; durable_secs: until its output is on disk (with a
        # syncfs of BENCH_DIR's file system after it: context, as qemu-img
        # convert does not flush its output and recover does).
        echo "{\"secs\": $(python3 -c "print($t1 - $t0)"), \"durable_secs\": $(python3 -c "print($t2 - $t0)")}" | record "recover-$c" "$r"
        rm -f "$tm_out" "$q_out"
        settle
    done
    python3 -c "import json,sys; ds=[json.loads(l) for l in open(sys.argv[1])]; ds=[d for d in ds if d['round']==int(sys.argv[2]) and d['case'].startswith('recover-') and d['case']!='recover-outputs']; print('   round', sys.argv[2], ', '.join(f\"{d['case']} {d['secs']:.2f} s ({d['durable_secs']:.2f} s with sync)\" for d in ds))" "$res" "$r"
done
rm -rf "$rec"
settle

# ---- 4: RSS with a 1 TiB sparse VMDK replica ---------------------------------
for ret in off on; do
    echo "== RSS: $rss_write of 4 KiB writes over a $rss_size VMDK, retention $ret"
    args=(--dir "$dir/rss" --disk-size "$rss_size" --write-bytes "$rss_write" --format vmdk)
    [ "$ret" = on ] && args+=(--retention --granularity-ms 100)
    "$tb" prepare "${args[@]}" > "$dir/prepare.json"
    settle
    out=$("$tb" apply --dir "$dir/rss")
    echo "   $out"
    echo "$out" | record "rss-$ret" 0
    rm -rf "$dir/rss"
    settle
done

# ---- table --------------------------------------------------------------------
python3 - "$res" "$rounds" "$machine" <<'PY'
import json, statistics, sys
res, rounds, machine = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ds = [json.loads(l) for l in open(res)]
def get(case, r, k):
    for d in ds:
        if d['case'] == case and d['round'] == r:
            return d[k]
    return None
def med(case, k):
    v = [d[k] for d in ds if d['case'] == case]
    return statistics.median(v) if v else float('nan')
def ratio(num, den, k, invert=False):
    rs = []
    for r in range(1, rounds + 1):
        a, b = get(num, r, k), get(den, r, k)
        if a and b:
            rs.append(b / a if invert else a / b)
    return statistics.median(rs) if rs else float('nan'), rs
rows = []
def row(name, val, ref_name, ref, rat, rs, bar, ok):
    rows.append((name, val, ref_name, ref, f"{rat:.2f}", " ".join(f"{x:.2f}" for x in rs), bar, ok))
for case, ref, bar in [('raw', 'fio-direct', 0.8), ('vmdk', 'raw', 0.6), ('vmdk-ret', 'raw', 0.45)]:
    r, rs = ratio(case, ref, 'iops')
    row(f"apply {case} IOPS", f"{med(case, 'iops'):.0f}", ref, f"{med(ref, 'iops'):.0f}", r, rs, f">= {bar}", "PASS" if r >= bar else "FAIL")
for case, ref in [('raw', 'fio-buffered'), ('raw-ret', 'raw'), ('raw-warm', 'fio-direct'), ('vmdk-ret-warm', 'raw-warm'), ('raw-fresh', 'fio-direct'), ('vmdk-fresh', 'raw-fresh')]:
    r, rs = ratio(case, ref, 'iops')
    row(f"apply {case} IOPS", f"{med(case, 'iops'):.0f}", ref, f"{med(ref, 'iops'):.0f}", r, rs, "(context)", "")
r, rs = ratio('recover-tidemark', 'recover-qemu', 'secs', invert=True)
row("recover time s", f"{med('recover-tidemark', 'secs'):.2f}", "qemu-img convert s", f"{med('recover-qemu', 'secs'):.2f}", r, rs, ">= 0.7 (qemu/recover)", "PASS" if r >= 0.7 else "FAIL")
r, rs = ratio('recover-tidemark', 'recover-qemu', 'durable_secs', invert=True)
row("recover time s, until durable", f"{med('recover-tidemark', 'durable_secs'):.2f}", "qemu-img + sync s", f"{med('recover-qemu', 'durable_secs'):.2f}", r, rs, "(context)", "")
for ret in ('off', 'on'):
    v = get(f'rss-{ret}', 0, 'peak_rss_mib')
    if v is not None:
        size = get(f'rss-{ret}', 0, 'disk_size') / 2**30
        rows.append((f"peak RSS MiB, {size:g} GiB VMDK, retention {ret}", f"{v:.0f}", "limit MiB", "256", f"{v / 256:.2f}", "", "<= 1.0" if ret == 'off' else "(context)", ("PASS" if v <= 256 else "FAIL") if ret == 'off' else ""))
print()
print(f"machine: {machine}")
print(f"rounds: {rounds} (interleaved); ratio = median of the per-round ratios")
w = [max(len(str(r[i])) for r in rows + [("figure", "median", "reference", "ref median", "ratio", "per round", "bar", "")]) for i in range(8)]
hdr = ("figure", "median", "reference", "ref median", "ratio", "per round", "bar", "")
for r in [hdr] + rows:
    print("  ".join(str(x).ljust(w[i]) for i, x in enumerate(r)))
print()
for c in ('raw', 'vmdk', 'vmdk-ret', 'raw-ret', 'raw-warm', 'vmdk-ret-warm', 'raw-fresh', 'vmdk-fresh'):
    v = [d for d in ds if d['case'] == c]
    if v:
        print(f"{c}: verified {all(d['verified'] for d in v)}, open (decrypt+zstd, on the replay's reader thread, beside the apply thread) "
              f"{statistics.median(d['open_secs'] / d['secs'] for d in v) * 100:.0f} % of the apply time, "
              f"retention journal {statistics.median(d['retention_mib'] for d in v):.0f} MiB, peak RSS {max(d['peak_rss_mib'] for d in v):.0f} MiB")
# The disk's operations per apply case, and what they predict for retention:
# at the disk's mixed read+write rate (fio-mixed), how long vmdk-ret's
# operations take, against raw's measured time.
if any(d.get('disk_reads') is not None for d in ds):
    for c in ('raw', 'vmdk', 'vmdk-ret', 'raw-ret'):
        v = [d for d in ds if d['case'] == c and 'disk_reads' in d]
        if v:
            print(f"{c}: disk operations (median) {statistics.median(d['disk_reads'] for d in v):.0f} reads, {statistics.median(d['disk_writes'] for d in v):.0f} writes")
    mixed = med('fio-mixed', 'iops')
    ret = [d for d in ds if d['case'] == 'vmdk-ret' and 'disk_reads' in d]
    ops = statistics.median(d['disk_reads'] + d['disk_writes'] for d in ret) if ret else 0
    if ops > 0 and mixed > 0:
        t = ops / mixed
        print(f"disk's mixed random 4 KiB read+write rate (fio randrw, depth 32, direct): {mixed:.0f} IOPS; "
              f"vmdk-ret's {ops:.0f} operations at that rate take {t:.2f} s, raw apply took {med('raw', 'secs'):.2f} s: "
              f"a ceiling near {med('raw', 'secs') / t:.2f} for vmdk-ret / raw on this disk")
for d in ds:
    if d['case'] == 'recover-outputs':
        print(f"recover outputs allocated: tidemark {d['tidemark_alloc_mib']:.0f} MiB, qemu-img {d['qemu_alloc_mib']:.0f} MiB")
    if d['case'].startswith('rss-'):
        print(f"{d['case']}: {d['writes']} writes in {d['secs']:.1f} s ({d['iops']:.0f} IOPS), verified {d['verified']}, peak RSS {d['peak_rss_mib']:.0f} MiB")
PY
