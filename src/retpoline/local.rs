//! Retpoline thunks compiled into the program itself: LLVM's
//! `__llvm_retpoline_<reg>` (a local copy in each binary built with
//! `-Zretpoline` / `+retpoline-indirect-calls` / clang `-mretpoline`),
//! GCC's local `__x86_indirect_thunk_<reg>` (`-mindirect-branch=thunk`),
//! another copy of this crate's thunk slots (a shared object that links
//! its own altpatch), or any of these under an alias name. They are found as the targets of
//! sites, recognised by their exact bytes, and only their first
//! instruction is rewritten per mode, so the edit is one instruction for
//! one (safe while other threads run).
//!
//! The body, from its entry:
//!
//! ```text
//!  0: e8 <d> 00 00 00     call 1f         d = 7 (GCC), 11 (LLVM)
//!  5: f3 90            2: pause
//!  7: 0f ae e8            lfence
//! 10: eb f9               jmp 2b
//! 12: 0f 1f 40 00         nopl (LLVM only: aligns the mov)
//! 5+d: 48|4c 89 /r 24  1: mov %reg, (%rsp)
//! 9+d: c3                 ret
//! ```
//!
//! This crate's slot is GCC's body behind a `cs` prefix (a 6-byte head,
//! see `thunks.rs`), whose forms per mode are the slot's own.
//!
//! Only the `call` at 0 is ever executed at the entry: a thread is never at
//! 5..5+d architecturally (that loop is reached only speculatively), and
//! the return address 5 it pushes is overwritten by the `mov` before the
//! `ret`. So replacing the `call` leaves every thread correct. Heads per
//! mode: generic keeps the `call`; plain is `jmp *%reg` + `int3` filler;
//! lfence is `lfence; jmp *%reg`, which fits the 5-byte head for `%rax` ..
//! `%rdi` only — for `%r8` .. `%r15` the full retpoline is kept (more
//! mitigation than asked, reported).

use alloc::vec::Vec;

use super::Mode;
use crate::arch::x86_64::{self as x86, Reg};
use crate::image::Image;
use crate::poke::short_eq;
use crate::sites::{Site, SiteKind};

/// Which compiler's body a thunk is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// `call +7`: GCC's.
    Gcc,
    /// `call +11` and a NOP aligning the `mov`: LLVM's.
    Llvm,
    /// `cs call +7`: a copy of this crate's slot.
    Slot,
}

impl Layout {
    fn head_len(self) -> usize {
        if self == Layout::Slot { 6 } else { 5 }
    }
}

/// A recognised local thunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct LocalThunk {
    pub addr: usize,
    pub reg: Reg,
    layout: Layout,
}

impl LocalThunk {
    /// The head's length (the bytes an edit may change).
    pub(super) fn head_len(&self) -> usize {
        self.layout.head_len()
    }

    /// The head in `mode`, or why that mode keeps the generic head.
    pub(super) fn head(&self, mode: Mode) -> (Vec<u8>, Option<&'static str>) {
        if self.layout == Layout::Slot {
            return (super::thunks::head(self.reg, mode).to_vec(), None);
        }
        let disp = if self.layout == Layout::Gcc { 7 } else { 11 };
        let generic = alloc::vec![0xe8, disp, 0, 0, 0];
        let jmp = x86::jmp_reg(self.reg);
        // The filler goes before the `jmp`, one instruction of the same
        // length in plain (a NOP) and lfence (`lfence`): moving between them
        // rewrites that instruction alone, never two (a thread may be
        // stopped right after the filler).
        let mut h = Vec::with_capacity(5);
        match mode {
            Mode::Generic => return (generic, None),
            Mode::Plain => {
                h.extend_from_slice(x86::nop(5 - jmp.len()).expect("a 2- or 3-byte NOP"))
            }
            Mode::Lfence if x86::LFENCE.len() + jmp.len() <= 5 => h.extend_from_slice(&x86::LFENCE),
            Mode::Lfence => {
                return (
                    generic,
                    Some(
                        "lfence; jmp *%r8..%r15 does not fit the 5-byte head of a compiled-in \
                         thunk: kept as the full retpoline",
                    ),
                );
            }
        }
        h.extend_from_slice(&jmp);
        (h, None)
    }

    /// Which mode's head `current` is, if any.
    pub(super) fn state(&self, current: &[u8]) -> Option<Vec<u8>> {
        [Mode::Generic, Mode::Plain, Mode::Lfence]
            .into_iter()
            .map(|m| self.head(m).0)
            .find(|h| short_eq(h, current))
    }
}

/// The body after the head, for `layout` and `reg`.
fn tail(layout: Layout, reg: Reg) -> Vec<u8> {
    let mut t = alloc::vec![0xf3, 0x90, 0x0f, 0xae, 0xe8, 0xeb, 0xf9];
    if layout == Layout::Llvm {
        t.extend_from_slice(&[0x0f, 0x1f, 0x40, 0x00]);
    }
    let n = reg as u8;
    let rex = if n < 8 { 0x48 } else { 0x4c };
    t.extend_from_slice(&[rex, 0x89, 0x04 | (n & 7) << 3, 0x24, x86::RET]);
    t
}

/// The local thunks `sites` reach: their targets outside `own` (this
/// crate's thunk array) whose bytes are a retpoline body for the site's
/// register, with a head in one of the three modes' forms. Targets that
/// are not: their addresses, to report (the sites themselves are planned
/// as usual).
pub(super) fn find(
    image: &Image<'_>,
    sites: &[Site],
    own: core::ops::Range<usize>,
) -> (Vec<LocalThunk>, Vec<(usize, Reg)>) {
    let targets = distinct_targets(sites, own);
    let mut found = Vec::new();
    let mut unknown = Vec::new();
    for (addr, reg) in targets {
        if plt_stub(image, addr) {
            // Another object's thunk, reached through this image's PLT:
            // that object patches its own.
            continue;
        }
        match recognise(image, addr, reg) {
            Some(t) => found.push(t),
            None => unknown.push((addr, reg)),
        }
    }
    (found, unknown)
}

/// The distinct (thunk, register) pairs `sites` branch to, outside `own`,
/// in address order.
///
/// A program has a few dozen thunks (one per register and name) and tens of
/// thousands of sites: each register remembers the last thunk a site used
/// with it, so a site costs one compare; only a new pair searches the short
/// list seen so far. Sorting a pair per site cost ~100 instructions per
/// site at start-up. Past `MAX_LINEAR` distinct pairs (not a real program)
/// the rest is collected and sorted instead.
fn distinct_targets(sites: &[Site], own: core::ops::Range<usize>) -> Vec<(usize, Reg)> {
    const MAX_LINEAR: usize = 64;
    let mut seen: Vec<(usize, Reg)> = Vec::new();
    let mut last = [usize::MAX; 16];
    for (i, s) in sites.iter().enumerate() {
        let SiteKind::IndirectThunk(r) = s.kind else {
            continue;
        };
        if last[r as usize & 15] == s.target || own.contains(&s.target) {
            continue;
        }
        last[r as usize & 15] = s.target;
        if !seen.contains(&(s.target, r)) {
            seen.push((s.target, r));
            if seen.len() > MAX_LINEAR {
                seen.extend(sites[i + 1..].iter().filter_map(|s| match s.kind {
                    SiteKind::IndirectThunk(r) if !own.contains(&s.target) => Some((s.target, r)),
                    _ => None,
                }));
                break;
            }
        }
    }
    seen.sort_unstable();
    seen.dedup();
    seen
}

/// Whether `addr` starts a PLT stub: `jmp *slot(%rip)` (`ff 25`), after
/// `endbr64` (`f3 0f 1e fa`) and/or `bnd` (`f2`) in the IBT/MPX forms.
pub(super) fn plt_stub(image: &Image<'_>, addr: usize) -> bool {
    if !image.contains_text(addr, 7) {
        return false;
    }
    // SAFETY: inside the image's text (checked above), readable.
    let b = unsafe { core::slice::from_raw_parts(addr as *const u8, 7) };
    let b = b.strip_prefix(&x86::ENDBR64[..]).unwrap_or(b);
    let b = b.strip_prefix(&[0xf2][..]).unwrap_or(b);
    b.starts_with(&[0xff, 0x25])
}

/// Whether a return thunk at `addr` returns at once: a bare `ret` (this
/// crate's), or a PLT stub (to the program's exported one, this crate's).
pub(super) fn returns_at_once(image: &Image<'_>, addr: usize) -> bool {
    plt_stub(image, addr)
        // SAFETY: one byte inside the image's text (checked first), readable.
        || (image.contains_text(addr, 1) && unsafe { *(addr as *const u8) } == x86::RET)
}

fn recognise(image: &Image<'_>, addr: usize, reg: Reg) -> Option<LocalThunk> {
    for layout in [Layout::Llvm, Layout::Gcc, Layout::Slot] {
        let (head, tail) = (layout.head_len(), tail(layout, reg));
        if !image.contains_text(addr, head + tail.len()) {
            continue;
        }
        // SAFETY: inside the image's text (checked just above), which its
        // constructor guarantees is readable.
        let bytes = unsafe { core::slice::from_raw_parts(addr as *const u8, head + tail.len()) };
        let t = LocalThunk { addr, reg, layout };
        if bytes[head..] == tail[..] && t.state(&bytes[..head]).is_some() {
            return Some(t);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_are_the_compilers_bytes() {
        // LLVM's __llvm_retpoline_r11, as rustc 1.95 emits it.
        assert_eq!(
            tail(Layout::Llvm, Reg::R11),
            [
                0xf3, 0x90, 0x0f, 0xae, 0xe8, 0xeb, 0xf9, 0x0f, 0x1f, 0x40, 0x00, 0x4c, 0x89, 0x1c,
                0x24, 0xc3
            ]
        );
        // GCC's __x86_indirect_thunk_rax (-mindirect-branch=thunk).
        assert_eq!(
            tail(Layout::Gcc, Reg::Rax),
            [
                0xf3, 0x90, 0x0f, 0xae, 0xe8, 0xeb, 0xf9, 0x48, 0x89, 0x04, 0x24, 0xc3
            ]
        );
    }

    #[test]
    fn this_crates_slots_are_recognised_as_another_copy_would_be() {
        let image = Image::current();
        for r in Reg::ALL.into_iter().filter(|&r| r != Reg::Rsp) {
            let t = recognise(&image, super::super::thunk(r).unwrap(), r).expect("a slot");
            assert_eq!((t.layout, t.head_len()), (Layout::Slot, 6), "{r}");
        }
    }

    #[test]
    fn heads_per_mode() {
        let t = LocalThunk {
            addr: 0,
            reg: Reg::R11,
            layout: Layout::Llvm,
        };
        assert_eq!(t.head(Mode::Generic).0, [0xe8, 11, 0, 0, 0]);
        assert_eq!(t.head(Mode::Plain).0, [0x66, 0x90, 0x41, 0xff, 0xe3]);
        let (h, why) = t.head(Mode::Lfence);
        assert_eq!((h, why.is_some()), (alloc::vec![0xe8, 11, 0, 0, 0], true));
        let rax = LocalThunk {
            addr: 0,
            reg: Reg::Rax,
            layout: Layout::Gcc,
        };
        assert_eq!(
            rax.head(Mode::Lfence),
            (alloc::vec![0x0f, 0xae, 0xe8, 0xff, 0xe0], None)
        );
        // Every head is recognised as a state, nothing else is.
        for m in [Mode::Generic, Mode::Plain, Mode::Lfence] {
            assert!(rax.state(&rax.head(m).0).is_some());
        }
        assert!(rax.state(&[0x90; 5]).is_none());
    }
}
