//! MEMHOG: touches more memory than the VM's frame quota allows; the
//! hypervisor must stop it before it gets to the end.

use crate::hv;
use hvcore::hypercall::check;

const PAGE: u64 = 4096;
/// 1 MiB (above the boot protocol's area) up to the VM's 8 MiB.
const START: u64 = 1 << 20;
const END: u64 = 8 << 20;
const PROGRESS_EVERY: u64 = 256;

pub fn run() -> ! {
    crate::println!("memhog: writing every page of {START:#x}..{END:#x}: the hypervisor must stop me");
    let mut pages = 0;
    for gpa in (START..END).step_by(PAGE as usize) {
        let p = gpa as *mut u8;
        // SAFETY: guest memory, identity-mapped. The byte written is the
        // one read, so the program's own code and data (which lie in this
        // range) stay as they are; the write is what makes the hypervisor
        // give the page a frame of its own.
        unsafe { p.write_volatile(p.read_volatile()) };
        pages += 1;
        if pages % PROGRESS_EVERY == 0 {
            crate::println!("memhog: {pages} pages written, up to {gpa:#x}");
        }
    }
    crate::println!("memhog: wrote all {pages} pages: nobody stopped me");
    hv::report(check::MEMHOG_FINISHED, false, pages);
    hv::exit(1)
}
