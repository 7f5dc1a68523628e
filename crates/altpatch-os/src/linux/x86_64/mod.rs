//! What the Linux backend knows about x86-64: the signal frame's registers
//! (`frame.rs`) and CET shadow stacks with the raw system calls a signal
//! handler makes (`cet.rs`). A second architecture adds its own folder
//! beside this one and one `cfg` pair in `os/linux/mod.rs`.

pub(super) mod cet;
pub(super) mod frame;
