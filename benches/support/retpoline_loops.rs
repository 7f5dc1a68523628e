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
//! | `rp_loop_direct` | `call rp_target0` (ignores the table) |
//! | `rp_loop_plain` | `call *%r11` |
//! | `rp_loop_thunk` | `call __x86_indirect_thunk_r11` (label `rp_loop_thunk_site`) |
//! | `rp_loop_inline` | `call __x86_indirect_thunk_r11` (label `rp_loop_inline_site`), to be inlined |
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
    rp_loop!("rp_loop_direct", "call rp_target0"),
    rp_loop!("rp_loop_plain", "call *%r11"),
    rp_loop!(
        "rp_loop_thunk",
        ".globl rp_loop_thunk_site\nrp_loop_thunk_site: call __x86_indirect_thunk_r11"
    ),
    rp_loop!(
        "rp_loop_inline",
        ".globl rp_loop_inline_site\nrp_loop_inline_site: call __x86_indirect_thunk_r11"
    ),
    ".popsection",
    options(att_syntax)
);

/// A loop's signature.
pub type Loop = unsafe extern "C" fn(*const Target, *const u32, u64, u64) -> u64;
/// A call target.
pub type Target = extern "C" fn(u64) -> u64;

unsafe extern "C" {
    pub fn rp_loop_direct(fns: *const Target, idx: *const u32, n: u64, x: u64) -> u64;
    pub fn rp_loop_plain(fns: *const Target, idx: *const u32, n: u64, x: u64) -> u64;
    pub fn rp_loop_thunk(fns: *const Target, idx: *const u32, n: u64, x: u64) -> u64;
    pub fn rp_loop_inline(fns: *const Target, idx: *const u32, n: u64, x: u64) -> u64;
    static rp_loop_thunk_site: [u8; 0];
    static rp_loop_inline_site: [u8; 0];
}

#[unsafe(no_mangle)]
pub extern "C" fn rp_target0(x: u64) -> u64 {
    x.wrapping_mul(3).wrapping_add(1)
}

pub extern "C" fn rp_target1(x: u64) -> u64 {
    x.wrapping_mul(5).wrapping_add(2)
}

pub extern "C" fn rp_target2(x: u64) -> u64 {
    x.wrapping_mul(7).wrapping_add(3)
}

pub extern "C" fn rp_target3(x: u64) -> u64 {
    x ^ (x >> 7)
}

/// The four targets, in table order.
pub const TARGETS: [Target; 4] = [rp_target0, rp_target1, rp_target2, rp_target3];

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

/// Runs `f` over `idx` (all of it) from `x`.
pub fn run(f: Loop, idx: &[u32], x: u64) -> u64 {
    // SAFETY: the loops read `idx.len()` indices below 4 and call the
    // four valid targets.
    unsafe { f(TARGETS.as_ptr(), idx.as_ptr(), idx.len() as u64, x) }
}
