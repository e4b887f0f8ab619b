#!/usr/bin/env bash
# Checksum resync's speed bars (issue 5), measured side by side in one run.
#
# Data, made once per run in BENCH_DIR (same disk as the repo by default, not
# tmpfs): source.img of SIZE (default 4G) in 1 MiB chunks, 30 % of them zeros
# (half left as holes, half written as zero blocks), the rest seeded
# incompressible data (AES-CTR keystream from openssl); replica-base.img = a
# `cp --sparse=always` copy of it with 5 % of its 64 KiB blocks (random
# positions over the whole image, so some land in the zero chunks) overwritten
# with other random data. The source blocks at those positions are extracted
# once and compressed with `zstd -1`: that is the "differing data compressed"
# of bar 3.
#
# Every round runs these cases (order rotated each round; page cache dropped
# before each timed step, `sync; echo 3 > /proc/sys/vm/drop_caches`):
#   resync    relay + target (replica = fresh copy of replica-base) + agent
#             (source.img, initial_copy = true, resync = "checksum"): wall time
#             from the agent's start until its status shows the copy done (data
#             mode, nothing pending, journal empty, a drain->data transition)
#             and the target's watermark reached the agent's next_seq - 1.
#             Bytes on the wire: the relay's bytes_in (frames) + the agent's
#             digest_reply_bytes + 80 bytes per digest request.
#   verify    right after resync, roles still running: `tidemark verify
#             --config agent.toml --disk 0 --json` wall time, as MB/s of the disk
#   dddense   `dd if=dense.img of=/dev/null bs=4M iflag=direct`, dense.img a
#             `cp --sparse=never` copy of the source made once per run (every
#             block allocated): the disk's sequential read rate, the bar's
#             reference
#   ddread    the same dd of source.img (context: its holes cost no disk
#             read, so it overstates the disk's rate by the share of holes;
#             ddboth: source and replica read at once, which is what verify
#             on one machine has to do)
#   fullcopy  as resync but resync = "copy": every block re-sent, no compare
#   initial   as resync but no replica file (initial replication, checksum)
#   zstd      zstd -1 -T0 < source.img | ssh root@127.0.0.1 'zstd -d > FILE'
#             (then, untimed for the bar, `sync -f FILE` as context)
#   rsync     rsync --inplace --no-whole-file -e ssh source.img
#             root@127.0.0.1:replica-rsync.img, replica-rsync.img a fresh copy
#             of replica-base
# Every case checks afterwards that its replica equals the source (cmp).
# CASES (default: all of "resync fullcopy initial zstd rsync verify dd") picks
# cases for a quicker run; verify and dd (ddread + ddboth) run inside the
# resync case (they need its running roles and equal pair), so either of them
# runs a resync too. Bars whose cases did not run show as "—".
# REPLICA_DIR (default: BENCH_DIR's temp dir, i.e. the source's disk) holds
# every replica written (tidemark's, rsync's, zstd|ssh's output): another
# device stands in for the target machine's own disk. /dev/shm (tmpfs, RAM) is
# such a stand-in on a one-disk machine; those figures are context for what
# the software does when the two sides do not share a disk, never the bars'
# main figures. With a REPLICA_DIR that refuses O_DIRECT (tmpfs), ddboth reads
# the replica through the page cache.
# ssh goes to a private sshd on 127.0.0.1 with its own host key and a client
# key made for this run. Bars: median over rounds of the per-round ratios.
#
# Usage: scripts/bench-resync.sh [rounds]   (default 3)
# Env: SIZE (4G), BENCH_DIR (/var/tmp), CASES, REPLICA_DIR (see above),
#      WAIT_LIMIT (s per wait, 1200),
#      TIDEMARK_BIN (use this binary instead of building one), ROLE_LOG (the
#      roles' RUST_LOG, default info), KEEP_LOGS (a directory the roles' logs
#      are copied to at the end; by default they go with BENCH_DIR's temp
#      dir), PIPELINE_NICE
#      (the agent's pipeline_nice, default 0: as in `tidemark bench`, every
#      stage at the same priority as rsync/zstd/ssh, since there is no
#      workload to yield to; the shipped default 10 lets any other load on a
#      shared machine take the CPU from the copy first).
# Binary: with TIDEMARK_BIN unset, if src/ and Cargo.* have no uncommitted
# changes, `cargo build --release` in the repo when target/release/tidemark is
# missing or older than the sources; otherwise (someone is editing the tree)
# the committed HEAD is exported with `git archive` to
# /var/tmp/tidemark-bench-build/src-<commit> and built there with its own
# CARGO_TARGET_DIR, so the figures belong to a known commit. That build cache
# is kept; BENCH_DIR's temp dir is removed at exit.
# Needs root (drop_caches, sshd), python3, openssl, zstd, rsync, openssh-server
# (apt-get installs the missing ones).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
rounds=${1:-3}
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "rounds must be a positive integer" >&2; exit 1; }
wait_limit=${WAIT_LIMIT:-1200}
pipeline_nice=${PIPELINE_NICE:-0}
[[ $pipeline_nice =~ ^[0-9]+$ ]] && (( pipeline_nice <= 19 )) || { echo "PIPELINE_NICE must be 0..19" >&2; exit 1; }
commit=$(git -C "$repo" rev-parse --short HEAD)
all_cases="resync fullcopy initial zstd rsync verify dd"
want_cases=" ${CASES:-$all_cases} "
for c in $want_cases; do
    [[ " $all_cases " == *" $c "* ]] || { echo "CASES: unknown case '$c' (known: $all_cases)" >&2; exit 1; }
done
want() { [[ $want_cases == *" $1 "* ]]; }

# ---- tools -------------------------------------------------------------------
need=()
command -v zstd >/dev/null || need+=(zstd)
command -v rsync >/dev/null || need+=(rsync)
command -v ssh >/dev/null || need+=(openssh-client)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v openssl >/dev/null || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
    echo "== apt-get install ${need[*]}"
    apt-get install -y --no-install-recommends "${need[@]}" >/dev/null ||
        { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${need[@]}" >/dev/null; }
fi
command -v python3 >/dev/null || { echo "needs python3" >&2; exit 1; }
[ -w /proc/sys/vm/drop_caches ] || { echo "needs root (drop_caches)" >&2; exit 1; }

# ---- the binary ----------------------------------------------------------------
build_note=
if [ -n "${TIDEMARK_BIN:-}" ]; then
    bin=$(realpath "$TIDEMARK_BIN")
    build_note="given binary $bin (TIDEMARK_BIN)"
elif [ -z "$(git -C "$repo" status --porcelain -- src Cargo.toml Cargo.lock build.rs)" ]; then
    bin=$repo/target/release/tidemark
    if [ ! -x "$bin" ] || [ -n "$(find src Cargo.toml Cargo.lock -newer "$bin" -print -quit)" ]; then
        echo "== cargo build --release (in $repo)"
        cargo build --release --quiet --bin tidemark
    fi
    build_note="$repo/target/release/tidemark, clean tree at $commit"
else
    bdir=/var/tmp/tidemark-bench-build
    full=$(git -C "$repo" rev-parse HEAD)
    srcdir=$bdir/src-$commit
    if [ ! -f "$srcdir/.complete" ]; then
        rm -rf "$srcdir"
        mkdir -p "$srcdir"
        git -C "$repo" archive "$full" | tar -x -C "$srcdir"
        touch "$srcdir/.complete"
    fi
    echo "== the tree has uncommitted changes: building commit $commit from git archive in $srcdir"
    (cd "$srcdir" && CARGO_TARGET_DIR=$bdir/target cargo build --release --quiet --bin tidemark)
    bin=$bdir/target/release/tidemark
    build_note="commit $commit exported by git archive, built in $srcdir (the working tree had uncommitted changes)"
fi
[ -x "$bin" ] || { echo "no binary at $bin" >&2; exit 1; }

# ---- scratch dir, cleanup ------------------------------------------------------
dir=$(mktemp -d "${BENCH_DIR:-/var/tmp}/tidemark-resync-bench.XXXXXX")
pidfile=$dir/pids          # every background process this script starts
: > "$pidfile"
sshd_pid=
rdir=$dir                  # replicas
if [ -n "${REPLICA_DIR:-}" ]; then
    rdir=$(mktemp -d "$REPLICA_DIR/tidemark-resync-replica.XXXXXX")
fi
kill_listed() { # TERM every PID in $pidfile still alive, wait (bounded), then KILL
    local p i alive
    [ -f "$pidfile" ] || return 0
    for p in $(cat "$pidfile"); do kill -TERM "$p" 2>/dev/null || true; done
    for i in $(seq 1 300); do
        alive=0
        for p in $(cat "$pidfile"); do kill -0 "$p" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && break
        sleep 0.2
    done
    for p in $(cat "$pidfile"); do kill -KILL "$p" 2>/dev/null || true; done
}
cleanup() {
    kill_listed
    if [ -n "$sshd_pid" ]; then kill -TERM "$sshd_pid" 2>/dev/null || true; fi
    wait 2>/dev/null || true
    if [ -n "${KEEP_LOGS:-}" ]; then
        mkdir -p "$KEEP_LOGS" && cp "$dir"/*.log "$KEEP_LOGS"/ 2>/dev/null || true
    fi
    rm -rf "$dir" "$rdir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
res=$dir/results.jsonl
: > "$res"
bytes() { python3 -c "import sys; s=sys.argv[1]; m={'K':1<<10,'M':1<<20,'G':1<<30,'T':1<<40}; print(int(s[:-1])*m[s[-1].upper()] if s[-1].upper() in m else int(s))" "$1"; }
size=$(bytes "${SIZE:-4G}")
(( size % (1 << 20) == 0 && size >= (64 << 20) )) || { echo "SIZE must be a multiple of 1 MiB, at least 64M" >&2; exit 1; }
now() { date +%s.%N; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
load() { cut -d' ' -f1 /proc/loadavg; }
record() { # case round json (merged with case, round)
    python3 -c "import json,sys; d=json.loads(sys.argv[3]); d['case']=sys.argv[1]; d['round']=int(sys.argv[2]); print(json.dumps(d))" "$1" "$2" "$3" >> "$res"
}
same() { cmp -s "$1" "$2" && echo true || echo false; }

machine="$(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GiB RAM ($(free -g | awk '/^Mem:/ {print $7}') GiB available at start), kernel $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
fsdev=$(df "$dir" | awk 'NR==2 {print $1}')
disk="$(df -T "$dir" | awk 'NR==2 {print $2}') on $fsdev ($(lsblk -dno NAME,SIZE,ROTA,MODEL "$fsdev" 2>/dev/null | xargs || echo '?'))"
rfsdev=$(df "$rdir" | awk 'NR==2 {print $1}')
if [ "$rdir" = "$dir" ]; then
    rdisk="same directory as the source"
else
    rdisk="$rdir: $(df -T "$rdir" | awk 'NR==2 {print $2}') on $rfsdev"
fi
# dd flags for reading a replica: O_DIRECT unless its file system refuses it.
rdd=iflag=direct
echo x > "$rdir/.ddprobe"
dd if="$rdir/.ddprobe" of=/dev/null bs=4096 count=1 iflag=direct status=none 2>/dev/null || rdd=
rm -f "$rdir/.ddprobe"
echo "== machine: $machine"
echo "== disk: $disk, files in $dir; replicas: $rdisk${rdd:+ (O_DIRECT)}; cases: $want_cases"
echo "== binary: $build_note; agent pipeline_nice = $pipeline_nice"
echo "== tools: $(zstd --version | head -1); $(rsync --version | head -1); $(ssh -V 2>&1)"

# ---- helpers in python -----------------------------------------------------------
cat > "$dir/gen_source.py" <<'EOF'
# source.img: 1 MiB chunks, 30 % zeros (every other one of them a hole, the
# others written zeros), the rest read from stdin (the keystream).
import os, random, sys
path, size = sys.argv[1], int(sys.argv[2])
MIB = 1 << 20
n = size // MIB
zero = set(random.Random(1).sample(range(n), n * 3 // 10))
zblock = bytes(MIB)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.ftruncate(fd, size)
holes = written_zero = 0
for i in range(n):
    if i in zero:
        if (holes + written_zero) % 2 == 0:
            holes += 1
        else:
            os.pwrite(fd, zblock, i * MIB)
            written_zero += 1
        continue
    buf = sys.stdin.buffer.read(MIB)
    assert len(buf) == MIB, "keystream ended early"
    os.pwrite(fd, buf, i * MIB)
os.fsync(fd)
os.close(fd)
print(f"chunks {n}: {n - len(zero)} data, {holes} holes, {written_zero} written zeros")
EOF
cat > "$dir/damage.py" <<'EOF'
# Overwrite 5 % of the replica's 64 KiB blocks (random positions) with data
# from stdin; write the source's blocks at those positions to diff_out.
import json, os, sys
import random
src, rep, diff_out, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
B = 64 << 10
n = size // B
k = n * 5 // 100
blocks = sorted(random.Random(2).sample(range(n), k))
fs = os.open(src, os.O_RDONLY)
fr = os.open(rep, os.O_WRONLY)
fo = os.open(diff_out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
zero_src = 0
for b in blocks:
    junk = sys.stdin.buffer.read(B)
    assert len(junk) == B, "keystream ended early"
    os.pwrite(fr, junk, b * B)
    s = os.pread(fs, B, b * B)
    if s.count(0) == B:
        zero_src += 1
    os.write(fo, s)
os.fsync(fr)
for f in (fs, fr, fo):
    os.close(f)
print(json.dumps({"damaged_blocks": k, "damaged_bytes": k * B, "damaged_in_zero_source": zero_src}))
EOF
cat > "$dir/wait_done.py" <<'EOF'
# Poll the statuses until the agent's copy is done and applied; print a JSON
# line of timings and counters; exit 1 on timeout, 2 if a role failed.
import json, os, sys, time
agent_st, target_st, relay_st = sys.argv[1:4]
t0, pid, limit = float(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
tpid, rpid = int(sys.argv[7]), int(sys.argv[8])
def rd(p):
    try:
        with open(p) as f:
            return json.load(f)
    except Exception:
        return None
def alive(p):
    try:
        with open(f"/proc/{p}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
def fail(code, why):
    a, t = rd(agent_st), rd(target_st)
    summary = {}
    if a and a.get("groups"):
        g = a["groups"][0]
        summary["agent"] = {"mode": g["journal"]["mode"]["mode"], "reason": g["journal"]["mode"]["reason"],
                            "pending": g["journal"]["pending_bytes"], "entries": g["journal"]["entries"],
                            "next_seq": g["journal"]["next_seq"], "resync": g["resync"], "last_error": g["last_error"]}
    if t and t.get("groups"):
        g = t["groups"][0]
        summary["target"] = {"watermark": g["watermark"], "stalled": g["stalled"], "gap": g["gap"], "connected": g["connected"]}
    print(json.dumps({"ok": False, "why": why, "status": summary}))
    sys.exit(code)
while True:
    now = time.time()
    if not alive(pid):
        fail(2, "agent exited")
    if not alive(tpid):
        fail(2, "target exited")
    a = rd(agent_st)
    if a and a.get("pid") == pid and a.get("groups"):
        g = a["groups"][0]
        j = g["journal"]
        if (j["mode"]["mode"] == "data" and j["pending_bytes"] == 0 and j["entries"] == 0
                and j["mode"]["transitions"].get("drain->data", 0) >= 1):
            seq = j["next_seq"] - 1
            t = rd(target_st)
            if t and t.get("groups"):
                tg = t["groups"][0]
                if tg.get("stalled"):
                    fail(2, f"target stalled: {tg['stalled']}")
                if tg["watermark"]["last_seq"] >= seq:
                    wall = now - t0
                    break
    if now - t0 > limit:
        fail(1, f"not done within {limit} s")
    time.sleep(0.05)
# Counters are written every 100 ms: read them once more after that.
time.sleep(0.6)
a, t, r = rd(agent_st), rd(target_st), rd(relay_st)
g = a["groups"][0]
hist = g["journal"]["mode"]["history"]
drain = [h for h in hist if h["to"] == "drain"]
back = [h for h in hist if h["from"] == "drain" and h["to"] == "data"]
drain_s = (back[-1]["at_us"] - drain[0]["at_us"]) / 1e6 if drain and back else None
rs = g["resync"]
tg = t["groups"][0]
rg = r["groups"][0]["counters"] if r and r.get("groups") else {}
out = {"ok": True, "wall_s": round(wall, 3), "agent_drain_s": drain_s,
       "start_to_drain_s": round(drain[0]["at_us"] / 1e6 - t0, 3) if drain else None,
       "resync_mode": rs["mode"], "compared_bytes": rs["compared_bytes"], "differing_bytes": rs["differing_bytes"],
       "copied_bytes": rs["copied_bytes"], "digest_requests": rs["digest_requests"],
       "digest_failures": rs["digest_failures"], "digest_reply_bytes": rs["digest_reply_bytes"],
       "plain_bytes": g["plain_bytes"], "stored_bytes": g["stored_bytes"],
       "relay_bytes_in": rg.get("bytes_in"), "relay_frames_in": rg.get("frames_in"),
       "target_bytes_applied": tg["bytes_applied"], "target_zero_bytes": tg["zero_bytes"],
       "watermark": tg["watermark"]["last_seq"]}
# Wire: frames into the relay + digest replies + digest requests (80 bytes each:
# 32 header + 32 body + 16 tag).
out["wire_bytes"] = (out["relay_bytes_in"] or 0) + rs["digest_reply_bytes"] + 80 * rs["digest_requests"]
# CPU seconds (user + system) of each role since its start.
def cpu(p):
    try:
        with open(f"/proc/{p}/stat") as f:
            v = f.read().rsplit(")", 1)[1].split()
        return round((int(v[11]) + int(v[12])) / os.sysconf("SC_CLK_TCK"), 2)
    except OSError:
        return None
out["cpu_agent_s"], out["cpu_target_s"], out["cpu_relay_s"] = cpu(pid), cpu(tpid), cpu(rpid)
print(json.dumps(out))
EOF

# ---- sshd on loopback -------------------------------------------------------------
sdir=$dir/ssh
mkdir -p "$sdir" /run/sshd
ssh-keygen -q -t ed25519 -N '' -f "$sdir/hostkey"
ssh-keygen -q -t ed25519 -N '' -f "$sdir/clientkey"
cp "$sdir/clientkey.pub" "$sdir/authorized_keys"
ssh_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$sdir/sshd_config" <<EOF
Port $ssh_port
ListenAddress 127.0.0.1
HostKey $sdir/hostkey
PidFile $sdir/sshd.pid
AuthorizedKeysFile $sdir/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
EOF
/usr/sbin/sshd -t -f "$sdir/sshd_config"
/usr/sbin/sshd -D -e -f "$sdir/sshd_config" 2> "$sdir/sshd.log" &
sshd_pid=$!
ssh_cmd="ssh -p $ssh_port -i $sdir/clientkey -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR"
for i in $(seq 1 50); do
    $ssh_cmd root@127.0.0.1 true 2>/dev/null && break
    [ "$i" = 50 ] && { echo "sshd on 127.0.0.1:$ssh_port does not answer" >&2; cat "$sdir/sshd.log" >&2; exit 1; }
    sleep 0.2
done
echo "== sshd on 127.0.0.1:$ssh_port (pid $sshd_pid); ssh cipher: $(${ssh_cmd% -o LogLevel=ERROR} -v root@127.0.0.1 true 2>&1 | sed -n 's/.*kex: server->client cipher: \([^ ]*\).*/\1/p' | head -1)"

# ---- data, once per run ----------------------------------------------------------
src=$dir/source.img
base=$dir/replica-base.img
nchunks=$((size >> 20))
ndata=$((nchunks - nchunks * 3 / 10))
t=$(now)
head -c $((ndata << 20)) /dev/zero |
    openssl enc -aes-128-ctr -nosalt -K 000102030405060708090a0b0c0d0e0f -iv 00000000000000000000000000000000 |
    python3 "$dir/gen_source.py" "$src" "$size"
cp --sparse=always "$src" "$base"
ndamage=$(( (size / 65536) * 5 / 100 ))
dmg=$(head -c $((ndamage * 65536)) /dev/zero |
    openssl enc -aes-128-ctr -nosalt -K f0e0d0c0b0a090807060504030201000 -iv 00000000000000000000000000000000 |
    python3 "$dir/damage.py" "$src" "$base" "$dir/diff-blocks.bin" "$size")
diff_zstd=$(zstd -1 -q -c "$dir/diff-blocks.bin" | wc -c)
rm -f "$dir/diff-blocks.bin"
src_zstd=$(zstd -1 -T0 -q -c "$src" | wc -c)
dense=$dir/dense.img
if want dd; then
    cp --sparse=never "$src" "$dense"
    sync -f "$dense"
fi
src_alloc=$(( $(stat -c %b "$src") * 512 ))
base_alloc=$(( $(stat -c %b "$base") * 512 ))
echo "== data made in $(python3 -c "print(round($(now) - $t, 1))") s: source $size bytes ($src_alloc allocated, zstd -1 $src_zstd), replica-base $base_alloc allocated; damage $dmg; differing source blocks zstd -1: $diff_zstd bytes"
record data 0 "{\"size\": $size, \"source_allocated\": $src_alloc, \"source_zstd1\": $src_zstd, \"replica_base_allocated\": $base_alloc, \"diff_zstd1\": $diff_zstd, \"damage\": $dmg}"

# ---- tidemark roles ----------------------------------------------------------------
# cluster: a fresh `tidemark init` in $dir/tm, replica path $2 (copied from $3
# unless $3 is "none"), resync mode $1.
roles_pids=()
start_role() { # role case: start it, PID in $last
    RUST_LOG=${ROLE_LOG:-info} "$bin" "$1" --config "$dir/tm/conf/$1.toml" > /dev/null 2>> "$dir/$2-$1.log" &
    last=$!
    echo "$last" >> "$pidfile"
    roles_pids=("$last" "${roles_pids[@]}")
}
stop_roles() { # agent first, then target, then relay; each TERM, 60 s, KILL
    local p i
    for p in "${roles_pids[@]}"; do
        kill -TERM "$p" 2>/dev/null || continue
        for i in $(seq 1 300); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$p" 2>/dev/null; then
            echo "   pid $p did not stop within 60 s of SIGTERM: SIGKILL" >&2
            kill -KILL "$p" 2>/dev/null || true
        fi
        wait "$p" 2>/dev/null || true
        sed -i "/^$p\$/d" "$pidfile"
    done
    roles_pids=()
}
log_tails() { # case
    local f
    for f in "$dir/$1"-*.log; do
        [ -f "$f" ] || continue
        echo "--- $(basename "$f") (last 30 lines)"
        tail -n 30 "$f" | sed 's/\x1b\[[0-9;]*m//g'
    done
}
cluster_up() { # case mode replica
    local c=$1 mode=$2 rep=$3 conf=$dir/tm/conf i addr
    rm -rf "$dir/tm" "$dir/$c"-*.log
    mkdir -p "$dir/tm"
    "$bin" init --dir "$conf" --relay-listen 127.0.0.1:7400 > /dev/null
    sed -i '/^status_listen/d' "$conf/relay.toml" "$conf/target.toml" "$conf/agent.toml"
    sed -i 's|^listen = .*|listen = "127.0.0.1:0"|' "$conf/relay.toml"
    sed -i "s|^path = .*|path = \"$rep\"|" "$conf/target.toml"
    sed -i "s|^path = .*|path = \"$src\"|; s|^resync = .*|resync = \"$mode\"|; s|^initial_copy = .*|initial_copy = true|; s|^pipeline_nice = .*|pipeline_nice = $pipeline_nice|" "$conf/agent.toml"
    grep -q "^resync = \"$mode\"" "$conf/agent.toml" && grep -q "^initial_copy = true" "$conf/agent.toml" &&
        grep -q "^pipeline_nice = $pipeline_nice\$" "$conf/agent.toml" ||
        { echo "agent.toml was not written as expected" >&2; cat "$conf/agent.toml" >&2; return 1; }
    start_role relay "$c"
    rpid=$last
    addr=
    for i in $(seq 1 300); do
        addr=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['listen'])" "$conf/spool/status.json" 2>/dev/null || true)
        [ -n "$addr" ] && break
        sleep 0.1
    done
    [ -n "$addr" ] || { echo "relay did not report its address" >&2; log_tails "$c" >&2; return 1; }
    sed -i "s|^relay = .*|relay = \"$addr\"|; s|^relay_name = .*|relay_name = \"127.0.0.1\"|" "$conf/target.toml" "$conf/agent.toml"
    start_role target "$c"
    tpid=$last
    for i in $(seq 1 600); do
        python3 -c "import json,sys; s=json.load(open(sys.argv[1])); sys.exit(0 if s['groups'][0]['connected'] else 1)" "$conf/target-state/status.json" 2>/dev/null && return 0
        kill -0 "$tpid" 2>/dev/null || { echo "target exited" >&2; log_tails "$c" >&2; return 1; }
        sleep 0.1
    done
    echo "target did not connect to the relay within 60 s" >&2
    log_tails "$c" >&2
    return 1
}
tm_copy() { # case round mode replica-source(none|path): the timed copy; leaves roles running
    local c=$1 r=$2 mode=$3 from=$4 rep=$rdir/tm-replica.img conf=$dir/tm/conf out t0 st
    rm -f "$rep"
    [ "$from" != none ] && cp --sparse=always "$from" "$rep"
    cluster_up "$c" "$mode" "$rep"
    drop_caches
    local l; l=$(load)
    t0=$(now)
    start_role agent "$c"
    apid=$last
    st=0
    out=$(python3 "$dir/wait_done.py" "$conf/agent-state/status.json" "$conf/target-state/status.json" \
        "$conf/spool/status.json" "$t0" "$last" "$wait_limit" "$tpid" "$rpid") || st=$?
    if [ $st != 0 ]; then
        echo "!! $c round $r: tidemark did not finish: $out" >&2
        log_tails "$c" >&2
        record "$c" "$r" "$out"
        return 1
    fi
    python3 -c "import json,sys; d=json.loads(sys.argv[1]); d['load']=float(sys.argv[2]); print(json.dumps(d))" "$out" "$l" > "$dir/last.json"
}
tm_finish() { # case round: stop roles, compare, record
    local c=$1 r=$2 eq
    stop_roles
    eq=$(same "$src" "$rdir/tm-replica.img")
    [ "$eq" = true ] || { echo "!! $c round $r: replica differs from source" >&2; log_tails "$c" >&2; }
    record "$c" "$r" "$(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); d['equal']=sys.argv[2]=='true'; print(json.dumps(d))" "$dir/last.json" "$eq")"
    rm -rf "$dir/tm" "$rdir/tm-replica.img"
}
show() { # case round: one line from the last record
    python3 -c "import json,sys; d=[json.loads(l) for l in open(sys.argv[1])][-1]; print('   %-8s round %s: %s' % (d['case'], d['round'], ', '.join('%s=%s' % (k, v) for k, v in d.items() if k not in ('case', 'round', 'status'))))" "$res"
}

# ---- the cases ---------------------------------------------------------------------
case_resync() { # round: resync, then verify and the read rates with the roles up
    local r=$1
    tm_copy resync "$r" checksum "$base"
    want verify && case_verify "$r"
    want dd && case_dd "$r"
    tm_finish resync "$r"
    show
}
cpu_of() { # pid: CPU seconds (user + system) so far
    python3 -c "import os,sys; v=open(f'/proc/{sys.argv[1]}/stat').read().rsplit(')',1)[1].split(); print((int(v[11])+int(v[12]))/os.sysconf('SC_CLK_TCK'))" "$1" 2>/dev/null || echo null
}
case_verify() { # round: verify, roles running, pair equal
    local r=$1 t0 t1 out vst l ca cb ta tb
    drop_caches
    l=$(load)
    ca=$(cpu_of "$apid")
    ta=$(cpu_of "$tpid")
    t0=$(now)
    vst=0
    out=$(timeout "$wait_limit" "$bin" verify --config "$dir/tm/conf/agent.toml" --disk 0 --json 2> "$dir/verify.err") || vst=$?
    t1=$(now)
    cb=$(cpu_of "$apid")
    tb=$(cpu_of "$tpid")
    record verify "$r" "$(python3 -c "
import json,sys
t0,t1,size,st,l=float(sys.argv[2]),float(sys.argv[3]),int(sys.argv[4]),int(sys.argv[5]),float(sys.argv[6])
try: v=json.loads(sys.argv[1])
except Exception: v={}
w=t1-t0
def d(a, b):
    return None if 'null' in (a, b) else round(float(b) - float(a), 2)
print(json.dumps({'ok': st==0, 'exit': st, 'wall_s': round(w,3), 'mb_s': round(size/w/1e6,1), 'compared_bytes': v.get('compared_bytes'), 'mismatch_ranges': v.get('mismatch_ranges'), 'load': l, 'cpu_agent_s': d(sys.argv[7], sys.argv[8]), 'cpu_target_s': d(sys.argv[9], sys.argv[10])}))" "$out" "$t0" "$t1" "$size" "$vst" "$l" "$ca" "$cb" "$ta" "$tb")"
    show
    [ $vst = 0 ] || { echo "!! verify exit $vst: $out $(cat "$dir/verify.err")" >&2; log_tails resync >&2; }
}
dd_rate() { # case round file: one direct sequential read of file, as MB/s of SIZE
    local t0 t1 l
    drop_caches
    l=$(load)
    t0=$(now)
    timeout "$wait_limit" dd if="$3" of=/dev/null bs=4M iflag=direct status=none
    t1=$(now)
    record "$1" "$2" "$(python3 -c "import json,sys; w=float(sys.argv[2])-float(sys.argv[1]); print(json.dumps({'ok': True, 'wall_s': round(w,3), 'mb_s': round(int(sys.argv[3])/w/1e6,1), 'load': float(sys.argv[4])}))" "$t0" "$t1" "$size" "$l")"
    show
}
case_dd() { # round: the disk's sequential read rate, same run, roles idle
    local r=$1 t0 t1
    dd_rate dddense "$r" "$dense"
    dd_rate ddread "$r" "$src"
    drop_caches
    t0=$(now)
    timeout "$wait_limit" dd if="$src" of=/dev/null bs=4M iflag=direct status=none &
    local d1=$!
    echo "$d1" >> "$pidfile"
    timeout "$wait_limit" dd if="$rdir/tm-replica.img" of=/dev/null bs=4M $rdd status=none
    wait "$d1"
    sed -i "/^$d1\$/d" "$pidfile"
    t1=$(now)
    record ddboth "$r" "$(python3 -c "import json,sys; w=float(sys.argv[2])-float(sys.argv[1]); print(json.dumps({'ok': True, 'wall_s': round(w,3), 'mb_s_per_file': round(int(sys.argv[3])/w/1e6,1)}))" "$t0" "$t1" "$size")"
    show
}
case_fullcopy() {
    tm_copy fullcopy "$1" copy "$base"
    tm_finish fullcopy "$1"
    show
}
case_initial() {
    tm_copy initial "$1" checksum none
    tm_finish initial "$1"
    show
}
case_zstd() {
    local r=$1 out=$rdir/replica-zstd.img t0 t1 t2 l
    rm -f "$out"
    drop_caches
    l=$(load)
    t0=$(now)
    zstd -1 -T0 -q -c < "$src" | timeout "$wait_limit" $ssh_cmd root@127.0.0.1 "zstd -d -q -c > '$out'"
    t1=$(now)
    sync -f "$out"
    t2=$(now)
    record zstd "$r" "$(python3 -c "import json,sys; a,b,c=map(float,sys.argv[1:4]); print(json.dumps({'ok': True, 'wall_s': round(b-a,3), 'sync_s': round(c-b,3), 'load': float(sys.argv[5]), 'equal': sys.argv[4]=='true'}))" "$t0" "$t1" "$t2" "$(same "$src" "$out")" "$l")"
    rm -f "$out"
    show
}
case_rsync() {
    local r=$1 out=$rdir/replica-rsync.img t0 t1 t2 l stats
    rm -f "$out"
    cp --sparse=always "$base" "$out"
    drop_caches
    l=$(load)
    t0=$(now)
    stats=$(timeout "$wait_limit" rsync --inplace --no-whole-file --stats -e "$ssh_cmd" "$src" "root@127.0.0.1:$out")
    t1=$(now)
    sync -f "$out"
    t2=$(now)
    record rsync "$r" "$(python3 -c "
import json,re,sys
a,b,c=map(float,sys.argv[1:4]); s=sys.argv[5]
def n(k):
    m=re.search(k+r': ([0-9,]+)', s); return int(m.group(1).replace(',','')) if m else None
print(json.dumps({'ok': True, 'wall_s': round(b-a,3), 'sync_s': round(c-b,3), 'load': float(sys.argv[6]), 'equal': sys.argv[4]=='true', 'sent': n('Total bytes sent'), 'received': n('Total bytes received'), 'literal': n('Literal data'), 'matched': n('Matched data')}))" "$t0" "$t1" "$t2" "$(same "$src" "$out")" "$stats" "$l")"
    rm -f "$out"
    show
}

cases=()
for c in resync fullcopy initial zstd rsync; do
    if want "$c" || { [ "$c" = resync ] && { want verify || want dd; }; }; then
        cases+=("$c")
    fi
done
for ((r = 1; r <= rounds; r++)); do
    echo "== round $r/$rounds ($(date -u +%H:%M:%S) UTC)"
    for ((k = 0; k < ${#cases[@]}; k++)); do
        c=${cases[$(( (k + r - 1) % ${#cases[@]} ))]}
        # Each case in a subshell with errexit on: a failure is recorded, the
        # roles it started are stopped, and the run goes on.
        set +e
        ( set -e; trap stop_roles EXIT; "case_$c" "$r" )
        st=$?
        set -e
        [ $st = 0 ] || echo "!! case $c round $r failed (exit $st)" >&2
        rm -rf "$dir/tm" "$rdir/tm-replica.img" "$rdir/replica-zstd.img" "$rdir/replica-rsync.img"
    done
done

# ---- report ------------------------------------------------------------------------
python3 - "$res" "$rounds" "$commit" "$machine" "$disk" "$build_note" "$pipeline_nice" "$want_cases" "${CASES:-}" "${REPLICA_DIR:-}" "$rdisk" <<'EOF'
import json, statistics, sys
res, rounds, commit, machine, disk, build, nice, want, cases_env, repdir_env, rdisk = sys.argv[1], int(sys.argv[2]), *sys.argv[3:]
want = want.split()
rows = [json.loads(l) for l in open(res)]
data = next(r for r in rows if r["case"] == "data")
by = {}
for r in rows:
    if r["case"] != "data":
        by.setdefault(r["case"], {})[r["round"]] = r
def ok(c, i):
    r = by.get(c, {}).get(i)
    return r if r and r.get("ok") and r.get("equal", True) else None
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
def f(x, d=2):
    return "—" if x is None else f"{x:.{d}f}"
def mib(x):
    return "—" if x is None else f"{x / 2**20:.1f}"
R = range(1, rounds + 1)
print(f"\n## Resync (issue 5)\n")
env = ('' if nice == '0' else f'PIPELINE_NICE={nice} ') + (f'CASES="{cases_env}" ' if cases_env else '') + (f'REPLICA_DIR={repdir_env} ' if repdir_env else '')
print(f"Command: `{env}scripts/bench-resync.sh {rounds}` (agent pipeline_nice = {nice}); commit `{commit}` ({build}).")
print(f"Machine: {machine}; {disk}; replicas: {rdisk}.\n")
if repdir_env:
    print("Context run: the replicas are not on the source's disk, so these are not the bars' main figures.\n")
print(f"Data: {data['size'] / 2**30:g} GiB source, {data['source_allocated'] / 2**20:.0f} MiB allocated "
      f"(30 % of the 1 MiB chunks zeros: half holes, half written zeros; the rest AES-CTR keystream, "
      f"zstd -1 of the whole source {data['source_zstd1'] / 2**20:.0f} MiB); replica = copy with "
      f"{data['damage']['damaged_blocks']} of its 64 KiB blocks (5 %, {data['damage']['damaged_bytes'] / 2**20:.1f} MiB) "
      f"overwritten with other random data, {data['damage']['damaged_in_zero_source']} of them where the source is zeros; "
      f"the source's differing blocks compress to {data['diff_zstd1'] / 2**20:.1f} MiB with zstd -1.\n")
cols = [("resync", "wall_s"), ("fullcopy", "wall_s"), ("initial", "wall_s"), ("zstd", "wall_s"), ("rsync", "wall_s"),
        ("verify", "wall_s"), ("verify", "mb_s"), ("dddense", "mb_s"), ("ddread", "mb_s"), ("ddboth", "mb_s_per_file")]
names = ["resync s", "full copy s", "initial s", "zstd\\|ssh s", "rsync s", "verify s", "verify MB/s", "dd dense MB/s", "dd source MB/s", "dd both MB/s each"]
print("Raw figures per round (wall seconds from start to done; a failed or unequal run shows as fail):\n")
print("| round | " + " | ".join(names) + " |")
print("|---" * (len(names) + 1) + "|")
ran = [c for c in ("resync", "fullcopy", "initial", "zstd", "rsync") if c in want or (c == "resync" and ("verify" in want or "dd" in want))]
ran += [c for c in ("verify",) if c in want] + (["dddense", "ddread", "ddboth"] if "dd" in want else [])
for i in R:
    cells = []
    for c, k in cols:
        r = by.get(c, {}).get(i)
        cells.append("—" if c not in ran else "fail" if r is None or not r.get("ok") or r.get("equal") is False else f(r.get(k), 1 if k.startswith("mb") else 2))
    print(f"| {i} | " + " | ".join(cells) + " |")
print("| **median** | " + " | ".join(f(med([ok(c, i) and ok(c, i).get(k) for i in R]), 1 if k.startswith("mb") else 2) for c, k in cols) + " |")
print("\nBytes per round (MiB): tidemark's relay bytes_in (frames), digest replies, wire total; rsync's bytes sent + received:\n")
print("| round | resync differing | resync frames | resync digests | resync wire | full-copy frames | initial frames | initial digests | rsync sent+recv |")
print("|---|---|---|---|---|---|---|---|---|")
def g(c, i, k):
    r = ok(c, i)
    return r.get(k) if r else None
for i in R:
    rs = (g("rsync", i, "sent") or 0) + (g("rsync", i, "received") or 0) if ok("rsync", i) else None
    print(f"| {i} | {mib(g('resync', i, 'differing_bytes'))} | {mib(g('resync', i, 'relay_bytes_in'))} | "
          f"{mib(g('resync', i, 'digest_reply_bytes'))} | {mib(g('resync', i, 'wire_bytes'))} | "
          f"{mib(g('fullcopy', i, 'relay_bytes_in'))} | {mib(g('initial', i, 'relay_bytes_in'))} | "
          f"{mib(g('initial', i, 'digest_reply_bytes'))} | {mib(rs)} |")
print("\nContext per round: agent drain time (its own mode history, drain→data) and start-to-drain for resync / full copy / initial; "
      "sync after zstd and rsync; load average at the start of each case:\n")
print("| round | resync drain s | full drain s | initial drain s | agent start→drain s | zstd +sync s | rsync +sync s | load (resync, full, initial, zstd, rsync, verify) |")
print("|---|---|---|---|---|---|---|---|")
for i in R:
    loads = ", ".join(f(g(c, i, "load"), 1) for c in ("resync", "fullcopy", "initial", "zstd", "rsync", "verify"))
    print(f"| {i} | {f(g('resync', i, 'agent_drain_s'))} | {f(g('fullcopy', i, 'agent_drain_s'))} | "
          f"{f(g('initial', i, 'agent_drain_s'))} | {f(g('resync', i, 'start_to_drain_s'))} | "
          f"{f(g('zstd', i, 'sync_s'))} | {f(g('rsync', i, 'sync_s'))} | {loads} |")
print("\nCPU seconds (user + system) of agent / target / relay, from start to done (verify: agent / target during the verify):\n")
print("| round | resync | full copy | initial | verify |")
print("|---|---|---|---|---|")
for i in R:
    print(f"| {i} | " + " | ".join(" / ".join(f(g(c, i, k), 1) for k in ("cpu_agent_s", "cpu_target_s", "cpu_relay_s"))
                                   for c in ("resync", "fullcopy", "initial"))
          + " | " + " / ".join(f(g("verify", i, k), 1) for k in ("cpu_agent_s", "cpu_target_s")) + " |")
def ratio(a, ka, b, kb, i, den_extra=None):
    x, y = g(a, i, ka), g(b, i, kb)
    return x / y if x is not None and y else None
bars = []
def bar(name, per_round, op, limit):
    m = med(per_round)
    met = None if m is None else (m <= limit if op == "<=" else m >= limit)
    bars.append((name, per_round, m, op, limit, met))
bar("resync wall / rsync wall", [ratio("resync", "wall_s", "rsync", "wall_s", i) for i in R], "<=", 0.33)
bar("resync wall / full-copy wall", [ratio("resync", "wall_s", "fullcopy", "wall_s", i) for i in R], "<=", 0.5)
def wire(i):
    r = ok("resync", i)
    if not r:
        return None
    return r["wire_bytes"] / (data["diff_zstd1"] + r["digest_reply_bytes"] + 80 * r["digest_requests"])
bar("wire bytes / (differing data zstd -1 + digest traffic)", [wire(i) for i in R], "<=", 1.2)
bar("zstd\\|ssh wall / initial-replication wall", [ratio("zstd", "wall_s", "initial", "wall_s", i) for i in R], ">=", 1.3)
bar("verify MB/s / the disk's sequential read MB/s (dd of a dense file)", [ratio("verify", "mb_s", "dddense", "mb_s", i) for i in R], ">=", 0.7)
print("\nBars (median of the per-round ratios):\n")
print("| bar | per round | median | limit | met |")
print("|---|---|---|---|---|")
for name, pr, m, op, limit, met in bars:
    print(f"| {name} | {', '.join(f(x) for x in pr)} | **{f(m)}** | {op} {limit} | {'—' if met is None else ('yes' if met else '**no**')} |")
ctx = [("resync wall / (rsync wall + its sync)", [ (g('resync', i, 'wall_s') / (g('rsync', i, 'wall_s') + g('rsync', i, 'sync_s'))) if ok('resync', i) and ok('rsync', i) else None for i in R]),
       ("(zstd|ssh wall + its sync) / initial wall", [ ((g('zstd', i, 'wall_s') + g('zstd', i, 'sync_s')) / g('initial', i, 'wall_s')) if ok('zstd', i) and ok('initial', i) else None for i in R]),
       ("verify MB/s / dd of the sparse source (its holes read nothing)", [ratio("verify", "mb_s", "ddread", "mb_s", i) for i in R]),
       ("verify MB/s / per-file MB/s of both files read at once", [ratio("verify", "mb_s", "ddboth", "mb_s_per_file", i) for i in R])]
print("\nContext ratios (not the bars):\n")
for name, pr in ctx:
    print(f"- {name}: {', '.join(f(x) for x in pr)} (median {f(med(pr))})")
fails = [(r["case"], r["round"]) for r in rows if r["case"] != "data" and (not r.get("ok") or r.get("equal") is False)]
missing = [(c, i) for c in ran for i in R if i not in by.get(c, {})]
print(f"\nEvery replica equal to the source: {'yes' if not fails and not missing else 'no: ' + str(fails + missing)}")
EOF
