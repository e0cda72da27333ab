#!/usr/bin/env bash
# The dedupe benchmark: hvcore's page manager + dedupe + EPT code on an
# arena-backed image of guest memory, against Linux KSM on the same shape
# (../shared/peers/linux_ksm_bench.py, when /sys/kernel/mm/ksm is writable:
# root and CONFIG_KSM), plus a one-pass memory read as the floor. Prints a
# table. Options go to the benchmark (see --help), e.g.
#   bash scripts/bench.sh                                  # 1 GiB, default shape
#   bash scripts/bench.sh --dup 0.9 --group 2 --zero 0     # 90% pairs
#   bash scripts/bench.sh --sweep                          # 256 MiB, 1 GiB, 4 GiB
# See docs/dedupe-performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >&2
# Built for this CPU (xxhash-rust chooses AVX2 at compile time), in a
# target directory of its own so the normal builds are not rebuilt.
export RUSTFLAGS="-C target-cpu=native"
# The dedupe indexes live on the heap: let glibc back it with transparent
# huge pages, as the arena is, and as the kernel's heap sits in the
# bootloader's large-page mapping of physical memory. On 4 KiB pages the
# index lookups also miss the TLB (measured: 4 GiB 1.37 s -> 1.12 s).
export GLIBC_TUNABLES=glibc.malloc.hugetlb=1
export CARGO_TARGET_DIR=target/bench
exec cargo run --quiet --release -p hvcore --example dedupe-bench -- "$@"
