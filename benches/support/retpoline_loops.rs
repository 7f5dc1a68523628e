//! Loops of indirect calls in hand-written assembly, one per way of making
//! the call, shared by `benches/retpoline.rs` and the demo (included with
//! `#[path]`). Written in assembly so each loop's call instruction is
//! exactly the form being measured, whatever the compiler flags.
//!
//! Every loop is `extern "C" fn(fns, idx, n, x) -> u64`: for `i` in
//! `0..n`, `x = fns[idx[i]](x)`, the pointer loaded into `%r11` as rustc's
//! retpoline code does. Only the call differs:
//!
//! | loop | call |
//! |---|---|
//! | `rp_loop_direct_<off>` | `call rp_target0_<off>` (ignores the table) |
//! | `rp_loop_plain` | `call *%r11` |
//! | `rp_loop_thunk` | `call __x86_indirect_thunk_r11` (label `rp_loop_thunk_site`) |
//! | `rp_loop_inline` | `call __x86_indirect_thunk_r11` (label `rp_loop_inline_site`), to be inlined |
//! | `rp_loop_cs` | `cs call __x86_indirect_thunk_r11` (label `rp_loop_cs_site`: 6 bytes, as `-mindirect-branch-cs-prefix` emits it), to be inlined |
//!
//! Each loop and its head start a 64-byte block, and the call is at the
//! same offset in every loop. The four targets exist in three
//! byte-identical copies: at the start of a 64-byte block, 16 and 32 bytes
//! in ([`targets`]).
#![allow(dead_code)]

macro_rules! rp_loop {
    ($name:literal, $call:literal) => {
        concat!(
            ".globl ",
            $name,
            "\n",
            ".type ",
            $name,
            ", @function\n",
            ".balign 64\n",
            $name,
            ":\n",
            // Five pushes re-align the stack for the calls.
            "push %rbx\n push %r12\n push %r13\n push %r14\n push %r15\n",
            "mov %rdi, %r12\n mov %rsi, %r13\n mov %rdx, %r14\n mov %rcx, %r15\n",
            "xor %ebx, %ebx\n",
            "test %r14, %r14\n jz 2f\n",
            // Multi-byte NOPs, run once per loop: the head starts a block.
            ".balign 64\n",
            "1:\n",
            "mov (%r13,%rbx,4), %eax\n",
            "mov (%r12,%rax,8), %r11\n",
            "mov %r15, %rdi\n",
            $call,
            "\n",
            "mov %rax, %r15\n",
            "inc %rbx\n cmp %r14, %rbx\n jb 1b\n",
            "2:\n mov %r15, %rax\n",
            "pop %r15\n pop %r14\n pop %r13\n pop %r12\n pop %rbx\n ret\n",
            ".size ",
            $name,
            ", . - ",
            $name,
            "\n"
        )
    };
}

core::arch::global_asm!(
    ".pushsection .text.rp_loops,\"ax\",@progbits",
    rp_loop!("rp_loop_direct_0", "call rp_target0_0"),
    rp_loop!("rp_loop_direct_16", "call rp_target0_16"),
    rp_loop!("rp_loop_direct_32", "call rp_target0_32"),
    rp_loop!("rp_loop_plain", "call *%r11"),
    rp_loop!(
        "rp_loop_thunk",
        ".globl rp_loop_thunk_site\nrp_loop_thunk_site: call __x86_indirect_thunk_r11"
    ),
    rp_loop!(
        "rp_loop_inline",
        ".globl rp_loop_inline_site\nrp_loop_inline_site: call __x86_indirect_thunk_r11"
    ),
    rp_loop!(
        "rp_loop_cs",
        ".globl rp_loop_cs_site\nrp_loop_cs_site: .byte 0x2e\n call __x86_indirect_thunk_r11"
    ),
    ".popsection",
    options(att_syntax)
);

/// A loop's signature.
pub type Loop = unsafe extern "C" fn(*const Target, *const u32, u64, u64) -> u64;
/// A call target.
pub type Target = extern "C" fn(u64) -> u64;

unsafe extern "C" {
    pub fn rp_loop_direct_0(fns: *const Target, idx: *const u32, n: u64, x: u64) -> u64;
    pub fn rp_loop_direct_16(fns: *const Target, idx: *const u32, n: u64, x: u64) -> u64;
    pub fn rp_loop_direct_32(fns: *const Target, idx: *const u32, n: u64, x: u64) -> u64;
    pub fn rp_loop_plain(fns: *const Target, idx: *const u32, n: u64, x: u64) -> u64;
    pub fn rp_loop_thunk(fns: *const Target, idx: *const u32, n: u64, x: u64) -> u64;
    pub fn rp_loop_inline(fns: *const Target, idx: *const u32, n: u64, x: u64) -> u64;
    pub fn rp_loop_cs(fns: *const Target, idx: *const u32, n: u64, x: u64) -> u64;
    static rp_loop_thunk_site: [u8; 0];
    static rp_loop_inline_site: [u8; 0];
    static rp_loop_cs_site: [u8; 0];
}

/// The four targets' bodies, in table order: `3x + 1`, `5x + 2`,
/// `7x + 3`, `x ^ (x >> 7)`.
macro_rules! rp_targets_at {
    ($off:literal) => {
        concat!(
            ".balign 64\n .skip ",
            $off,
            ", 0xcc\n",
            ".globl rp_target0_",
            $off,
            "\n .hidden rp_target0_",
            $off,
            "\n",
            "rp_target0_",
            $off,
            ": lea 1(%rdi,%rdi,2), %rax\n ret\n",
            ".balign 64\n .skip ",
            $off,
            ", 0xcc\n",
            "rp_target1_",
            $off,
            ": lea 2(%rdi,%rdi,4), %rax\n ret\n",
            ".balign 64\n .skip ",
            $off,
            ", 0xcc\n",
            "rp_target2_",
            $off,
            ": imul $7, %rdi, %rax\n add $3, %rax\n ret\n",
            ".balign 64\n .skip ",
            $off,
            ", 0xcc\n",
            "rp_target3_",
            $off,
            ": mov %rdi, %rax\n shr $7, %rax\n xor %rdi, %rax\n ret\n",
            // The table is data relocated at load: not in text.
            ".pushsection .data.rel.ro.rp_targets,\"aw\",@progbits\n",
            ".balign 8\n",
            ".globl rp_targets_",
            $off,
            "\n .hidden rp_targets_",
            $off,
            "\n",
            "rp_targets_",
            $off,
            ":\n",
            ".quad rp_target0_",
            $off,
            ", rp_target1_",
            $off,
            ", rp_target2_",
            $off,
            ", rp_target3_",
            $off,
            "\n",
            ".popsection\n",
        )
    };
}

core::arch::global_asm!(
    ".pushsection .text.rp_targets,\"ax\",@progbits",
    rp_targets_at!("0"),
    rp_targets_at!("16"),
    rp_targets_at!("32"),
    ".popsection",
    options(att_syntax)
);

unsafe extern "C" {
    static rp_targets_0: [Target; 4];
    static rp_targets_16: [Target; 4];
    static rp_targets_32: [Target; 4];
}

/// Where in its 64-byte block each target copy starts.
pub const OFFSETS: [usize; 3] = [0, 16, 32];

/// The four targets with each `off` bytes into its 64-byte block (`off`
/// one of [`OFFSETS`]).
pub fn targets(off: usize) -> &'static [Target; 4] {
    // SAFETY: the tables are initialized data (absolute addresses of the
    // targets, relocated at load) that nothing writes.
    unsafe {
        match off {
            0 => &rp_targets_0,
            16 => &rp_targets_16,
            32 => &rp_targets_32,
            _ => panic!("no targets at +{off}"),
        }
    }
}

/// The direct loop calling target 0 at `off`.
pub fn direct(off: usize) -> Loop {
    match off {
        0 => rp_loop_direct_0,
        16 => rp_loop_direct_16,
        32 => rp_loop_direct_32,
        _ => panic!("no targets at +{off}"),
    }
}

/// What the targets compute, in table order.
pub fn reference(k: u32, x: u64) -> u64 {
    match k {
        0 => x.wrapping_mul(3).wrapping_add(1),
        1 => x.wrapping_mul(5).wrapping_add(2),
        2 => x.wrapping_mul(7).wrapping_add(3),
        _ => x ^ (x >> 7),
    }
}

/// `n` table indices: all 0 (`predictable`), or drawn from a xorshift
/// generator over 0..4, so no short history predicts the next target.
pub fn indices(n: usize, predictable: bool) -> Vec<u32> {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            if predictable {
                return 0;
            }
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 32) as u32 % 4
        })
        .collect()
}

/// Address of `rp_loop_thunk`'s call.
pub fn thunk_site() -> usize {
    (&raw const rp_loop_thunk_site) as usize
}

/// Address of `rp_loop_inline`'s call.
pub fn inline_site() -> usize {
    (&raw const rp_loop_inline_site) as usize
}

/// Address of `rp_loop_cs`'s call (its `cs` prefix).
pub fn cs_site() -> usize {
    (&raw const rp_loop_cs_site) as usize
}

/// Runs `f` over `idx` (all of it) from `x`, the targets at the start of
/// their blocks.
pub fn run(f: Loop, idx: &[u32], x: u64) -> u64 {
    run_at(f, 0, idx, x)
}

/// Runs `f` over `idx` (all of it) from `x` with the targets `off` bytes
/// into their blocks.
pub fn run_at(f: Loop, off: usize, idx: &[u32], x: u64) -> u64 {
    // SAFETY: the loops read `idx.len()` indices below 4 and call the
    // four valid targets.
    unsafe { f(targets(off).as_ptr(), idx.as_ptr(), idx.len() as u64, x) }
}
