#!/usr/bin/env bash
# Set up (if needed), build the disk images and boot the hypervisor in the
# best emulator here: QEMU+KVM with nested VMX, else Bochs, else QEMU.
# Arguments go to the runner: scripts/run.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec cargo run --quiet -- "$@"
