#!/usr/bin/env python3
"""Writes the Linux guests' initramfs: a gzip'd cpio archive in the "newc"
format, made with the standard library only (no cpio, no root: the device
node dev/console is an archive entry, not a file made with mknod).

    mkinitramfs.py BUSYBOX INIT OUT.cpio.gz

Contents: /bin/busybox (static), /bin/sh -> busybox, /init, /bin/hv-exit,
/dev/console (c 5,1: the kernel opens it for init's stdio before /init
runs), and the empty directories init mounts on. The other applet links are
made by `busybox --install -s /bin` in /init. The output is deterministic
(every mtime 0, uid/gid 0), so an unchanged input gives an identical file.

/bin/hv-exit is a 197-byte static x86-64 ELF written here: Debian's cloud
kernel has no /dev/port (CONFIG_DEVPORT is not set) and busybox has no outb
applet. `hv-exit [STATUS]` does ioperm(0xf4, 4, 1) and `out 0xf4, al` with
al = STATUS (decimal, default 0): isa-debug-exit then ends the VM (QEMU
exits with (STATUS << 1) | 1). If it returns, it exits with status 1.
"""
import gzip
import os
import struct
import sys

# Assembled from (GNU as, Intel syntax):
#   xor ebx,ebx; cmp qword [rsp],2; jb 2f; mov rsi,[rsp+16]
#   1: movzx eax,byte [rsi]; sub eax,'0'; cmp eax,9; ja 2f
#      imul ebx,ebx,10; add ebx,eax; inc rsi; jmp 1b
#   2: mov eax,173 (ioperm); mov edi,0xf4; mov esi,4; mov edx,1; syscall
#      test eax,eax; jnz 3f; mov eax,ebx; out 0xf4,al
#   3: mov eax,60 (exit); mov edi,1; syscall
HV_EXIT_CODE = bytes.fromhex(
    "31db48833c2402721a488b7424100fb60683e83083f809770a6bdb0a01c348ffc6"
    "ebebb8ad000000bff4000000be04000000ba010000000f0585c0750489d8e6f4b8"
    "3c000000bf010000000f05"
)


def static_elf(code: bytes, base: int = 0x400000) -> bytes:
    """An ELF64 executable: one PT_LOAD (R+X) of the whole file at base."""
    ehdr_size, phdr_size = 64, 56
    entry = base + ehdr_size + phdr_size
    size = ehdr_size + phdr_size + len(code)
    ehdr = struct.pack(
        "<4sBBBBB7xHHIQQQIHHHHHH",
        b"\x7fELF", 2, 1, 1, 0, 0,  # 64-bit, little-endian, version 1, SysV ABI
        2, 0x3E, 1,                 # ET_EXEC, EM_X86_64, EV_CURRENT
        entry, ehdr_size, 0,        # entry, phoff, shoff
        0, ehdr_size, phdr_size, 1, 0, 0, 0,
    )
    phdr = struct.pack(
        "<IIQQQQQQ",
        1, 5,                       # PT_LOAD, PF_R | PF_X
        0, base, base, size, size, 0x1000,
    )
    return ehdr + phdr + code


class Newc:
    def __init__(self):
        self.out = bytearray()
        self.ino = 1

    def entry(self, name: str, mode: int, data: bytes = b"", rdev=(0, 0)):
        name_b = name.encode() + b"\0"
        nlink = 2 if (mode & 0o170000) == 0o040000 else 1
        fields = (self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0,
                  rdev[0], rdev[1], len(name_b), 0)
        self.ino += 1
        self.out += b"070701" + b"".join(b"%08X" % f for f in fields)
        self.out += name_b
        self.out += b"\0" * (-len(self.out) % 4)
        self.out += data
        self.out += b"\0" * (-len(self.out) % 4)

    def dir(self, name):
        self.entry(name, 0o040755)

    def file(self, name, data, perm=0o755):
        self.entry(name, 0o100000 | perm, data)

    def symlink(self, name, target):
        self.entry(name, 0o120777, target.encode())

    def chardev(self, name, major, minor, perm=0o600):
        self.entry(name, 0o020000 | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self.ino = 0
        self.entry("TRAILER!!!", 0)
        return bytes(self.out)


def main(argv):
    if len(argv) != 4:
        sys.exit("usage: mkinitramfs.py BUSYBOX INIT OUT.cpio.gz")
    busybox_path, init_path, out_path = argv[1:]
    with open(busybox_path, "rb") as f:
        busybox = f.read()
    with open(init_path, "rb") as f:
        init = f.read()
    if not busybox.startswith(b"\x7fELF"):
        sys.exit(f"mkinitramfs: {busybox_path} is not an ELF file")

    a = Newc()
    for d in (".", "bin", "dev", "proc", "sys", "tmp", "work", "root", "etc"):
        a.dir(d)
    a.chardev("dev/console", 5, 1)
    a.file("bin/busybox", busybox)
    a.symlink("bin/sh", "busybox")
    a.file("bin/hv-exit", static_elf(HV_EXIT_CODE))
    a.file("init", init)
    data = gzip.compress(a.finish(), compresslevel=9, mtime=0)

    try:
        with open(out_path, "rb") as f:
            if f.read() == data:
                return  # unchanged: keep the file (and its mtime)
    except FileNotFoundError:
        pass
    tmp = out_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, out_path)


if __name__ == "__main__":
    main(sys.argv)
