//! Retpoline thunks compiled into the program itself: LLVM's
//! `__llvm_retpoline_<reg>` (a local copy in each binary built with
//! `-Zretpoline` / `+retpoline-indirect-calls` / clang `-mretpoline`),
//! GCC's local `__x86_indirect_thunk_<reg>` (`-mindirect-branch=thunk`),
//! or either body under any alias name. They are found as the targets of
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
use crate::image::Image;
use crate::poke::short_eq;
use crate::sites::{Site, SiteKind};
use crate::x86::{self, Reg};

/// The `call` that starts the body: 5 bytes.
const HEAD: usize = 5;

/// A recognised local thunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct LocalThunk {
    pub addr: usize,
    pub reg: Reg,
    /// The displacement of the body's `call` (7 or 11).
    disp: u8,
}

impl LocalThunk {
    /// The 5-byte head in `mode`, or why that mode keeps the generic head.
    pub(super) fn head(&self, mode: Mode) -> ([u8; HEAD], Option<&'static str>) {
        let generic = [0xe8, self.disp, 0, 0, 0];
        let mut h = [x86::INT3; HEAD];
        let jmp = x86::jmp_reg(self.reg);
        match mode {
            Mode::Generic => (generic, None),
            Mode::Plain => {
                h[..jmp.len()].copy_from_slice(&jmp);
                (h, None)
            }
            Mode::Lfence if x86::LFENCE.len() + jmp.len() <= HEAD => {
                h[..3].copy_from_slice(&x86::LFENCE);
                h[3..3 + jmp.len()].copy_from_slice(&jmp);
                (h, None)
            }
            Mode::Lfence => (
                generic,
                Some(
                    "lfence; jmp *%r8..%r15 does not fit the 5-byte head of a compiled-in \
                     thunk: kept as the full retpoline",
                ),
            ),
        }
    }

    /// Which mode's head `current` is, if any.
    pub(super) fn state(&self, current: &[u8]) -> Option<[u8; HEAD]> {
        [Mode::Generic, Mode::Plain, Mode::Lfence]
            .into_iter()
            .map(|m| self.head(m).0)
            .find(|h| short_eq(h, current))
    }
}

/// The body after the head, for a `call` displacement of `disp` and `reg`.
fn tail(disp: u8, reg: Reg) -> Option<Vec<u8>> {
    let mut t = alloc::vec![0xf3, 0x90, 0x0f, 0xae, 0xe8, 0xeb, 0xf9];
    match disp {
        7 => {}
        11 => t.extend_from_slice(&[0x0f, 0x1f, 0x40, 0x00]),
        _ => return None,
    }
    let n = reg as u8;
    let rex = if n < 8 { 0x48 } else { 0x4c };
    t.extend_from_slice(&[rex, 0x89, 0x04 | (n & 7) << 3, 0x24, x86::RET]);
    Some(t)
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
    let mut targets: Vec<(usize, Reg)> = sites
        .iter()
        .filter_map(|s| match s.kind {
            SiteKind::IndirectThunk(r) if !own.contains(&s.target) => Some((s.target, r)),
            _ => None,
        })
        .collect();
    targets.sort_unstable();
    targets.dedup();
    let mut found = Vec::new();
    let mut unknown = Vec::new();
    for (addr, reg) in targets {
        match recognise(image, addr, reg) {
            Some(t) => found.push(t),
            None => unknown.push((addr, reg)),
        }
    }
    (found, unknown)
}

fn recognise(image: &Image<'_>, addr: usize, reg: Reg) -> Option<LocalThunk> {
    for disp in [11u8, 7] {
        let tail = tail(disp, reg)?;
        if !image.contains_text(addr, HEAD + tail.len()) {
            continue;
        }
        // SAFETY: inside the image's text (checked just above), which its
        // constructor guarantees is readable.
        let bytes = unsafe { core::slice::from_raw_parts(addr as *const u8, HEAD + tail.len()) };
        let t = LocalThunk { addr, reg, disp };
        if bytes[HEAD..] == tail[..] && t.state(&bytes[..HEAD]).is_some() {
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
            tail(11, Reg::R11).unwrap(),
            [
                0xf3, 0x90, 0x0f, 0xae, 0xe8, 0xeb, 0xf9, 0x0f, 0x1f, 0x40, 0x00, 0x4c, 0x89, 0x1c,
                0x24, 0xc3
            ]
        );
        // GCC's __x86_indirect_thunk_rax (-mindirect-branch=thunk).
        assert_eq!(
            tail(7, Reg::Rax).unwrap(),
            [
                0xf3, 0x90, 0x0f, 0xae, 0xe8, 0xeb, 0xf9, 0x48, 0x89, 0x04, 0x24, 0xc3
            ]
        );
    }

    #[test]
    fn heads_per_mode() {
        let t = LocalThunk {
            addr: 0,
            reg: Reg::R11,
            disp: 11,
        };
        assert_eq!(t.head(Mode::Generic).0, [0xe8, 11, 0, 0, 0]);
        assert_eq!(t.head(Mode::Plain).0, [0x41, 0xff, 0xe3, 0xcc, 0xcc]);
        let (h, why) = t.head(Mode::Lfence);
        assert_eq!((h, why.is_some()), ([0xe8, 11, 0, 0, 0], true));
        let rax = LocalThunk {
            addr: 0,
            reg: Reg::Rax,
            disp: 7,
        };
        assert_eq!(
            rax.head(Mode::Lfence),
            ([0x0f, 0xae, 0xe8, 0xff, 0xe0], None)
        );
        // Every head is recognised as a state, nothing else is.
        for m in [Mode::Generic, Mode::Plain, Mode::Lfence] {
            assert!(rax.state(&rax.head(m).0).is_some());
        }
        assert!(rax.state(&[0x90; 5]).is_none());
    }
}
