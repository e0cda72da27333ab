//! EPT violation: the page manager (the primary MMU) resolves it: lazy
//! allocation on first touch, copy-on-write of a merged page, or a retry
//! when an invalidation raced with the fault. An address in no memory
//! slot ends the VM.

use super::Next;
use crate::hypervisor::Host;
use crate::vm::{Cause, Vm};
use crate::vmx::vmcs::read;
use hvcore::page_manager::{Access, Outcome};
use hvcore::vmx::EptQual;
use x86::vmx::vmcs::ro;

pub fn handle(vm: &mut Vm, host: &mut Host) -> Next {
    let gpa = read(ro::GUEST_PHYSICAL_ADDR_FULL);
    let q = EptQual::decode(read(ro::EXIT_QUALIFICATION));
    let access = if q.write {
        Access::Write
    } else if q.fetch {
        Access::Exec
    } else {
        Access::Read
    };
    if super::apic::claims(vm, gpa) {
        return super::apic::mmio(vm, host, gpa, q);
    }
    use hvcore::hypercall::dedupe_layout::{REGION_END, REGION_START};
    if (REGION_START..REGION_END).contains(&gpa) {
        vm.dedupe.region_violations += 1;
    }
    let outcome = host.pm.handle_ept_violation(vm.id, gpa, access);
    log::trace!("{}: EPT violation at {gpa:#x} ({access:?}, qualification {q:?}): {outcome:?}", vm.name);
    match outcome {
        Outcome::Resolved | Outcome::Retry => Next::Resume,
        Outcome::OutsideMemory => {
            vm.stop(Cause::WildAccess(gpa));
            Next::Ended
        }
        Outcome::OutOfMemory => {
            vm.stop(Cause::OutOfMemory);
            Next::Ended
        }
        Outcome::QuotaExceeded => {
            vm.stop(Cause::FrameQuota(host.pm.frame_quota(vm.id).unwrap_or(0)));
            Next::Ended
        }
    }
}
