//! The CPU feature snapshot every patching decision is made from.
//!
//! [`Features`] is a small `Copy` value: a bitset of [`Feature`]s plus vendor,
//! family and model. It is taken once from a [`CpuidSource`] (the real
//! `cpuid` instruction by default, or a [`RecordedCpuid`] dump of another CPU
//! in tests), then adjusted by [`Overrides`] parsed from a boot-argument-like
//! string such as `"nomovbe,noavx2,+erms"`.
//!
//! ```
//! use altpatch::cpu::{Feature, Features, Overrides};
//!
//! let host = Features::detect();
//! let without_movbe = host.with_overrides(&Overrides::parse("nomovbe").unwrap());
//! assert!(!without_movbe.has(Feature::Movbe));
//! ```

// What an alternative's condition means: a feature the CPU has or lacks
// (public as `altpatch::alternative::Condition`, where it is documented).
mod condition;
#[doc(hidden)]
pub mod mitigation;
mod overrides;
mod published;

// What a CPU is and how its features are read is the architecture's:
// everything its `cpu` module defines (on x86-64 the `Feature` table,
// `Features`, `Vendor` and the CPUID sources).
pub use crate::arch::cpu::*;
#[doc(hidden)]
pub use condition::Condition;
pub use overrides::{OverrideError, Overrides};
pub use published::{
    AlreadyPublished, altpatch_cpu_features, altpatch_cpu_has, publish, published, try_published,
};
#[cfg(feature = "std")]
#[doc(hidden)]
pub use published::{after_fork_in_child, startup_allowed};
