//! What a trap handler does with a thread that hit a site mid-update: find
//! the site (sorted table, binary search) and emulate its new instruction on
//! the interrupted registers. Allocation-free and lock-free.

use alloc::vec::Vec;

use super::Cond;
#[cfg(test)]
use super::Reg;
use super::live::{Emulation, LiveSite};

/// The registers an emulation reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrapFrame {
    /// The instruction pointer *after* the `int3` (the site's address + 1).
    pub rip: u64,
    /// The stack pointer.
    pub rsp: u64,
    /// The flags.
    pub rflags: u64,
    /// The general registers by encoding number (`regs[4]` is unused:
    /// `rsp` is above), read by register-indirect emulations.
    pub regs: [u64; 16],
}

impl TrapFrame {
    /// The address of the trap instruction the thread executed: on x86-64
    /// `int3` leaves `rip` one byte past it.
    #[inline(always)]
    pub fn trap_site(&self) -> usize {
        self.rip.wrapping_sub(1) as usize
    }

    /// Makes the thread resume at `addr`, to run what is there now.
    #[inline(always)]
    pub fn restart_at(&mut self, addr: usize) {
        self.rip = addr as u64;
    }
}

/// What a trap handler must do after [`LiveSites::emulate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrapAction {
    /// The frame was updated (and, for a call, a return address written
    /// below the stack pointer): resume with it.
    Emulated,
    /// The trap is not at a site of this batch.
    NotOurs,
    /// The trap was at a site patched live earlier whose `int3` is gone
    /// now (its batch ended between the trap and the handler, or the CPU
    /// ran bytes it had fetched before the batch's last sync): `rip` now
    /// points at the site, to run it again as it is
    /// ([`TrapSlot::emulate`](crate::poke::live::TrapSlot::emulate) only).
    Restarted,
}

/// The sites of a live batch, sorted by address, for trap handlers.
#[derive(Clone, Debug, Default)]
pub struct LiveSites {
    sites: Vec<LiveSite>,
}

// `find`, `emulate` and `cond_holds` are inlined into trap handlers: in a
// retpoline-built program a call to them could be an indirect-thunk site,
// possibly mid-patch (see `os::linux::trap`).
#[inline(always)]
fn cond_holds(cc: Cond, f: u64) -> bool {
    let cf = f & 1 != 0;
    let pf = f & (1 << 2) != 0;
    let zf = f & (1 << 6) != 0;
    let sf = f & (1 << 7) != 0;
    let of = f & (1 << 11) != 0;
    match cc {
        Cond::O => of,
        Cond::No => !of,
        Cond::B => cf,
        Cond::Ae => !cf,
        Cond::E => zf,
        Cond::Ne => !zf,
        Cond::Be => cf || zf,
        Cond::A => !cf && !zf,
        Cond::S => sf,
        Cond::Ns => !sf,
        Cond::P => pf,
        Cond::Np => !pf,
        Cond::L => sf != of,
        Cond::Ge => sf == of,
        Cond::Le => zf || sf != of,
        Cond::G => !zf && sf == of,
    }
}

impl LiveSites {
    /// The table for `sites` (any order).
    pub fn new(mut sites: Vec<LiveSite>) -> LiveSites {
        sites.sort_unstable_by_key(|s| s.addr);
        LiveSites { sites }
    }

    /// The sites, by address.
    pub fn sites(&self) -> &[LiveSite] {
        &self.sites
    }

    /// The site starting at `addr`.
    #[inline(always)]
    pub fn find(&self, addr: usize) -> Option<&LiveSite> {
        self.sites
            .binary_search_by_key(&addr, |s| s.addr)
            .ok()
            .map(|i| &self.sites[i])
    }

    /// Emulates the new instruction of the site whose `int3` trapped,
    /// updating `frame`. Allocation-free and lock-free: callable from a
    /// signal or exception handler.
    ///
    /// ```
    /// use altpatch::poke::live::{LiveSite, LiveSites, TrapAction, TrapFrame};
    ///
    /// // A NOP5 at 0x1000 becoming `call 0x2000`, mid-update.
    /// let call = [0xe8, 0xfb, 0x0f, 0x00, 0x00];
    /// let site = LiveSite::new(0x1000, &[0x0f, 0x1f, 0x44, 0, 0], &call).unwrap();
    /// let sites = LiveSites::new(vec![site]);
    /// // A CPU trapped on the int3 at 0x1000, its stack in `stack`.
    /// let mut stack = [0u64; 4];
    /// let top = stack.as_mut_ptr() as u64 + 32;
    /// let mut frame = TrapFrame { rip: 0x1001, rsp: top, rflags: 0, regs: [0; 16] };
    /// // SAFETY: the 8 bytes below `rsp` are `stack`'s, writable.
    /// assert_eq!(unsafe { sites.emulate(&mut frame) }, TrapAction::Emulated);
    /// assert_eq!((frame.rip, frame.rsp), (0x2000, top - 8));
    /// assert_eq!(stack[3], 0x1005); // the return address
    /// ```
    ///
    /// # Safety
    ///
    /// For a call or ret, `frame.rsp` must be the interrupted thread's stack
    /// pointer, with the 8 bytes below it (call) or at it (ret) writable or
    /// readable as a real `call`/`ret` would need.
    #[inline(always)]
    pub unsafe fn emulate(&self, frame: &mut TrapFrame) -> TrapAction {
        let addr = frame.rip.wrapping_sub(1) as usize;
        let Some(site) = self.find(addr) else {
            return TrapAction::NotOurs;
        };
        // SAFETY: forwarded.
        unsafe { site.emulate(frame) };
        TrapAction::Emulated
    }
}

impl Emulation {
    /// Whether running this instruction from `rflags` pushes or pops a
    /// return address: a `call`, a `ret`, a conditional `ret` whose
    /// condition holds. Under a shadow stack such an instruction is never
    /// emulated: the emulated push or pop would not reach the shadow
    /// stack, and the callee's `ret` (or the caller's next one) would
    /// fault (`#CP`).
    ///
    /// ```
    /// use altpatch::poke::live::Emulation;
    /// use altpatch::x86::Cond;
    /// assert!(Emulation::Call(0x2000).uses_stack(0));
    /// assert!(Emulation::Ret.uses_stack(0));
    /// assert!(!Emulation::Jmp(0x2000).uses_stack(0));
    /// assert!(!Emulation::Nop.uses_stack(0));
    /// let zf = 1 << 6;
    /// assert!(Emulation::JccRet(Cond::E).uses_stack(zf)); // taken: returns
    /// assert!(!Emulation::JccRet(Cond::E).uses_stack(0)); // falls through
    /// ```
    #[inline(always)]
    pub fn uses_stack(&self, rflags: u64) -> bool {
        match *self {
            Emulation::Call(_) | Emulation::CallReg(_) | Emulation::Ret => true,
            Emulation::JccRet(cc) => cond_holds(cc, rflags),
            Emulation::Jmp(_)
            | Emulation::Jcc(..)
            | Emulation::Nop
            | Emulation::JmpReg(_)
            | Emulation::JccReg(..) => false,
        }
    }
}

impl LiveSite {
    /// Whether running this site's new instruction from `frame` pushes or
    /// pops a return address ([`Emulation::uses_stack`]).
    #[inline(always)]
    pub fn uses_stack(&self, frame: &TrapFrame) -> bool {
        self.op.uses_stack(frame.rflags)
    }

    /// Applies this site's new instruction to `frame`, whose `rip` is the
    /// byte after the site's `int3`.
    ///
    /// # Safety
    ///
    /// As for [`LiveSites::emulate`].
    #[inline(always)]
    pub(crate) unsafe fn emulate(&self, frame: &mut TrapFrame) {
        let next = (self.addr + self.len) as u64;
        match self.op {
            Emulation::Nop => frame.rip = next,
            Emulation::Jmp(t) => frame.rip = t as u64,
            Emulation::Jcc(cc, t) => {
                frame.rip = if cond_holds(cc, frame.rflags) {
                    t as u64
                } else {
                    next
                }
            }
            Emulation::Call(t) => {
                let sp = frame.rsp - 8;
                // SAFETY: the caller guarantees the stack below rsp is
                // writable, as the `call` being emulated would write it.
                unsafe { (sp as *mut u64).write(next) };
                frame.rsp = sp;
                frame.rip = t as u64;
            }
            Emulation::Ret => {
                // SAFETY: the caller guarantees [rsp] is readable, as the
                // `ret` being emulated would read it.
                frame.rip = unsafe { (frame.rsp as *const u64).read() };
                frame.rsp += 8;
            }
            Emulation::CallReg(r) => {
                let sp = frame.rsp - 8;
                // SAFETY: as for Call. The return address is the site's end,
                // past the padding, so the return never lands on bytes the
                // protocol has not written yet.
                unsafe { (sp as *mut u64).write(next) };
                frame.rsp = sp;
                frame.rip = frame.regs[r as usize];
            }
            Emulation::JmpReg(r) => frame.rip = frame.regs[r as usize],
            Emulation::JccReg(cc, r) => {
                frame.rip = if cond_holds(cc, frame.rflags) {
                    frame.regs[r as usize]
                } else {
                    next
                }
            }
            Emulation::JccRet(cc) => {
                if cond_holds(cc, frame.rflags) {
                    // SAFETY: as for Ret.
                    frame.rip = unsafe { (frame.rsp as *const u64).read() };
                    frame.rsp += 8;
                } else {
                    frame.rip = next;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emulates_branches_and_flags() {
        let t = LiveSites::new(alloc::vec![
            LiveSite {
                addr: 0x100,
                len: 6,
                op: Emulation::Jcc(Cond::Ne, 0x200)
            },
            LiveSite {
                addr: 0x300,
                len: 5,
                op: Emulation::Nop
            },
        ]);
        let mut f = TrapFrame {
            rip: 0x101,
            rsp: 0,
            rflags: 1 << 6,
            regs: [0; 16],
        }; // ZF: not taken
        // SAFETY: no stack access for jcc/nop.
        assert_eq!(unsafe { t.emulate(&mut f) }, TrapAction::Emulated);
        assert_eq!(f.rip, 0x106);
        let mut f = TrapFrame {
            rip: 0x101,
            rsp: 0,
            rflags: 0,
            regs: [0; 16],
        };
        // SAFETY: as above.
        unsafe { t.emulate(&mut f) };
        assert_eq!(f.rip, 0x200);
        let mut f = TrapFrame {
            rip: 0x301,
            rsp: 0,
            rflags: 0,
            regs: [0; 16],
        };
        // SAFETY: as above.
        unsafe { t.emulate(&mut f) };
        assert_eq!(f.rip, 0x305);
        let mut f = TrapFrame {
            rip: 0x401,
            rsp: 0,
            rflags: 0,
            regs: [0; 16],
        };
        // SAFETY: as above.
        assert_eq!(unsafe { t.emulate(&mut f) }, TrapAction::NotOurs);
        // call pushes the return address.
        let mut stack = [0u64; 4];
        let t = LiveSites::new(alloc::vec![LiveSite {
            addr: 0x500,
            len: 5,
            op: Emulation::Call(0x900)
        }]);
        let top = stack.as_mut_ptr() as u64 + 32;
        let mut f = TrapFrame {
            rip: 0x501,
            rsp: top,
            rflags: 0,
            regs: [0; 16],
        };
        // SAFETY: the stack array has room below `top`.
        unsafe { t.emulate(&mut f) };
        assert_eq!((f.rip, f.rsp, stack[3]), (0x900, top - 8, 0x505));
    }

    #[test]
    fn emulates_register_branches() {
        let t = LiveSites::new(alloc::vec![
            LiveSite {
                addr: 0x100,
                len: 5,
                op: Emulation::CallReg(Reg::R11)
            },
            LiveSite {
                addr: 0x200,
                len: 5,
                op: Emulation::JmpReg(Reg::Rax)
            },
            LiveSite {
                addr: 0x300,
                len: 6,
                op: Emulation::JccReg(Cond::E, Reg::R10)
            },
            LiveSite {
                addr: 0x400,
                len: 6,
                op: Emulation::JccRet(Cond::Ne)
            },
        ]);
        let mut stack = [0u64; 4];
        let top = stack.as_mut_ptr() as u64 + 32;
        let mut regs = [0u64; 16];
        regs[Reg::R11 as usize] = 0xaaa;
        regs[Reg::Rax as usize] = 0xbbb;
        regs[Reg::R10 as usize] = 0xccc;
        let frame = |rip, rflags| TrapFrame {
            rip,
            rsp: top,
            rflags,
            regs,
        };
        let mut f = frame(0x101, 0);
        // SAFETY: the stack array has room below `top`.
        unsafe { t.emulate(&mut f) };
        assert_eq!((f.rip, f.rsp, stack[3]), (0xaaa, top - 8, 0x105));
        let mut f = frame(0x201, 0);
        // SAFETY: no stack access.
        unsafe { t.emulate(&mut f) };
        assert_eq!((f.rip, f.rsp), (0xbbb, top));
        let zf = 1 << 6;
        let mut f = frame(0x301, zf);
        // SAFETY: no stack access.
        unsafe { t.emulate(&mut f) };
        assert_eq!(f.rip, 0xccc, "je taken");
        let mut f = frame(0x301, 0);
        // SAFETY: no stack access.
        unsafe { t.emulate(&mut f) };
        assert_eq!(f.rip, 0x306, "je not taken");
        let mut f = frame(0x401, 0);
        f.rsp = top - 8;
        // SAFETY: [rsp] is the array's last element; ret reads it.
        unsafe {
            (f.rsp as *mut u64).write(0x777);
            t.emulate(&mut f)
        };
        assert_eq!((f.rip, f.rsp), (0x777, top), "jne ret taken");
        let mut f = frame(0x401, zf);
        // SAFETY: not taken: no stack access.
        unsafe { t.emulate(&mut f) };
        assert_eq!((f.rip, f.rsp), (0x406, top));
    }
}
