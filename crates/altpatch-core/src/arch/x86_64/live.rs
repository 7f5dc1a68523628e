//! Which instruction swaps are safe for threads running them, and what a
//! trap handler must do in place of a site's new instruction: the x86-64
//! rules of live patching. The protocol that uses them (INT3 over the first
//! byte, three syncs) is `poke::live`, the same for any architecture whose
//! instructions may be longer than one store.

use core::fmt;

use super::{self as x86, BranchKind, Cond, INT3, Reg};

/// The `cs` segment override prefix.
const CS: u8 = 0x2e;
use crate::short::short_eq;

/// What a site's new instruction does, precomputed so a trap handler only
/// does arithmetic (no decoding, no allocation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Emulation {
    /// `call target`.
    Call(usize),
    /// `jmp target`.
    Jmp(usize),
    /// `jcc target`.
    Jcc(Cond, usize),
    /// A NOP: continue after the site.
    Nop,
    /// `ret`.
    Ret,
    /// `[lfence;] call *%reg`, returning to the end of the site.
    CallReg(Reg),
    /// `[lfence;] jmp *%reg`.
    JmpReg(Reg),
    /// `jcc` (the inverted condition over) `jmp *%reg`: jumps through the
    /// register when this condition holds, else continues after the site.
    JccReg(Cond, Reg),
    /// The same over `ret`: returns when this condition holds.
    JccRet(Cond),
}

/// One site being patched live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveSite {
    /// First byte.
    pub addr: usize,
    /// Length of the site (old and new instruction).
    pub len: usize,
    /// The new instruction.
    pub op: Emulation,
}

/// Why an edit cannot be patched live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LiveError {
    /// The bytes (old or new) are not exactly one instruction.
    NotOneInstruction {
        /// The site.
        addr: usize,
    },
    /// The new instruction is not one the trap handler can emulate (call,
    /// jmp, jcc, nop, lfence, ret and their register-indirect forms).
    NotEmulatable {
        /// The site.
        addr: usize,
    },
}

impl fmt::Display for LiveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LiveError::NotOneInstruction { addr } => write!(
                f,
                "site {addr:#x}: live patching needs exactly one instruction before and after"
            ),
            LiveError::NotEmulatable { addr } => write!(
                f,
                "site {addr:#x}: the new instruction is not a call, jmp, jcc, nop or ret"
            ),
        }
    }
}

impl LiveError {
    /// The address of the site the error is about, where it names one
    /// (see `altpatch::Error::site`).
    pub fn site(&self) -> Option<usize> {
        match self {
            LiveError::NotOneInstruction { addr } | LiveError::NotEmulatable { addr } => {
                Some(*addr)
            }
        }
    }
}

impl core::error::Error for LiveError {}

/// Whether `bytes` is one instruction, or an unconditional `ret`/`jmp`
/// followed only by `int3` filler; returns the first instruction.
fn single(bytes: &[u8], addr: usize) -> Option<iced_x86::Instruction> {
    let insn = x86::decode_one(bytes, addr as u64)?;
    if insn.len() == bytes.len() {
        return Some(insn);
    }
    let ends_flow = matches!(
        insn.mnemonic(),
        iced_x86::Mnemonic::Ret | iced_x86::Mnemonic::Jmp
    );
    (ends_flow && bytes[insn.len()..].iter().all(|&b| b == INT3)).then_some(insn)
}

/// The number of `cs` prefixes (`2e`) `b` starts with.
fn cs_prefixes(b: &[u8]) -> usize {
    b.iter().take_while(|&&x| x == CS).count()
}

/// `call *%reg` / `jmp *%reg` at the start of `b`, after any `cs`
/// prefixes (a prefixed site's `call` is padded with them): (is_call, reg,
/// length).
fn reg_branch(b: &[u8]) -> Option<(bool, Reg, usize)> {
    let cs = cs_prefixes(b);
    let (rex, op) = match &b[cs..] {
        [0x41, 0xff, op, ..] => (8, *op),
        [0xff, op, ..] => (0, *op),
        _ => return None,
    };
    let len = cs + if rex == 8 { 3 } else { 2 };
    match op {
        0xd0..=0xd7 => Some((true, Reg::from_number(rex + op - 0xd0)?, len)),
        0xe0..=0xe7 => Some((false, Reg::from_number(rex + op - 0xe0)?, len)),
        _ => None,
    }
}

/// What `bytes` at `addr` does, for the forms this crate writes, without
/// decoding: NOP5; `call`/`jmp rel32`; `ret` + `int3` filler; `[lfence or
/// NOP;] [cs...] call *%reg [NOP]`; `[lfence or NOP;] jmp *%reg [int3s]`;
/// inverted `jcc rel8` to the end over `[lfence or NOP3;] jmp *%reg` or
/// `ret`.
fn quick_new(bytes: &[u8], addr: usize) -> Option<Emulation> {
    if short_eq(bytes, &x86::NOP5) {
        return Some(Emulation::Nop);
    }
    if let Some((kind, t)) = super::site::rel32_branch(bytes, addr) {
        return Some(match kind {
            BranchKind::Call => Emulation::Call(t),
            _ => Emulation::Jmp(t),
        });
    }
    let filler = |rest: &[u8]| rest.iter().all(|&b| b == INT3);
    if bytes.first() == Some(&x86::RET) && filler(&bytes[1..]) {
        return Some(Emulation::Ret);
    }
    // An inverted jcc rel8 that skips to the end of the site.
    if let [op @ 0x70..=0x7f, rel, rest @ ..] = bytes {
        if *rel as usize == bytes.len() - 2 {
            let cond = Cond::from_nibble(op & 0xf).inverted();
            if rest.first() == Some(&x86::RET) && filler(&rest[1..]) {
                return Some(Emulation::JccRet(cond));
            }
            // `[lfence or NOP3;] jmp *%reg` (the filler where lfence fits).
            let rest = match rest {
                [0x0f, 0xae, 0xe8, tail @ ..] | [0x0f, 0x1f, 0x00, tail @ ..] => tail,
                _ => rest,
            };
            if let Some((false, r, n)) = reg_branch(rest)
                && filler(&rest[n..])
            {
                return Some(Emulation::JccReg(cond, r));
            }
        }
        return None;
    }
    // `lfence` or one NOP before the branch (the retpoline forms).
    let body = match bytes.strip_prefix(&x86::LFENCE[..]) {
        Some(rest) => rest,
        None => (1..bytes.len())
            // The branch's two or three bytes first: a NOP compare per
            // candidate offset only where a branch starts.
            .find(|&k| {
                reg_branch(&bytes[k..]).is_some()
                    && x86::nop(k).is_some_and(|n| short_eq(n, &bytes[..k]))
            })
            .map_or(bytes, |k| &bytes[k..]),
    };
    let (is_call, r, n) = reg_branch(body)?;
    if is_call {
        // The rest is padding run after the call returns: one NOP.
        // A NOP after the call (run after it returns) is skipped: the
        // emulated call returns to the site's end.
        let rest = &body[n..];
        (rest.is_empty() || x86::is_single_nop(rest)).then_some(Emulation::CallReg(r))
    } else {
        filler(&body[n..]).then_some(Emulation::JmpReg(r))
    }
}

/// Whether `bytes` is one instruction no thread can be inside or return
/// into the middle of (recognised without decoding for the common forms).
#[inline]
fn quick_old(bytes: &[u8]) -> bool {
    // `cs` prefixes first: `cs call rel32` is the generic thunk head, the
    // first edit of every start-up (recognised here, start-up builds no
    // decoder at all), and a prefixed site's original branch.
    let branch = &bytes[cs_prefixes(bytes)..];
    short_eq(bytes, &x86::NOP5)
        || (branch.len() == 5 && (branch[0] == 0xe8 || branch[0] == 0xe9))
        || (branch.len() == 6 && branch[0] == 0x0f && (0x80..=0x8f).contains(&branch[1]))
        || (bytes.first() == Some(&x86::RET) && bytes[1..].iter().all(|&b| b == INT3))
        || matches!(reg_branch(bytes), Some((false, _, n)) if bytes[n..].iter().all(|&b| b == INT3))
}

/// Checks that `old` (at `addr`) is one instruction, so no running thread
/// is inside it or holds a return address into its middle.
#[inline]
#[doc(hidden)]
pub fn check_old(addr: usize, old: &[u8]) -> Result<(), LiveError> {
    if quick_old(old) {
        Ok(())
    } else {
        check_old_decoded(addr, old)
    }
}

/// [`check_old`] for the forms `quick_old` does not know: decoded.
#[inline(never)]
fn check_old_decoded(addr: usize, old: &[u8]) -> Result<(), LiveError> {
    // A `call` other than the whole site would leave return addresses
    // inside it.
    let insn = single(old, addr).ok_or(LiveError::NotOneInstruction { addr })?;
    if insn.mnemonic() == iced_x86::Mnemonic::Call && insn.len() != old.len() {
        return Err(LiveError::NotOneInstruction { addr });
    }
    Ok(())
}

/// Checks that replacing `old` by `new` at `addr` is safe for threads
/// running the code when the change is published in one step (a page
/// swap): `old` is one instruction (no thread is inside it), and `new`
/// decodes to whole instructions ending exactly at the end of the site. No
/// emulation is needed, so `new` may be any instruction.
///
/// ```
/// use altpatch::poke::live::check_swap;
/// let nop5 = [0x0f, 0x1f, 0x44, 0x00, 0x00];
/// let call = [0xe8, 0, 0, 0, 0];
/// assert!(check_swap(0x1000, &nop5, &call).is_ok());
/// assert!(check_swap(0x1000, &nop5, &[0xb8, 1, 0, 0, 0]).is_ok()); // mov eax, 1
/// assert!(check_swap(0x1000, &[0x90; 5], &call).is_err()); // five instructions
/// assert!(check_swap(0x1000, &nop5, &[0xe8, 0, 0]).is_err()); // truncated
/// ```
pub fn check_swap(addr: usize, old: &[u8], new: &[u8]) -> Result<(), LiveError> {
    check_old(addr, old)?;
    check_new_whole(addr, new)
}

/// The half of [`check_swap`] about `new`: it decodes to whole
/// instructions ending exactly at the end of the site. The verdict
/// depends on the bytes alone, not on `addr` (which only names the site).
#[doc(hidden)]
pub fn check_new_whole(addr: usize, new: &[u8]) -> Result<(), LiveError> {
    if quick_new(new, addr).is_some() {
        return Ok(());
    }
    let mut at = 0;
    while at < new.len() {
        let insn = x86::decode_one(&new[at..], (addr + at) as u64)
            .ok_or(LiveError::NotOneInstruction { addr })?;
        at += insn.len();
    }
    if at == new.len() {
        Ok(())
    } else {
        Err(LiveError::NotOneInstruction { addr })
    }
}

impl LiveSite {
    /// Checks that `old` (at `addr`) is one instruction — so no thread is
    /// inside it, or holds a return address into it — and that `new` can be
    /// emulated.
    pub fn new(addr: usize, old: &[u8], new: &[u8]) -> Result<LiveSite, LiveError> {
        check_old(addr, old)?;
        if let Some(op) = quick_new(new, addr) {
            return Ok(LiveSite {
                addr,
                len: new.len(),
                op,
            });
        }
        let insn = single(new, addr).ok_or(LiveError::NotOneInstruction { addr })?;
        let op = if let Some(b) = x86::rel_branch_of(&insn) {
            match b.kind {
                BranchKind::Call => Emulation::Call(b.target as usize),
                BranchKind::Jmp => Emulation::Jmp(b.target as usize),
                BranchKind::Jcc(cc) => Emulation::Jcc(cc, b.target as usize),
            }
        } else if insn.mnemonic() == iced_x86::Mnemonic::Nop {
            Emulation::Nop
        } else if insn.mnemonic() == iced_x86::Mnemonic::Lfence {
            // Continuing after it is its effect: the trap and the return
            // from it serialize more than lfence does.
            Emulation::Nop
        } else if insn.code() == iced_x86::Code::Retnq {
            Emulation::Ret
        } else {
            return Err(LiveError::NotEmulatable { addr });
        };
        Ok(LiveSite {
            addr,
            len: new.len(),
            op,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_sites() {
        let a = 0x1000;
        let call = x86::call_rel32(a, 0x2000).unwrap();
        let s = LiveSite::new(a, &x86::NOP5, &call).unwrap();
        assert_eq!(s.op, Emulation::Call(0x2000));
        let s = LiveSite::new(a, &call, &x86::NOP5).unwrap();
        assert_eq!(s.op, Emulation::Nop);
        let s = LiveSite::new(a, &call, &[0xc3, 0xcc, 0xcc, 0xcc, 0xcc]).unwrap();
        assert_eq!(s.op, Emulation::Ret);
        assert!(LiveSite::new(a, &[0x90; 5], &x86::NOP5).is_err());
        assert!(LiveSite::new(a, &x86::NOP5, &[0xb8, 1, 0, 0, 0]).is_err());
        // Retpoline forms: call *%r11 + NOP, lfence; call *%rax, jcc over jmp.
        let s = LiveSite::new(a, &call, &[0x41, 0xff, 0xd3, 0x66, 0x90]).unwrap();
        assert_eq!(s.op, Emulation::CallReg(Reg::R11));
        let s = LiveSite::new(a, &call, &[0x0f, 0xae, 0xe8, 0xff, 0xd0]).unwrap();
        assert_eq!(s.op, Emulation::CallReg(Reg::Rax));
        let jne = x86::jcc_rel32(Cond::Ne, a, 0x2000).unwrap();
        let s = LiveSite::new(a, &jne, &[0x74, 4, 0x41, 0xff, 0xe3, 0xcc]).unwrap();
        assert_eq!(s.op, Emulation::JccReg(Cond::Ne, Reg::R11));
        // The filler-first forms, and lfence <-> NOP3 on their own.
        let s = LiveSite::new(a, &call, &[0x0f, 0x1f, 0x00, 0xff, 0xd0]).unwrap();
        assert_eq!(s.op, Emulation::CallReg(Reg::Rax));
        let s = LiveSite::new(a, &call, &[0x66, 0x90, 0x41, 0xff, 0xe3]).unwrap();
        assert_eq!(s.op, Emulation::JmpReg(Reg::R11));
        let s = LiveSite::new(a, &x86::LFENCE, &[0x0f, 0x1f, 0x00]).unwrap();
        assert_eq!((s.op, s.len), (Emulation::Nop, 3));
        let s = LiveSite::new(a, &[0x0f, 0x1f, 0x00], &x86::LFENCE).unwrap();
        assert_eq!((s.op, s.len), (Emulation::Nop, 3));
        let s = LiveSite::new(a, &jne, &[0x74, 4, 0xc3, 0xcc, 0xcc, 0xcc]).unwrap();
        assert_eq!(s.op, Emulation::JccRet(Cond::Ne));
        // Un-inlining is refused: a thread may return into the old site.
        assert!(LiveSite::new(a, &[0x41, 0xff, 0xd3, 0x66, 0x90], &call).is_err());
        assert!(LiveSite::new(a, &[0x0f, 0xae, 0xe8, 0xff, 0xe0], &call).is_err());
    }

    #[test]
    fn every_filler_before_a_register_branch_is_recognised() {
        for r in Reg::ALL {
            for (branch, call) in [(x86::call_reg(r), true), (x86::jmp_reg(r), false)] {
                let want = if call {
                    Emulation::CallReg(r)
                } else {
                    Emulation::JmpReg(r)
                };
                let fillers = (1..=6).filter_map(x86::nop).chain([&x86::LFENCE[..]]);
                for filler in fillers.chain([&[][..]]) {
                    let site = [filler, &branch[..]].concat();
                    assert_eq!(quick_new(&site, 0x1000), Some(want), "{site:x?}");
                }
                // Not one filler (two NOPs, a `mov`): not a form this
                // crate writes.
                for head in [&[0x90, 0x90][..], &[0x89, 0xc0]] {
                    let site = [head, &branch[..]].concat();
                    assert_eq!(quick_new(&site, 0x1000), None, "{site:x?}");
                }
            }
        }
    }

    #[test]
    fn prefixed_sites_and_their_forms() {
        let a = 0x1000;
        // The original `cs call`/`cs jmp`/`cs jcc` is one instruction.
        let cs_call = [&[CS][..], &x86::call_rel32(a + 1, 0x2000).unwrap()].concat();
        let cs_jne = [&[CS][..], &x86::jcc_rel32(Cond::Ne, a + 1, 0x2000).unwrap()].concat();
        // lfence; call *%r8, and its plain form NOP3; call *%r8.
        let s = LiveSite::new(a, &cs_call, &[0x0f, 0xae, 0xe8, 0x41, 0xff, 0xd0]).unwrap();
        assert_eq!(s.op, Emulation::CallReg(Reg::R8));
        let s = LiveSite::new(a, &cs_call, &[0x0f, 0x1f, 0x00, 0x41, 0xff, 0xd0]).unwrap();
        assert_eq!(s.op, Emulation::CallReg(Reg::R8));
        // Beyond the filler: `cs` on a call, `int3` after a jmp.
        let s = LiveSite::new(a, &cs_call, &[0x0f, 0x1f, 0x00, CS, 0xff, 0xd0]).unwrap();
        assert_eq!(s.op, Emulation::CallReg(Reg::Rax));
        let s = LiveSite::new(a, &cs_call, &[0x0f, 0xae, 0xe8, 0xff, 0xe0, 0xcc]).unwrap();
        assert_eq!(s.op, Emulation::JmpReg(Reg::Rax));
        // jcc over lfence; jmp *%rax, in 7 bytes.
        let s = LiveSite::new(a, &cs_jne, &[0x74, 5, 0x0f, 0xae, 0xe8, 0xff, 0xe0]).unwrap();
        assert_eq!(s.op, Emulation::JccReg(Cond::Ne, Reg::Rax));
        // A routed return site keeps its prefix: `cs jmp rel32`.
        let cs_jmp = [&[CS][..], &x86::jmp_rel32(a + 1, 0x3000).unwrap()].concat();
        let s = LiveSite::new(a, &cs_call, &cs_jmp).unwrap();
        assert_eq!(s.op, Emulation::Jmp(0x3000));
        // A prefix other than `cs` before the register branch is not ours.
        assert_eq!(quick_new(&[0x0f, 0x1f, 0x00, 0x3e, 0xff, 0xd0], a), None);
    }
}
