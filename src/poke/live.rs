//! Patching instructions other threads may be executing: the INT3 protocol.
//!
//! Writing a multi-byte instruction is not atomic for a CPU fetching it. The
//! protocol makes every intermediate state safe:
//!
//! ```text
//! 1. write int3 (cc) over the first byte of every site     sync
//! 2. write all bytes but the first                          sync
//! 3. write the first bytes                                  sync
//! ```
//!
//! After step 1 no thread can start a site's old instruction: it traps on
//! `int3`. The trap handler finds the site and *emulates the new
//! instruction* on the interrupted context (call: push the return address
//! and jump; jmp: jump; jcc: jump if taken; nop: skip; ret: pop), then
//! resumes. Three syncs per batch, however many sites.
//!
//! Each site must be exactly one instruction before and after (a NOP of any
//! length, or `ret`/`jmp` followed by `int3` filler, counts as one), so no
//! thread is ever inside a changed instruction.
//!
//! * [`Int3Poke`] runs the protocol over any in-place [`TextPoke`]; a kernel
//!   supplies the sync (IPIs) and, in its `#BP` handler, calls
//!   [`LiveSites::emulate`] with the trapping context.
//! * In a Linux process, [`LinuxPoke`](super::LinuxPoke) with
//!   [`Publish::Live`](super::Publish::Live) runs it with
//!   `membarrier(SYNC_CORE)` and a `SIGTRAP` handler that emulates sites
//!   and passes any other trap to the previously installed handler.

use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;

use super::{PokeError, TextPoke};
use crate::x86::{self, BranchKind, Cond, INT3, Reg};

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

/// `call *%reg` / `jmp *%reg` at the start of `b`: (is_call, reg, length).
fn reg_branch(b: &[u8]) -> Option<(bool, Reg, usize)> {
    let (rex, op) = match b {
        [0x41, 0xff, op, ..] => (8, *op),
        [0xff, op, ..] => (0, *op),
        _ => return None,
    };
    let len = if rex == 8 { 3 } else { 2 };
    match op {
        0xd0..=0xd7 => Some((true, Reg::from_number(rex + op - 0xd0)?, len)),
        0xe0..=0xe7 => Some((false, Reg::from_number(rex + op - 0xe0)?, len)),
        _ => None,
    }
}

/// What `bytes` at `addr` does, for the forms this crate writes, without
/// decoding: NOP5; `call`/`jmp rel32`; `ret` + `int3` filler; `[lfence or
/// NOP;] call *%reg [NOP]`; `[lfence or NOP;] jmp *%reg [int3s]`; inverted
/// `jcc rel8` to the end over `jmp *%reg` or `ret`.
fn quick_new(bytes: &[u8], addr: usize) -> Option<Emulation> {
    if bytes == x86::NOP5 {
        return Some(Emulation::Nop);
    }
    if bytes.len() == 5 && (bytes[0] == 0xe8 || bytes[0] == 0xe9) {
        let d = i32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        let t = (addr as i64 + 5 + d as i64) as usize;
        return Some(if bytes[0] == 0xe8 {
            Emulation::Call(t)
        } else {
            Emulation::Jmp(t)
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
            .find(|&k| x86::nop(k) == Some(&bytes[..k]) && reg_branch(&bytes[k..]).is_some())
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
fn quick_old(bytes: &[u8]) -> bool {
    bytes == x86::NOP5
        || (bytes.len() == 5 && (bytes[0] == 0xe8 || bytes[0] == 0xe9))
        || (bytes.len() == 6 && bytes[0] == 0x0f && (0x80..=0x8f).contains(&bytes[1]))
        || (bytes.first() == Some(&x86::RET) && bytes[1..].iter().all(|&b| b == INT3))
        || matches!(reg_branch(bytes), Some((false, _, n)) if bytes[n..].iter().all(|&b| b == INT3))
}

/// Checks that `old` (at `addr`) is one instruction, so no running thread
/// is inside it or holds a return address into its middle.
fn check_old(addr: usize, old: &[u8]) -> Result<(), LiveError> {
    if !quick_old(old) {
        // A `call` other than the whole site would leave return addresses
        // inside it.
        let insn = single(old, addr).ok_or(LiveError::NotOneInstruction { addr })?;
        if insn.mnemonic() == iced_x86::Mnemonic::Call && insn.len() != old.len() {
            return Err(LiveError::NotOneInstruction { addr });
        }
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

/// What a trap handler must do after [`LiveSites::emulate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrapAction {
    /// The frame was updated (and, for a call, a return address written
    /// below the stack pointer): resume with it.
    Emulated,
    /// The trap is not at a site of this batch.
    NotOurs,
}

/// The sites of a live batch, sorted by address, for trap handlers.
#[derive(Clone, Debug, Default)]
pub struct LiveSites {
    sites: Vec<LiveSite>,
}

// `find`, `emulate` and `cond_holds` are inlined into trap handlers: in a
// retpoline-built program a call to them could be an indirect-thunk site,
// possibly mid-patch (see `poke::linux::trap`).
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
        let next = (addr + site.len) as u64;
        match site.op {
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
        TrapAction::Emulated
    }
}

/// One step of the protocol, for [`run_protocol`]'s callback.
pub(crate) enum Step<'a> {
    /// Store these bytes at this address (in place).
    Write(usize, &'a [u8]),
    /// Make every CPU/thread observe the stores so far.
    Sync,
}

/// Runs the three phases over `sites` (address, new bytes), calling `step`
/// for each store and after each phase.
pub(crate) fn run_protocol(
    sites: &[(usize, &[u8])],
    mut step: impl FnMut(Step<'_>) -> Result<(), PokeError>,
) -> Result<(), PokeError> {
    for &(addr, _) in sites {
        step(Step::Write(addr, &[INT3]))?;
    }
    step(Step::Sync)?;
    for &(addr, new) in sites {
        if new.len() > 1 {
            step(Step::Write(addr + 1, &new[1..]))?;
        }
    }
    step(Step::Sync)?;
    for &(addr, new) in sites {
        step(Step::Write(addr, &new[..1]))?;
    }
    step(Step::Sync)
}

/// Runs the INT3 protocol over an in-place poke (one whose writes are
/// visible at once, like [`DirectPoke`](super::DirectPoke) or a kernel's
/// alias poke).
///
/// Writes are collected until [`commit`](TextPoke::commit), which runs the
/// three phases as three batches of the inner poke, each followed by its
/// `sync`. The sites being patched are available from
/// [`active`](Int3Poke::active) while commit runs, for the embedder's `#BP`
/// handler (set it up before committing: [`Int3Poke::set_hook`]).
///
/// ```
/// use altpatch::{DirectPoke, Edit, Expect, Plan, SyncMethod, poke::live::Int3Poke};
///
/// let mut text = vec![0x0fu8, 0x1f, 0x44, 0x00, 0x00, 0xc3];
/// let base = text.as_mut_ptr() as usize;
/// // SAFETY: `text` outlives the plan.
/// let mut plan = unsafe { Plan::with_text(base..base + 6) };
/// plan.push(Edit::jmp(base, Expect::Nop, base + 5));
/// // SAFETY: plain data; nothing executes it.
/// let inner = unsafe { DirectPoke::new(SyncMethod::Cpuid) };
/// let mut poke = Int3Poke::new(inner);
/// // SAFETY: as above.
/// unsafe { plan.apply(&mut poke) }.unwrap();
/// assert_eq!(text[..5], [0xe9, 0, 0, 0, 0]);
/// ```
pub struct Int3Poke<P> {
    inner: P,
    pages: Vec<Range<usize>>,
    pending: Vec<(usize, alloc::vec::Vec<u8>)>,
    live: LiveSites,
    hook: Option<fn(Option<&LiveSites>)>,
}

impl<P: TextPoke> Int3Poke<P> {
    /// Wraps `inner`, which must write in place.
    pub fn new(inner: P) -> Self {
        Int3Poke {
            inner,
            pages: Vec::new(),
            pending: Vec::new(),
            live: LiveSites::default(),
            hook: None,
        }
    }

    /// Registers `hook`, called with the batch's sites just before phase 1
    /// and with `None` after phase 3's sync: the place to publish the table
    /// to a `#BP` handler.
    pub fn set_hook(&mut self, hook: fn(Option<&LiveSites>)) {
        self.hook = Some(hook);
    }

    /// The sites of the batch being committed.
    pub fn active(&self) -> &LiveSites {
        &self.live
    }

    /// The wrapped poke.
    pub fn into_inner(self) -> P {
        self.inner
    }
}

// SAFETY: every byte written reaches the inner in-place poke through the
// protocol, whose intermediate states are all safe for running threads
// (int3 at sites, emulated by the embedder's handler), ending with exactly
// the batch's bytes and a sync.
unsafe impl<P: TextPoke> TextPoke for Int3Poke<P> {
    fn begin(&mut self, pages: &[Range<usize>]) -> Result<(), PokeError> {
        self.pages.clear();
        self.pages.extend_from_slice(pages);
        self.pending.clear();
        Ok(())
    }

    unsafe fn write(&mut self, addr: usize, bytes: &[u8]) -> Result<(), PokeError> {
        let mut old = alloc::vec![0u8; bytes.len()];
        // SAFETY: the plan only writes inside its text, which is readable.
        unsafe { self.inner.read(addr, &mut old) }?;
        LiveSite::new(addr, &old, bytes).map_err(|_| {
            PokeError::Unsupported("live patching needs one emulatable instruction per site")
        })?;
        self.pending.push((addr, bytes.to_vec()));
        Ok(())
    }

    fn commit(&mut self) -> Result<(), PokeError> {
        let mut table = Vec::with_capacity(self.pending.len());
        for (addr, new) in &self.pending {
            let mut old = alloc::vec![0u8; new.len()];
            // SAFETY: as in `write`.
            unsafe { self.inner.read(*addr, &mut old) }?;
            table.push(LiveSite::new(*addr, &old, new).map_err(|_| {
                PokeError::Unsupported("live patching needs one emulatable instruction per site")
            })?);
        }
        self.live = LiveSites::new(table);
        if let Some(h) = self.hook {
            h(Some(&self.live));
        }
        let sites: Vec<(usize, &[u8])> = self.pending.iter().map(|(a, b)| (*a, &b[..])).collect();
        let pages = &self.pages;
        let inner = &mut self.inner;
        let result = run_protocol(&sites, |step| match step {
            Step::Write(addr, bytes) => {
                inner.begin(pages)?;
                // SAFETY: inside the batch's pages; the protocol keeps every
                // intermediate state safe for running threads.
                unsafe { inner.write(addr, bytes) }?;
                inner.commit()
            }
            Step::Sync => inner.sync(),
        });
        if let Some(h) = self.hook {
            h(None);
        }
        self.pending.clear();
        result
    }

    fn abort(&mut self) {
        self.pending.clear();
    }

    fn sync(&mut self) -> Result<(), PokeError> {
        self.inner.sync()
    }

    fn reads_in_place(&self) -> bool {
        self.inner.reads_in_place()
    }

    fn method(&self) -> &'static str {
        "INT3 protocol"
    }

    unsafe fn read(&self, addr: usize, out: &mut [u8]) -> Result<(), PokeError> {
        // SAFETY: same contract, forwarded.
        unsafe { self.inner.read(addr, out) }
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
