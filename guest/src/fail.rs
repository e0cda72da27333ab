//! FAIL: one failed check and EXIT 1, whatever another VM prints (the
//! companion of FORGE).

use crate::hv;
use hvcore::hypercall::check;

pub fn run() -> ! {
    crate::println!("fail: failing on purpose");
    hv::report(check::FAIL_ALWAYS, false, 0);
    hv::exit(1)
}
