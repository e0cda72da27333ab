//! The kernel's own GDT with a TSS. VMX needs both: the host-state area
//! takes the host's CS, SS and TR selectors, and TR must not be 0
//! (SDM Vol. 3C 26.2.3). The TSS gives the double-fault handler its own
//! stack (IST), so a kernel stack overflow is reported instead of
//! becoming a triple fault.

use spin::Once;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::registers::segmentation::SegmentSelector;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

pub const DOUBLE_FAULT_IST_INDEX: u16 = 0;
const IST_STACK_SIZE: usize = 5 * 4096;

#[derive(Clone, Copy, Debug)]
pub struct Selectors {
    pub code: SegmentSelector,
    pub data: SegmentSelector,
    pub tss: SegmentSelector,
}

static TSS: Once<TaskStateSegment> = Once::new();
static GDT: Once<(GlobalDescriptorTable, Selectors)> = Once::new();

pub fn init() {
    let tss = TSS.call_once(|| {
        static mut STACK: [u8; IST_STACK_SIZE] = [0; IST_STACK_SIZE];
        let mut tss = TaskStateSegment::new();
        let top = VirtAddr::from_ptr(&raw const STACK) + IST_STACK_SIZE as u64;
        tss.interrupt_stack_table[DOUBLE_FAULT_IST_INDEX as usize] = top;
        tss
    });
    let (gdt, sel) = GDT.call_once(|| {
        let mut gdt = GlobalDescriptorTable::new();
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        let tss = gdt.append(Descriptor::tss_segment(tss));
        (gdt, Selectors { code, data, tss })
    });
    gdt.load();
    // SAFETY: the selectors name descriptors of the GDT just loaded.
    unsafe {
        CS::set_reg(sel.code);
        SS::set_reg(sel.data);
        DS::set_reg(sel.data);
        ES::set_reg(sel.data);
        load_tss(sel.tss);
    }
}

pub fn selectors() -> Selectors {
    GDT.get().expect("gdt::init not called").1
}

/// The GDT's base address, for the VMCS host-state area.
pub fn gdt_base() -> u64 {
    x86_64::instructions::tables::sgdt().base.as_u64()
}

/// The TSS's base address, for the VMCS host-state area.
pub fn tss_base() -> u64 {
    TSS.get().expect("gdt::init not called") as *const _ as u64
}
