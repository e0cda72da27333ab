//! The Intel VMX boundary of the hardware-free core: capability MSR
//! decoding, control-value derivation, exit reasons and exit
//! qualifications. Nothing outside this module (and the kernel's VMX glue)
//! knows these encodings; AMD SVM would sit beside it.

pub mod caps;
pub mod event;
pub mod exit;

pub use caps::{FeatureControl, Invalidation, Missing, VmxCaps};
pub use exit::{exit_reason_name, instruction_error_meaning, EptQual, IoQual};
