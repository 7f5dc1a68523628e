//! Making this CPU execute what was just written to its text: on x86-64 a
//! serializing instruction (caches are coherent with stores, so no cache
//! maintenance is needed).

#[cfg(target_arch = "x86_64")]
use core::ops::Range;

use super::cpu::{Feature, Features};

/// How a CPU is made to execute freshly written text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMethod {
    /// The `serialize` instruction (where CPUID.7.0:EDX\[14\] says it exists).
    Serialize,
    /// `cpuid`, architecturally serializing everywhere (and a VM exit under
    /// most hypervisors, so slower).
    Cpuid,
}

impl SyncMethod {
    /// `serialize` where `features` has it, else `cpuid`.
    pub fn for_features(features: &Features) -> SyncMethod {
        if features.has(Feature::Serialize) {
            SyncMethod::Serialize
        } else {
            SyncMethod::Cpuid
        }
    }
}

#[cfg(target_arch = "x86_64")]
/// Makes the calling CPU execute the current bytes of `written` (the
/// ranges stored to; x86 needs no per-range work, only serialization).
///
/// # Safety
///
/// `method` must be one the CPU supports ([`SyncMethod::Serialize`] only
/// where CPUID says so).
#[inline]
pub unsafe fn sync_core(method: SyncMethod, _written: &[Range<usize>]) {
    match method {
        // SAFETY: `serialize` (0f 01 e8) only serializes instruction
        // execution; the caller chose it only where the CPU has it. Emitted
        // as bytes so older assemblers accept it.
        SyncMethod::Serialize => unsafe {
            core::arch::asm!(".byte 0x0f, 0x01, 0xe8", options(nostack, preserves_flags))
        },
        SyncMethod::Cpuid => {
            let _ = raw_cpuid::native_cpuid::cpuid_count(0, 0);
        }
    }
}
