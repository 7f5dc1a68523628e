//! The shape path and the general path agree on every shape, mode, return
//! policy, target and state.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::cell::UnsafeCell;

use super::*;
use crate::arch::x86_64::{self as x86, BranchKind, Cond};
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
    let routes = [ReturnSites::Ret, ReturnSites::Thunk(ret)]
        .into_iter()
        .flat_map(|returns| [false, true].map(|its| Routes { returns, its }));
    for mode in [Mode::Generic, Mode::Lfence, Mode::Plain] {
        for returns in routes.clone() {
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

/// Text for the ITS test: sites at every offset of a cache line.
struct ItsText(UnsafeCell<[u8; 64 * 16 + 64]>);
// SAFETY: only the one test below touches it.
unsafe impl Sync for ItsText {}
static ITS_TEXT: ItsText = ItsText(UnsafeCell::new([0; 64 * 16 + 64]));

/// On a CPU affected by Indirect Target Selection, `plain` inlines exactly
/// the sites whose `call/jmp *%reg` ends in the upper half of a cache line
/// and sends the others to the ITS thunk for their register, whose own
/// `jmp *%reg` ends in an upper half; written and read back.
#[test]
fn its_routes_exactly_the_lower_half_branches() {
    let text = ITS_TEXT.0.get() as *mut u8;
    // A 64-byte aligned window of the static.
    let base = (text as usize).next_multiple_of(64);
    let mut sites = Vec::new();
    // 5- and 6-byte calls and jmps through rax and r11 at offsets 0..58 of
    // consecutive lines, then a jne through rdx.
    let mut at = base;
    for (i, (form, reg, len)) in [
        (BranchKind::Call, Reg::Rax, 5u8),
        (BranchKind::Call, Reg::R11, 5),
        (BranchKind::Jmp, Reg::Rax, 5),
        (BranchKind::Call, Reg::R11, 6),
        (BranchKind::Jcc(Cond::Ne), Reg::Rdx, 6),
    ]
    .into_iter()
    .cycle()
    .take(60)
    .enumerate()
    {
        let site = Site {
            addr: at,
            len,
            form,
            kind: SiteKind::IndirectThunk(reg),
            target: thunk(reg).unwrap(),
        };
        let bytes = original_form(&site).unwrap();
        // SAFETY: inside the static, which nothing else touches.
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), at as *mut u8, bytes.len()) };
        sites.push(site);
        // Next offset: step by 13 bytes, so every offset of a line comes up.
        at += len as usize + 8 + (i % 3);
    }
    assert!(at < base + 64 * 16);
    // SAFETY: the static is mapped and readable for the whole test.
    let image = unsafe { Image::builder("its").text(base..base + 64 * 16) }.build();
    let routes = Routes {
        returns: ReturnSites::Ret,
        its: true,
    };
    let (mut plan, outcomes) =
        plan_sites_by(&image, &sites, Mode::Plain, routes, true, None).unwrap();
    // SAFETY: `cpuid` serializes on every x86-64 CPU.
    let mut poke = unsafe { crate::poke::DirectPoke::new(crate::poke::SyncMethod::Cpuid) };
    // SAFETY: the "text" is this test's static, run by no one.
    unsafe { plan.apply(&mut poke) }.unwrap();
    let (mut inlined, mut routed) = (0, 0);
    for (s, o) in sites.iter().zip(&outcomes) {
        // SAFETY: inside the static.
        let now = unsafe { core::slice::from_raw_parts(s.addr as *const u8, s.len as usize) };
        let SiteKind::IndirectThunk(r) = s.kind else {
            unreachable!()
        };
        match o.outcome {
            Outcome::Inlined => {
                let k = now.iter().position(|&b| b == 0xff).unwrap();
                assert_ne!(
                    (s.addr + k + 1) & 0x20,
                    0,
                    "{s:x?}: {now:x?} ends in a lower half"
                );
                inlined += 1;
            }
            Outcome::ViaThunk => {
                let its = crate::retpoline::its_thunk(r).unwrap();
                let want = original_form(&Site { target: its, ..*s }).unwrap();
                assert_eq!(now, &want[..], "{s:x?}");
                // What plain would have written ends in a lower half.
                let inline = inline_form(s, Mode::Plain).unwrap();
                assert!(its::branch_in_lower_half(s.addr, &inline), "{s:x?}");
                routed += 1;
            }
            other => panic!("{s:x?}: {other:?}"),
        }
    }
    assert!(
        inlined > 10 && routed > 10,
        "{inlined} inlined, {routed} routed"
    );
}
