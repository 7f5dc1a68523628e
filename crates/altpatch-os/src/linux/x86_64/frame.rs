//! The x86-64 signal frame as the trap handler reads and writes it (the
//! `ucontext_t` general registers to and from a [`TrapFrame`]), and its
//! one way out to another handler (`call3`).

use crate::poke::live::TrapFrame;

/// gregs index of each register by encoding number.
const GREG: [libc::c_int; 16] = [
    libc::REG_RAX,
    libc::REG_RCX,
    libc::REG_RDX,
    libc::REG_RBX,
    libc::REG_RSP,
    libc::REG_RBP,
    libc::REG_RSI,
    libc::REG_RDI,
    libc::REG_R8,
    libc::REG_R9,
    libc::REG_R10,
    libc::REG_R11,
    libc::REG_R12,
    libc::REG_R13,
    libc::REG_R14,
    libc::REG_R15,
];

/// Whether a `SIGTRAP` with this `si_code` is a breakpoint instruction's
/// (`int3` raises it with `SI_KERNEL`), the only kind the handler claims.
#[inline(always)]
pub(in crate::linux) fn is_breakpoint(si_code: libc::c_int) -> bool {
    si_code == libc::SI_KERNEL
}

/// The interrupted registers.
#[inline(always)]
pub(in crate::linux) fn read(uc: &libc::ucontext_t) -> TrapFrame {
    let gregs = &uc.uc_mcontext.gregs;
    TrapFrame {
        rip: gregs[libc::REG_RIP as usize] as u64,
        rsp: gregs[libc::REG_RSP as usize] as u64,
        rflags: gregs[libc::REG_EFL as usize] as u64,
        regs: GREG.map(|g| gregs[g as usize] as u64),
    }
}

/// Resumes at an emulated instruction's outcome: its new `rip` and (for a
/// call or ret) `rsp`; the return address a call pushed is already in the
/// thread's stack memory.
#[inline(always)]
pub(in crate::linux) fn write_emulated(uc: &mut libc::ucontext_t, frame: &TrapFrame) {
    let gregs = &mut uc.uc_mcontext.gregs;
    gregs[libc::REG_RIP as usize] = frame.rip as i64;
    gregs[libc::REG_RSP as usize] = frame.rsp as i64;
}

/// Resumes at the site, to run it again as it is now.
#[inline(always)]
pub(in crate::linux) fn write_restarted(uc: &mut libc::ucontext_t, frame: &TrapFrame) {
    uc.uc_mcontext.gregs[libc::REG_RIP as usize] = frame.rip as i64;
}

/// Calls the C function at `f` with three integer arguments, with an
/// indirect call written in assembly.
///
/// This handler runs while sites are being rewritten. In a program built
/// with retpolines every indirect call the *compiler* emits (including calls
/// to other crates' functions through the GOT) is a call to a thunk — a site
/// that may hold an `int3` at this moment, and a trap inside the `SIGTRAP`
/// handler kills the process. The handler's own path is therefore kept free
/// of compiler-emitted indirect branches: the lookup is inlined, and calls
/// out go through here.
///
/// # Safety
///
/// `f` must be a function taking (up to) three integer arguments in the C
/// calling convention that is safe to call with these values. Called only
/// from the `SIGTRAP` handler (the record names it).
#[inline(always)]
pub(in crate::linux) unsafe fn call3(f: usize, a: usize, b: usize, c: usize) {
    // SAFETY: the stack is aligned for a call at an asm block (no
    // `nostack`, so the compiler keeps the red zone out of our way); the
    // callee follows the C ABI, whose clobbers are declared.
    unsafe {
        core::arch::asm!(
            "2:",
            "call {f}",
            // An intended indirect call (it must not be a thunk site, see
            // above): recorded so `altpatch audit` does not report it. The
            // record is linked to the handler's section ("o"), not retained
            // by itself: a program that never installs the handler (one
            // that only patches at load) sheds handler and record together.
            concat!(
                ".pushsection ",
                altpatch_core::__altpatch_section!(indirect_ok),
                ",\"ao\",@progbits,{handler}"
            ),
            ".balign 4",
            ".long 2b - .",
            ".popsection",
            f = in(reg) f,
            handler = sym super::super::trap::on_sigtrap,
            in("rdi") a,
            in("rsi") b,
            in("rdx") c,
            clobber_abi("C"),
        );
    }
}
