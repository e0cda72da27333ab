//! The IDT: every CPU exception is logged with its vector, error code and
//! RIP, then the run stops with a failure code. The kernel runs with
//! interrupts off (guests are switched on the VMX preemption timer), so
//! only exceptions arrive here. `int3` is the one that returns, so a boot
//! can prove the IDT works.

use hvcore::exit::ExitCode;
use spin::Once;
use x86_64::structures::idt::{InterruptDescriptorTable, InterruptStackFrame, PageFaultErrorCode};

static IDT: Once<InterruptDescriptorTable> = Once::new();

fn stop(name: &str, vector: u8, error: Option<u64>, frame: &InterruptStackFrame) -> ! {
    // SAFETY: the interrupted code never resumes (we exit below).
    unsafe { crate::serial::force_unlock() };
    let cr2 = x86_64::registers::control::Cr2::read_raw();
    match error {
        Some(e) => log::error!(
            "EXCEPTION {} (vector {}) error code {:#x} at RIP {:#x} (CR2 {:#x})",
            name, vector, e, frame.instruction_pointer.as_u64(), cr2
        ),
        None => log::error!(
            "EXCEPTION {} (vector {}) at RIP {:#x}",
            name, vector, frame.instruction_pointer.as_u64()
        ),
    }
    crate::power::exit(ExitCode::Failure)
}

/// Handlers that stop; one line each instead of twenty copies.
macro_rules! stopping {
    ($name:ident, $text:literal, $vec:literal) => {
        extern "x86-interrupt" fn $name(frame: InterruptStackFrame) {
            stop($text, $vec, None, &frame)
        }
    };
    ($name:ident, $text:literal, $vec:literal, error) => {
        extern "x86-interrupt" fn $name(frame: InterruptStackFrame, code: u64) {
            stop($text, $vec, Some(code), &frame)
        }
    };
}

stopping!(divide_error, "#DE divide error", 0);
stopping!(debug, "#DB debug", 1);
stopping!(nmi, "NMI", 2);
stopping!(overflow, "#OF overflow", 4);
stopping!(bound_range, "#BR bound range", 5);
stopping!(invalid_opcode, "#UD invalid opcode", 6);
stopping!(device_not_available, "#NM device not available", 7);
stopping!(invalid_tss, "#TS invalid TSS", 10, error);
stopping!(segment_not_present, "#NP segment not present", 11, error);
stopping!(stack_segment, "#SS stack segment", 12, error);
stopping!(general_protection, "#GP general protection", 13, error);
stopping!(x87_floating_point, "#MF x87 floating point", 16);
stopping!(alignment_check, "#AC alignment check", 17, error);
stopping!(simd_floating_point, "#XM SIMD floating point", 19);
stopping!(virtualization, "#VE virtualization", 20);
stopping!(control_protection, "#CP control protection", 21, error);

extern "x86-interrupt" fn breakpoint(frame: InterruptStackFrame) {
    log::debug!("#BP breakpoint at RIP {:#x}", frame.instruction_pointer.as_u64());
}

extern "x86-interrupt" fn page_fault(frame: InterruptStackFrame, code: PageFaultErrorCode) {
    stop("#PF page fault", 14, Some(code.bits()), &frame)
}

extern "x86-interrupt" fn double_fault(frame: InterruptStackFrame, code: u64) -> ! {
    stop("#DF double fault", 8, Some(code), &frame)
}

extern "x86-interrupt" fn machine_check(frame: InterruptStackFrame) -> ! {
    stop("#MC machine check", 18, None, &frame)
}

pub fn init() {
    let idt = IDT.call_once(|| {
        let mut idt = InterruptDescriptorTable::new();
        idt.divide_error.set_handler_fn(divide_error);
        idt.debug.set_handler_fn(debug);
        idt.non_maskable_interrupt.set_handler_fn(nmi);
        idt.breakpoint.set_handler_fn(breakpoint);
        idt.overflow.set_handler_fn(overflow);
        idt.bound_range_exceeded.set_handler_fn(bound_range);
        idt.invalid_opcode.set_handler_fn(invalid_opcode);
        idt.device_not_available.set_handler_fn(device_not_available);
        idt.invalid_tss.set_handler_fn(invalid_tss);
        idt.segment_not_present.set_handler_fn(segment_not_present);
        idt.stack_segment_fault.set_handler_fn(stack_segment);
        idt.general_protection_fault.set_handler_fn(general_protection);
        idt.page_fault.set_handler_fn(page_fault);
        idt.x87_floating_point.set_handler_fn(x87_floating_point);
        idt.alignment_check.set_handler_fn(alignment_check);
        idt.machine_check.set_handler_fn(machine_check);
        idt.simd_floating_point.set_handler_fn(simd_floating_point);
        idt.virtualization.set_handler_fn(virtualization);
        idt.cp_protection_exception.set_handler_fn(control_protection);
        // SAFETY: the IST index names the stack gdt::init put in the TSS.
        unsafe {
            idt.double_fault
                .set_handler_fn(double_fault)
                .set_stack_index(crate::gdt::DOUBLE_FAULT_IST_INDEX);
        }
        idt
    });
    idt.load();
}
