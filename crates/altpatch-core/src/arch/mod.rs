//! The architecture seam: everything the rest of the crate needs to know
//! about an instruction set, named once.
//!
//! Each supported architecture is one module here (today [`x86_64`]). The
//! `pub use` blocks below are the contract: the architecture-neutral layers
//! (plans, pokes, images, static keys, static calls, ifuncs, the patcher,
//! the Linux backend's page handling) name only these items, through
//! `crate::arch::`, so a second architecture adds its module and the same
//! blocks for it, and those layers compile unchanged. Code that is about
//! x86 itself (retpolines, the compiler's thunk sites, the ELF audits)
//! names `crate::arch::x86_64::` explicitly: `tests/seams.rs`
//! (`X86_OUTSIDE_ARCH`) lists every such file outside `arch/` with its
//! reason, and ARCHITECTURE.md ("Adding an architecture") what a port
//! touches.
//!
//! | contract item | what it is | x86-64 |
//! |---|---|---|
//! | [`PAGE_SIZE`] | the unit text is swapped and grouped in | 4096 |
//! | [`TRAP`], [`contains_trap`] | the breakpoint a live update (or a debugger, a uprobe) writes over a site | `int3` (`cc`) |
//! | [`BRANCH_LEN`], [`BRANCH_NOP`], [`BRANCH_RET`] | a branch site's length, its NOP, its return | 5, `nopl 0(%rax,%rax)`, `ret; int3 x4` |
//! | [`TRAMPOLINE_JMP`], [`TRAMPOLINE_LEN`], [`is_trampoline`], ... | a static call's trampoline (an ifunc's stub) | `endbr64; jmp rel32; ud1`, 16-aligned |
//! | `__altpatch_trampoline_body!`, `__altpatch_branch_site!` | the assembly the macros place in users' code | |
//! | [`call_to`], [`jump_to`], [`reaches`] | direct branches written at a site | `call`/`jmp rel32`, ±2 GiB |
//! | [`call_target`], [`jump_target`] | a direct branch read back | rel32 read, else decoded |
//! | [`call_of_len`], [`jump_of_len`], [`nop_of_len`] | the canonical form of a length (undo) | `e8`/`e9`/`eb`, SDM NOPs |
//! | [`is_nop`], [`is_padding`], [`fill_gap`] | NOPs and fall-through padding | decoded |
//! | [`cpu`]: `Feature`, `Features`, `Vendor`, sources | what the CPU has, and where that is read | CPUID, XCR0, `IA32_ARCH_CAPABILITIES` |
//! | [`SyncMethod`], [`sync_core`] | making this CPU run what was written | `serialize` or `cpuid` |
//! | [`LiveSite`], [`check_swap`], [`TrapFrame`], [`LiveSites`], ... | live rules: one instruction before and after; what a trapped thread runs instead | `int3` emulation of call/jmp/jcc/nop/ret and their register forms |
//! | [`relocate`], [`RelocError`], [`fill_site_pad`] | code moved to another address, re-based; a grown site's filler | rip-relative and rel branches; `0x90` |
//! | [`CallArg`], [`CallRet`], `RecordedArgs`, `recorded_call!`, `__alternative_call_abi!` | the C ABI as registers, for `alternative_call!` and recorded calls | SysV: six integer, four SSE registers |
//! | [`GotCall`], [`got_call`], [`direct_call`], [`R_IRELATIVE`] | ELF ifunc calls through the GOT | `call *slot(%rip)`, PLT stubs |
//! | `c_entry!`, `closure_table`, `closure_entry!` | code at fixed names: weak C entries, closure trampolines | `endbr64; jmp` |
//! | [`disasm`] (`std`) | plan listings | iced-x86, AT&T |
//! | [`Encoded`], [`OutOfRange`], [`BranchKind`] | instruction bytes inline; a branch that cannot reach; what a direct branch does — the neutral layers match `Call`, `Jmp` and `Jcc(_)`, so every arch's `BranchKind` has those three | `call`, `jmp`, `jcc` (aarch64: `BL`, `B`, `B.cond`) |
//!
//! What the seam is designed for beyond x86 (the aarch64 issue): fixed
//! 4-byte instructions make `BRANCH_LEN` 4 and every NOP one word; `B`,
//! `BL` and `NOP` may be stored while other CPUs run them, so the trap-based
//! protocol is needed only for other changes; publication is cache
//! maintenance (`DC CVAU`, `IC IVAU`, `ISB`) where x86 serializes; pages
//! may be 4, 16 or 64 KiB, so `PAGE_SIZE` becomes the kernel's at run time
//! there.

// The table above links the contract's items, some crate-private; the
// module is hidden from the docs (its public items are documented at
// `altpatch`'s paths), so those links serve readers of the source.
#![allow(rustdoc::private_intra_doc_links)]

// x86-64 as an instruction set: on every host (its host-only parts —
// CPUID, serialization, the assembly that runs — are gated inside).
pub mod x86_64;
// AArch64's encodings and re-basing, on every host: the first part of its
// port (issue 29); nothing of the contract below names it yet.
pub mod aarch64;
// The text form of recorded CPU dumps, every architecture's.
mod dump;

/// The CPU's identity and features (re-exported, with the neutral
/// overrides and published snapshot, as `crate::cpu`).
#[cfg(target_arch = "x86_64")]
pub(crate) use self::x86_64::cpu;

// Instruction bytes at a site: pages, the breakpoint, branch-site forms,
// padding, relocation, the static-call trampoline's layout, serialization.
#[cfg(target_arch = "x86_64")]
pub(crate) use self::x86_64::PAGE_SIZE;
#[cfg(target_arch = "x86_64")]
pub use self::x86_64::{
    BranchKind, Encoded, OutOfRange, RelocError,
    breakpoint::TRAP,
    fill_gap, relocate,
    site::{
        BRANCH_LEN, BRANCH_NOP, BRANCH_RET, call_of_len, call_target, call_to, fill_site_pad,
        is_nop, is_padding, jump_of_len, jump_target, jump_to, nop_of_len, reaches,
    },
    sync_core::{SyncMethod, sync_core},
    trampoline::{
        TRAMPOLINE_ALIGN, TRAMPOLINE_JMP, TRAMPOLINE_LEN, TRAMPOLINE_SIGNATURE, is_trampoline,
    },
};

// The live rules: which swaps are one instruction, what a trapped thread's
// registers become (the protocol itself is `poke::live`).
#[cfg(target_arch = "x86_64")]
pub use self::x86_64::{
    emulate::{LiveSites, TrapAction, TrapFrame},
    live::{Emulation, LiveError, LiveSite, check_swap},
};
// Used by the Linux backend's page-swap publication and its uprobe
// reconcile (a kernel's protocol goes through `LiveSite::new`).
#[cfg(all(target_arch = "x86_64", feature = "std"))]
#[doc(hidden)]
pub use self::x86_64::breakpoint::contains_trap;
#[cfg(target_arch = "x86_64")]
#[cfg_attr(not(feature = "std"), allow(unused_imports))]
#[doc(hidden)]
pub use self::x86_64::live::{check_new_whole, check_old};

// The C calling convention as registers: which argument types
// `alternative_call!` and recorded calls pass, and how (with the macros
// `__alternative_call_abi!`, `__alternative_call_insn!`, exported at the
// root).
#[cfg(target_arch = "x86_64")]
pub use self::x86_64::call_abi::{CallArg, CallArgs, CallRet, call_result as __call_result};
#[cfg(target_arch = "x86_64")]
pub use self::x86_64::recorded_abi::{MAX_SSE, RecordedArg, RecordedArgs, RecordedRet};
/// Recorded calls: `recorded_call!([stub] args A R, plain)`.
#[cfg(target_arch = "x86_64")]
#[doc(hidden)]
pub use self::x86_64::recorded_call::{recorded_asm, recorded_call, recorded_gp, recorded_xmm};

// ELF ifunc call sites: calls through the GOT and their direct forms.
#[cfg(target_arch = "x86_64")]
pub use self::x86_64::got_call::{
    GotCall, NOT_GOT_CALL, NOT_IRELATIVE, PLT_STUB_LEN, R_IRELATIVE, direct_call, got_call,
    plt_slot,
};

// Code the crate places at fixed names: weak C entries, closure
// trampolines' table and entries.
#[cfg(target_arch = "x86_64")]
#[doc(hidden)]
pub use self::x86_64::c_entry::c_entry;
#[cfg(all(target_arch = "x86_64", feature = "std"))]
#[doc(hidden)]
pub use self::x86_64::closure_table;
#[cfg(all(target_arch = "x86_64", feature = "std"))]
#[doc(hidden)]
pub use self::x86_64::closure_table::{closure_arg_reg, closure_entry};

/// Plan listings' disassembly.
#[cfg(all(target_arch = "x86_64", feature = "std"))]
pub(crate) use self::x86_64::disasm::disasm;
