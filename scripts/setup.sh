#!/usr/bin/env bash
# Installs what building and booting the hypervisor needs, and nothing that
# is already there. Idempotent; run as root on Debian/Ubuntu (CI does).
#   - Debian packages: the emulators (QEMU, OVMF, Bochs with its term display)
#   - the Rust toolchain pinned in rust-toolchain.toml, with its components
#     and the x86_64-unknown-none target (RUSTUP_AUTO_INSTALL=0 is set on
#     our machines, so rustup will not do this by itself)
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(qemu-system-x86 ovmf bochs bochsbios vgabios bochs-term bsdutils procps)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    if [ "$(id -u)" != 0 ]; then
        echo "setup: need root to run: apt-get install ${missing[*]}" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v rustup >/dev/null; then
    echo "setup: rustup not found; install Rust with rustup first (https://rustup.rs)" >&2
    exit 1
fi
toolchain=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
if ! rustup toolchain list | grep -q "^$toolchain" ||
   ! rustup component list --toolchain "$toolchain" --installed 2>/dev/null | grep -q '^rust-src' ||
   ! rustup component list --toolchain "$toolchain" --installed 2>/dev/null | grep -q '^clippy' ||
   ! rustup target list --toolchain "$toolchain" --installed 2>/dev/null | grep -q '^x86_64-unknown-none'; then
    echo "setup: installing Rust $toolchain"
    rustup toolchain install "$toolchain" --profile minimal \
        -c rust-src -c llvm-tools -c clippy -c rustfmt -t x86_64-unknown-none
fi

# The Linux guests' kernel and initramfs under target/linux/ (Debian packages
# downloaded and unpacked there, never installed). Not fatal: only the Linux
# guests need them.
bash scripts/linux-guest.sh || echo "setup: scripts/linux-guest.sh failed; the Linux guests cannot boot" >&2
