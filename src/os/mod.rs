//! Operating-system backends: how a process finds its loaded objects,
//! writes its own text with W^X kept, publishes it to running threads, and
//! survives `fork`.
//!
//! Only Linux today ([`linux`]). This layer sits above the plan and image
//! layers and below site discovery and the mechanisms (`ARCHITECTURE.md`):
//! a poke strategy is an implementation of [`TextPoke`](crate::TextPoke),
//! which knows nothing of an operating system.

pub mod linux;
