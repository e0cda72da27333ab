//! The virtual platform's devices: plain state machines behind port and
//! MMIO read/write calls, tested on the host. The kernel only routes VM
//! exits to them (through [`crate::platform::Platform`]).

pub mod debug_exit;
pub mod fw_cfg;
pub mod lapic;
pub mod pci;
pub mod pic;
pub mod uart16550;
pub mod i8042;
pub mod pit;
pub mod rtc;
