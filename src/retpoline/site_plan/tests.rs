//! The shape path and the general path agree on every shape, mode, return
//! policy, target and state.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::cell::UnsafeCell;

use super::*;
use crate::arch::x86_64::{self as x86, Cond};
use crate::retpoline::{return_thunk, thunk};

/// Text near this crate's thunks (a static: within rel32 of them), one
/// 16-byte slot per site, then targets that are not this crate's.
struct Text(UnsafeCell<[u8; SLOTS * 16 + 64]>);
// SAFETY: only the one test below touches it.
unsafe impl Sync for Text {}
const SLOTS: usize = 4096;
static TEXT: Text = Text(UnsafeCell::new([0; SLOTS * 16 + 64]));

/// A site's bytes in one of the states a site may be found in.
#[derive(Clone, Copy)]
enum State {
    Original,
    Inline(Mode),
    Garbage,
}

#[test]
fn the_shape_path_agrees_with_the_general_path() {
    let base = TEXT.0.get() as usize;
    let tail = base + SLOTS * 16;
    // SAFETY: the test's own static, nothing else reads or writes it.
    let text = unsafe { &mut *TEXT.0.get() };
    // Foreign targets: a bare `ret`, a PLT stub, and bytes that are neither.
    let (ret, plt, other) = (tail, tail + 8, tail + 24);
    text[ret - base] = x86::RET;
    text[plt - base..plt - base + 6].copy_from_slice(&[0xff, 0x25, 0, 0, 0, 0]);
    text[other - base..other - base + 2].copy_from_slice(&[0x0f, 0x0b]);

    let mut sites = Vec::new();
    let kinds = Reg::ALL
        .into_iter()
        .filter(|&r| r != Reg::Rsp)
        .map(SiteKind::IndirectThunk)
        .chain([SiteKind::ReturnThunk]);
    let states = [
        State::Original,
        State::Inline(Mode::Plain),
        State::Inline(Mode::Lfence),
        State::Garbage,
    ];
    for kind in kinds {
        let own = match kind {
            SiteKind::IndirectThunk(r) => thunk(r).unwrap(),
            _ => return_thunk(),
        };
        for form in [
            BranchKind::Call,
            BranchKind::Jmp,
            BranchKind::Jcc(Cond::E),
            BranchKind::Jcc(Cond::G),
        ] {
            // No `cs` prefix up to three: with three, a `jcc` site is 9
            // bytes, beyond the shapes (the general path alone).
            for (target, prefixes) in [own, ret, plt, other]
                .into_iter()
                .flat_map(|t| (0..4).map(move |p| (t, p)))
            {
                for state in states {
                    let addr = base + sites.len() * 16;
                    let len = if form == BranchKind::Call || form == BranchKind::Jmp {
                        5 + prefixes
                    } else {
                        6 + prefixes
                    };
                    let site = Site {
                        addr,
                        len,
                        form,
                        kind,
                        target,
                    };
                    let bytes = match state {
                        State::Original => original_form(&site).map(|e| e.to_vec()),
                        State::Inline(m) => inline_form(&site, m).ok().map(|e| e.to_vec()),
                        State::Garbage => Some(alloc::vec![0x0f, 0x0b, 0xcc, 0xcc, 0xcc, 0xcc]),
                    };
                    let Some(bytes) = bytes else { continue };
                    let at = addr - base;
                    text[at..at + bytes.len()].copy_from_slice(&bytes);
                    sites.push(site);
                }
            }
        }
    }
    // A site outside the text.
    sites.push(Site {
        addr: tail + 64,
        ..sites[0]
    });
    assert!(sites.len() <= SLOTS);

    // SAFETY: the static is mapped and readable for the whole test.
    let image = unsafe { Image::builder("shapes").text(base..tail + 64) }.build();
    let listing = |(plan, outcomes): (CompactPlan, SiteOutcomes<'_>)| -> String {
        let mut s = format!("{}", plan.to_plan());
        for o in &outcomes {
            s += &format!("\n{o:?}");
        }
        s
    };
    let lock = crate::sync::UpdateLock::new();
    let held = lock.lock();
    let mut inlined = 0;
    for mode in [Mode::Generic, Mode::Lfence, Mode::Plain] {
        for returns in [ReturnSites::Ret, ReturnSites::Thunk(ret)] {
            let by_shape = plan_sites_by(&image, &sites, mode, returns, true, Some(&held)).unwrap();
            inlined += by_shape
                .1
                .iter()
                .filter(|o| o.outcome == Outcome::Inlined)
                .count();
            let general = plan_sites_by(&image, &sites, mode, returns, false, None).unwrap();
            let (a, b) = (listing(by_shape), listing(general));
            if a != b {
                let first = a.lines().zip(b.lines()).position(|(x, y)| x != y);
                let at = |s: &str| {
                    first
                        .and_then(|i| s.lines().nth(i))
                        .unwrap_or("")
                        .to_string()
                };
                panic!(
                    "{mode:?} with {returns:?}: shape path {:?}, general path {:?}",
                    at(&a).chars().take(600).collect::<String>(),
                    at(&b).chars().take(600).collect::<String>()
                );
            }
        }
    }
    assert!(
        inlined > 1000,
        "the cases reach the inline forms ({inlined})"
    );
}
