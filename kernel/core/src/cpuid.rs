//! What a guest sees of CPUID: the host's answer, with VMX hidden (no
//! nested virtualization here), the hypervisor-present bit set, and our
//! vendor leaf at 0x4000_0000 (the range reserved for hypervisors).

pub const HYPERVISOR_LEAF: u32 = 0x4000_0000;
/// Twelve bytes, returned in EBX, ECX, EDX of the hypervisor leaf.
pub const VENDOR: &[u8; 12] = b"HvDedupeRust";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Regs {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

const LEAF1_ECX_VMX: u32 = 1 << 5;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;

/// The guest's answer for `leaf`, given the host's.
pub fn filter(leaf: u32, host: Regs) -> Regs {
    let word = |i: usize| u32::from_le_bytes([VENDOR[i], VENDOR[i + 1], VENDOR[i + 2], VENDOR[i + 3]]);
    match leaf {
        1 => Regs { ecx: (host.ecx & !LEAF1_ECX_VMX) | LEAF1_ECX_HYPERVISOR, ..host },
        // EAX: the highest hypervisor leaf.
        HYPERVISOR_LEAF => Regs { eax: HYPERVISOR_LEAF, ebx: word(0), ecx: word(4), edx: word(8) },
        l if l > HYPERVISOR_LEAF && l < 0x4000_0100 => Regs { eax: 0, ebx: 0, ecx: 0, edx: 0 },
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hides_vmx_and_says_hypervisor() {
        let host = Regs { eax: 0x506e3, ebx: 1, ecx: 0x7ffa_fbbf, edx: 0xbfeb_fbff };
        let g = filter(1, host);
        assert_eq!(g.ecx & LEAF1_ECX_VMX, 0);
        assert_ne!(g.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!((g.eax, g.ebx, g.edx), (host.eax, host.ebx, host.edx));
        assert_eq!(g.ecx | LEAF1_ECX_VMX, host.ecx | LEAF1_ECX_HYPERVISOR);
    }

    #[test]
    fn vendor_leaf_spells_the_signature() {
        let g = filter(HYPERVISOR_LEAF, Regs { eax: 9, ebx: 9, ecx: 9, edx: 9 });
        let mut sig = [0u8; 12];
        sig[..4].copy_from_slice(&g.ebx.to_le_bytes());
        sig[4..8].copy_from_slice(&g.ecx.to_le_bytes());
        sig[8..].copy_from_slice(&g.edx.to_le_bytes());
        assert_eq!(&sig, VENDOR);
        assert_eq!(g.eax, HYPERVISOR_LEAF);
    }

    #[test]
    fn other_leaves_pass_through() {
        let host = Regs { eax: 1, ebx: 2, ecx: 3, edx: 4 };
        assert_eq!(filter(0, host), host);
        assert_eq!(filter(7, host), host);
        assert_eq!(filter(0x4000_0001, host), Regs { eax: 0, ebx: 0, ecx: 0, edx: 0 });
    }
}
