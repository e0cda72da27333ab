//! Interrupts into the guest: before every VM entry the VM's local APIC,
//! its 8259 PIC (through LINT0 in ExtINT mode, or straight to the CPU
//! while the APIC is disabled) and a pending NMI are looked at; what the
//! guest can take now is
//! injected, and what it cannot take yet arms an interrupt- or NMI-window
//! exit so it goes in at the first instruction boundary where it can
//! (SDM Vol. 3C 27.6 "Event injection", 26.7.5 window exiting, 25.4.2
//! interruptibility state).

use crate::vm::Vm;
use crate::vmx::vmcs::{read, set};
use hvcore::vmx::event::{self, Event, RFLAGS_IF};
use x86::vmx::vmcs::control::PrimaryControls;
use x86::vmx::vmcs::{control, guest};

const BLOCK_STI: u64 = event::BLOCKING_BY_STI as u64;
const BLOCK_MOV_SS: u64 = event::BLOCKING_BY_MOV_SS as u64;
const BLOCK_NMI: u64 = event::BLOCKING_BY_NMI as u64;

/// Called with the VM's VMCS current, right before it is entered.
pub fn deliver(vm: &mut Vm) {
    if vm.platform.lapic.is_none() {
        return;
    }
    crate::vcpu::sync_tpr_from_shadow(vm);
    let now = crate::vcpu::guest_tsc(vm);
    vm.platform.poll(now);
    let lapic = vm.platform.lapic.as_mut().expect("checked above");
    lapic.poll(now);
    if lapic.take_nmi() {
        vm.nmi_pending = true;
    }
    let mut queued = read(control::VMENTRY_INTERRUPTION_INFO_FIELD) as u32 & event::VALID != 0;
    let blocking = read(guest::INTERRUPTIBILITY_STATE);
    let mut windows = PrimaryControls::empty();
    if vm.nmi_pending {
        if !queued && blocking & (BLOCK_STI | BLOCK_MOV_SS | BLOCK_NMI) == 0 {
            set(control::VMENTRY_INTERRUPTION_INFO_FIELD, Event::nmi().encode() as u64);
            vm.nmi_pending = false;
            queued = true;
        } else {
            windows |= PrimaryControls::NMI_WINDOW_EXITING;
        }
    }
    let open = read(guest::RFLAGS) & RFLAGS_IF != 0 && blocking & (BLOCK_STI | BLOCK_MOV_SS) == 0;
    let lapic = vm.platform.lapic.as_mut().expect("checked above");
    // The APIC's own interrupts first; an ExtINT from the PIC bypasses the
    // APIC's priority logic (SDM Vol. 3A 11.6.1, "ExtINT").
    let pic_reaches = lapic.accepts_pic_interrupts();
    if let Some(vector) = lapic.pending_interrupt() {
        if !queued && open {
            set(control::VMENTRY_INTERRUPTION_INFO_FIELD, Event::external(vector).encode() as u64);
            lapic.ack_interrupt(vector);
            queued = true;
        } else {
            windows |= PrimaryControls::INTERRUPT_WINDOW_EXITING;
        }
    }
    if pic_reaches && vm.platform.pic.pending_vector().is_some() {
        if !queued && open {
            // INTA: the PIC puts its vector on the bus now.
            if let Some(vector) = vm.platform.pic.ack() {
                set(control::VMENTRY_INTERRUPTION_INFO_FIELD, Event::external(vector).encode() as u64);
            }
        } else {
            windows |= PrimaryControls::INTERRUPT_WINDOW_EXITING;
        }
    }
    // A pending interrupt the TPR holds back: exit when CR8 drops below
    // its class (TPR threshold, SDM Vol. 3C 30.1.2); VM entry needs the
    // threshold no higher than the TPR's class (27.2.1.1).
    let tpr_class = (lapic.tpr() >> 4) as u64;
    let threshold = lapic.highest_irr().map_or(0, |v| (v >> 4) as u64).min(tpr_class);
    set(control::TPR_THRESHOLD, threshold);
    let primary = read(control::PRIMARY_PROCBASED_EXEC_CONTROLS);
    let all = (PrimaryControls::NMI_WINDOW_EXITING | PrimaryControls::INTERRUPT_WINDOW_EXITING).bits() as u64;
    let wanted = (primary & !all) | windows.bits() as u64;
    if wanted != primary {
        set(control::PRIMARY_PROCBASED_EXEC_CONTROLS, wanted);
    }
}

/// Whether a halted VM has something that wakes it: an NMI, or an
/// interrupt it accepts (RFLAGS.IF was set when it halted).
pub fn wakes(vm: &mut Vm, now: u64) -> bool {
    vm.platform.poll(now);
    let pic = vm.platform.pic.pending_vector().is_some();
    let Some(lapic) = vm.platform.lapic.as_mut() else { return true };
    lapic.poll(now);
    if lapic.take_nmi() {
        vm.nmi_pending = true;
    }
    let interrupt = lapic.pending_interrupt().is_some() || (pic && lapic.accepts_pic_interrupts());
    vm.nmi_pending || (vm.halted_with_if && interrupt)
}

/// The guest TSC at which the VM's next timer interrupt is due (its APIC
/// timer or its PIT), if one is armed.
pub fn next_deadline(vm: &Vm) -> Option<u64> {
    let lapic = vm.platform.lapic.as_ref().and_then(|l| l.next_deadline());
    [lapic, vm.platform.next_deadline()].into_iter().flatten().min()
}
