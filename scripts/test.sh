#!/usr/bin/env bash
# Install what the test suite needs and run all of it. README's second command;
# .ci/run calls this same script, so CI proves the README.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
# Tools the tests and benchmark scripts use (qemu-img, qemu-io, qemu-nbd ship
# preinstalled): real NBD clients, FUSE, fio, a filesystem and its checker,
# libvmdk's vmdkinfo (a second VMDK reader beside qemu-img), ip for network
# namespaces.
for tool in e2fsck:e2fsprogs mkfs.ext4:e2fsprogs nbdinfo:libnbd-bin nbdcopy:libnbd-bin \
        vmdkinfo:libvmdk-utils vmdkmount:libvmdk-utils qemu-io:qemu-utils \
        nbdfuse:libnbd-bin fusermount3:fuse3 fio:fio losetup:mount qemu-img:qemu-utils ip:iproute2; do
    bin=${tool%%:*}; pkg=${tool##*:}
    command -v "$bin" >/dev/null 2>&1 || need_pkgs+=("$pkg")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq
        # Never qemu-system-x86: it would replace the preinstalled qemu-utils.
        mapfile -t need_pkgs < <(printf '%s\n' "${need_pkgs[@]}" | sort -u)
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}"
    else
        echo "scripts/test.sh: missing packages ${need_pkgs[*]} and not root to install them" >&2
        exit 1
    fi
fi

# CI builds from a clean clone: incremental compilation's bookkeeping only
# slows such a build (no earlier state to reuse). Kept for runs on a
# developer's tree, where it saves minutes on the next run.
if [ "${CI:-}" = true ]; then
    export CARGO_INCREMENTAL=0
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --quiet -- -D warnings
cargo clippy --all-targets --features ublk --quiet -- -D warnings
echo "== tests"
# One test build, with the ublk frontend compiled in: it runs every test of the
# default build too (the frontends' tests adapt to the feature), and a second
# full test build would add minutes to CI. Clippy above checks both builds.
if cargo nextest --version >/dev/null 2>&1; then
    # At least 3 at once (see .config/nextest.toml), more on larger machines.
    threads=$(nproc)
    [ "$threads" -ge 3 ] || threads=3
    cargo nextest run --no-fail-fast --features ublk --test-threads "$threads"
else
    cargo test --no-fail-fast --features ublk
fi
