//! The x86-64 signal frame as the trap handler reads and writes it: the
//! `ucontext_t` general registers to and from a [`TrapFrame`]. A second
//! architecture adds its own file beside this one (and one `cfg` line in
//! `trap.rs`).

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

/// The interrupted registers.
#[inline(always)]
pub(super) fn read(uc: &libc::ucontext_t) -> TrapFrame {
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
pub(super) fn write_emulated(uc: &mut libc::ucontext_t, frame: &TrapFrame) {
    let gregs = &mut uc.uc_mcontext.gregs;
    gregs[libc::REG_RIP as usize] = frame.rip as i64;
    gregs[libc::REG_RSP as usize] = frame.rsp as i64;
}

/// Resumes at the site, to run it again as it is now.
#[inline(always)]
pub(super) fn write_restarted(uc: &mut libc::ucontext_t, frame: &TrapFrame) {
    uc.uc_mcontext.gregs[libc::REG_RIP as usize] = frame.rip as i64;
}
