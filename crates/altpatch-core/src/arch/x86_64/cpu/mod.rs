//! The x86-64 CPU's identity and features: the [`Feature`] table (where
//! CPUID reports each), the [`Features`] snapshot read from a
//! [`CpuidSource`] (the `cpuid` instruction, XCR0 and an MSR reader for
//! kernels, or a recorded dump), and the dump format. Re-exported as
//! `altpatch::cpu`, where the architecture-neutral parts (overrides, the
//! published snapshot) join them.

mod feature;
mod features;
mod source;

pub use feature::Feature;
pub use features::{Features, Vendor};
#[cfg(target_arch = "x86_64")]
pub use source::HostCpuid;
pub use source::{CpuidSource, RecordedCpuid, RecordedCpuidError, dump};

/// The result of one `cpuid` query: `eax`, `ebx`, `ecx`, `edx`.
pub type CpuidResult = raw_cpuid::CpuIdResult;
