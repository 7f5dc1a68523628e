//! Retpolines and return thunks: the thunks compilers call, patched per CPU
//! policy, and their call sites turned back into plain indirect branches.
//!
//! Code built with external thunks — GCC's `-mindirect-branch=thunk-extern
//! -mfunction-return=thunk-extern`, rustc's `-C
//! target-feature=+retpoline-external-thunk` — calls
//! `__x86_indirect_thunk_<reg>` for every indirect branch and jumps to
//! `__x86_return_thunk` to return. This crate defines them (so linking it
//! into such a program just works) as one 64-byte-aligned array of 32-byte
//! slots, one per register in encoding order (`%rsp`'s slot is `int3`s: it is
//! never a thunk register), each a full retpoline by default:
//!
//! ```text
//! __x86_indirect_thunk_<reg>:
//!     cs call 1f            # 6 bytes: every patched form fits in it
//! 2:  pause; lfence; jmp 2b # where speculation of the ret is trapped
//! 1:  mov %<reg>, (%rsp)    # replace the return address with the target
//!     ret                   # and "return" to it
//! ```
//!
//! and `__x86_return_thunk`: a plain `ret`.
//!
//! # Modes and what they cost you
//!
//! | mode | thunk becomes | call sites (5-byte `call`/`jmp`, 6-byte `jcc`) | protects against Spectre v2 (BTI) |
//! |---|---|---|---|
//! | `generic` | the retpoline (unchanged) | keep calling the thunk | yes, on every CPU: the indirect branch is never predicted from the BTB; costs a mispredicted `ret` per call |
//! | `lfence` | `lfence; jmp *%reg` | `lfence; call/jmp *%reg` where it fits (rax..rdi); r8..r15 and `jcc` keep calling the (patched) thunk | vulnerable: Linux reports this mitigation as "Vulnerable: LFENCE" (AMD's 2022 guidance, CVE-2021-26401: not sufficient on AMD; never sufficient on Intel); never chosen by `auto` |
//! | `plain` (alias `off`) | `nop; jmp *%reg` | `nop; call/jmp *%reg`; `jcc` → inverted short `jcc` over `jmp *%reg` + `int3` | only if the hardware does it: enhanced IBRS (Intel) or Automatic IBRS (AMD) must be enabled by the OS; otherwise no protection |
//!
//! `auto` picks `plain` when the snapshot shows enhanced IBRS or Automatic
//! IBRS, else `generic`, and says why (`lfence` is never chosen
//! automatically). Overrides: `retpoline=<mode>` in the override string
//! (`ALTPATCH`, `altpatch=` on a kernel command line).
//!
//! Return-thunk sites (`jmp __x86_return_thunk`, or a `jcc` to it) become
//! `ret` in every mode: this crate's return thunk is a plain return (no
//! return mitigation such as untrained-return thunks is implemented), so
//! inlining it changes nothing but the cost. An embedder with a return
//! thunk of its own (a kernel's Retbleed or SRSO thunk) keeps them on it
//! instead: [`Policy::with_return_thunk`] makes every return site a direct
//! `jmp`/`jcc` to that address (validated like every other edit: the thunk
//! must be in the image's text, each site must hold one of its known forms).
//!
//! # Forms that stay correct under running threads
//!
//! Inline `call`/`jmp` forms put their filler (`lfence` or one NOP) *before*
//! the branch, so the branch ends where the original instruction ended: a
//! return address pushed by the original `call thunk` (a thread may be deep
//! inside the callee) still lands on an instruction boundary, and moving
//! between `lfence` and `plain` rewrites only the filler — one instruction
//! for one. The thunks' heads follow the same rule.
//!
//! [`apply`] validates both batches — call sites, then the thunks — before
//! writing either, then writes sites first. Moving towards fewer mitigations
//! (from `generic`, or between `lfence` and `plain` where no site goes back
//! through a thunk) is safe while other threads run with a live poke: every
//! edit replaces one instruction. Going back (re-routing an inlined site
//! through the thunk) is not: a thread may have been interrupted between
//! the filler and the branch. A live poke refuses it, nothing written; do it
//! in place with other threads stopped.
//!
//! The `SIGTRAP` handler of the live poke is itself compiled code: in a
//! retpoline-built program its indirect calls would be sites that may hold
//! an `int3` when it runs. It is written to contain none (its lookup is
//! inlined, its calls out are made in assembly), and `tests/retpoline.rs`
//! checks the linked handler.

mod policy;
mod report;
mod thunks;
mod verdict;

use alloc::vec::Vec;

pub use policy::{Mode, Policy, ReturnSites, Setting};
pub use report::{Error, Outcome, Report, SiteOutcome};
pub use thunks::{THUNK_SLOT, return_thunk, thunk, thunk_array};
pub use verdict::{CpuinfoFlags, KernelMitigation, KernelVerdict, KernelView};

use crate::image::Image;
use crate::plan::{Bytes, Edit, Expect, Plan};
use crate::poke::TextPoke;
use crate::sites::{Site, SiteKind};
use crate::x86::{self, BranchKind, Reg};

/// A site's new bytes, built on the stack: start-up plans every site of a
/// program (tens of thousands), so no allocation per form.
struct Form {
    b: [u8; 16],
    n: usize,
}

impl Form {
    fn new() -> Form {
        Form { b: [0; 16], n: 0 }
    }

    fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.b[self.n..self.n + bytes.len()].copy_from_slice(bytes);
        self.n += bytes.len();
    }

    fn push(&mut self, byte: u8) {
        self.extend_from_slice(&[byte]);
    }

    fn len(&self) -> usize {
        self.n
    }

    fn bytes(&self) -> Bytes {
        Bytes::new(&self.b[..self.n])
    }
}

/// `n` bytes of `int3`.
fn int3s(out: &mut Form, n: usize) {
    for _ in 0..n {
        out.push(x86::INT3);
    }
}

/// The inline form of a site in `mode`, or why there is none.
///
/// `call` and `jmp` forms put their filler *before* the branch (`lfence`,
/// or one NOP), so the branch ends where the original instruction ended:
/// return addresses and fall-through are where threads already expect them,
/// and moving between `lfence` and `plain` changes only the first
/// instruction — one instruction for one, which is safe live.
fn inline_form(site: &Site, mode: Mode) -> Result<Bytes, &'static str> {
    let len = site.len as usize;
    if len > 16 {
        return Err("site too long");
    }
    let mut b = Form::new();
    match (site.kind, site.form) {
        (SiteKind::ReturnThunk, BranchKind::Jmp) => {
            b.push(x86::RET);
            int3s(&mut b, len - 1);
        }
        (SiteKind::ReturnThunk, BranchKind::Jcc(cc)) => {
            // Not taken (inverted condition): skip the ret to the site's end.
            b.extend_from_slice(&[0x70 + cc.inverted() as u8, (len - 2) as u8]);
            b.push(x86::RET);
            int3s(&mut b, len - 3);
        }
        (SiteKind::IndirectThunk(r), form) => {
            if mode == Mode::Generic {
                return Err("generic mode keeps every call through the retpoline");
            }
            let lfence = mode == Mode::Lfence;
            match form {
                BranchKind::Call | BranchKind::Jmp => {
                    let branch = if form == BranchKind::Call {
                        x86::call_reg(r)
                    } else {
                        x86::jmp_reg(r)
                    };
                    let filler = len - branch.len();
                    if lfence {
                        if filler != x86::LFENCE.len() {
                            return Err(
                                "lfence; call/jmp *%r8..%r15 needs 6 bytes, the site has 5",
                            );
                        }
                        b.extend_from_slice(&x86::LFENCE);
                    } else {
                        b.extend_from_slice(x86::nop(filler).ok_or("site too long")?);
                    }
                    b.extend_from_slice(&branch);
                }
                BranchKind::Jcc(cc) => {
                    if lfence {
                        return Err("jcc; lfence; jmp *%reg needs 7 or 8 bytes, the site has 6");
                    }
                    // Taken: jmp *%reg. Not taken: the inverted short jcc
                    // skips to the site's end; the int3s are never run.
                    b.extend_from_slice(&[0x70 + cc.inverted() as u8, (len - 2) as u8]);
                    b.extend_from_slice(&x86::jmp_reg(r));
                    let rest = len - b.len();
                    int3s(&mut b, rest);
                }
            }
        }
        _ => return Err("not a thunk site"),
    }
    debug_assert_eq!(b.len(), len);
    Ok(b.bytes())
}

/// Whether `b` is a filler instruction of an inline form or thunk head:
/// `lfence` or one NOP.
fn is_filler(b: &[u8]) -> bool {
    b == x86::LFENCE || x86::nop(b.len()) == Some(b)
}

/// The bytes of `current` an edit to `new` must cover: only the first
/// instruction when the two differ just in their filler (`lfence` against a
/// NOP), so the edit stays one instruction for one; else all of them.
fn edit_span(current: &[u8], new: &[u8]) -> usize {
    let k = current
        .iter()
        .zip(new)
        .rposition(|(a, b)| a != b)
        .map_or(0, |i| i + 1);
    if k < current.len() && is_filler(&current[..k]) && is_filler(&new[..k]) {
        k
    } else {
        current.len()
    }
}

/// Pushes the edit taking the bytes at `addr` from `expected` to `new`
/// (nothing if they are equal).
fn push_edit(plan: &mut Plan, addr: usize, expected: &[u8], new: &[u8], reason: &'static str) {
    if expected == new {
        return;
    }
    let n = edit_span(expected, new);
    let edit = Edit::replace(addr, &expected[..n], &new[..n]);
    plan.push(if reason.is_empty() {
        edit
    } else {
        edit.reason(reason)
    });
}

/// A return-thunk site routed to the return thunk at `thunk`: the site's
/// own branch (`jmp` or `jcc`, same length) with the new target.
fn routed_form(site: &Site, thunk: usize) -> Result<Bytes, &'static str> {
    let e = match site.form {
        BranchKind::Jmp => x86::jmp_rel32(site.addr, thunk),
        BranchKind::Jcc(cc) => x86::jcc_rel32(cc, site.addr, thunk),
        BranchKind::Call => return Err("a call to the return thunk is not a return site"),
    }
    .map_err(|_| "the supplied return thunk is out of rel32 reach of the site")?;
    if e.len() != site.len as usize {
        return Err("prefixed or unusual encoding: left as is");
    }
    Ok(Bytes::new(&e))
}

/// Whether `current` is `site`'s own branch (`jmp rel32`, or `jcc rel32`
/// with the same condition) to a target in `image`'s text: a return site
/// routed earlier by [`ReturnSites::Thunk`].
fn routed_elsewhere(image: &Image<'_>, site: &Site, current: &[u8]) -> bool {
    let op: &[u8] = match site.form {
        BranchKind::Jmp => &[0xe9],
        BranchKind::Jcc(cc) => &[0x0f, 0x80 + cc as u8],
        BranchKind::Call => return false,
    };
    if current.len() != op.len() + 4 || !current.starts_with(op) {
        return false;
    }
    let rel = i32::from_le_bytes(current[op.len()..].try_into().unwrap_or_default());
    let target = (site.addr + current.len()).wrapping_add_signed(rel as isize);
    image.contains_text(target, 1)
}

/// The original form of a site: its branch to the thunk.
fn original_form(site: &Site) -> Option<Bytes> {
    let e = match site.form {
        BranchKind::Call => x86::call_rel32(site.addr, site.target),
        BranchKind::Jmp => x86::jmp_rel32(site.addr, site.target),
        BranchKind::Jcc(cc) => x86::jcc_rel32(cc, site.addr, site.target),
    }
    .ok()?;
    (e.len() == site.len as usize).then(|| Bytes::new(&e))
}

/// Builds the plan for the sites (batch 1) and the report entries.
fn plan_sites(
    image: &Image<'_>,
    sites: &[Site],
    mode: Mode,
    returns: ReturnSites,
) -> Result<(Plan, Vec<SiteOutcome>), Error> {
    if let ReturnSites::Thunk(t) = returns
        && !image.contains_text(t, 1)
    {
        return Err(Error::BadReturnThunk { addr: t });
    }
    let mut plan = Plan::for_image(image);
    plan.reserve(sites.len());
    let mut outcomes = Vec::with_capacity(sites.len());
    for s in sites {
        match s.kind {
            SiteKind::IndirectThunk(Reg::Rsp) => return Err(Error::RspSite { site: s.addr }),
            SiteKind::IndirectThunk(_) | SiteKind::ReturnThunk => {}
            _ => continue,
        }
        let Some(original) = original_form(s) else {
            outcomes.push(SiteOutcome {
                site: *s,
                outcome: Outcome::Refused("prefixed or unusual encoding: left as is"),
            });
            continue;
        };
        let routed = match (s.kind, returns) {
            (SiteKind::ReturnThunk, ReturnSites::Thunk(t)) => Some(routed_form(s, t)),
            _ => None,
        };
        let (new, outcome) = match routed.clone() {
            Some(Ok(b)) => (b, Outcome::ViaThunk),
            Some(Err(why)) => (original.clone(), Outcome::Refused(why)),
            None => match inline_form(s, mode) {
                Ok(b) => (b, Outcome::Inlined),
                // Generic mode is not a refusal: calls belong in the retpoline.
                Err(_) if mode == Mode::Generic => (original.clone(), Outcome::ViaThunk),
                Err(why) => (original.clone(), Outcome::Refused(why)),
            },
        };
        // Whichever state the site is in now (original, or inlined by an
        // earlier mode) is the expected one; anything else is refused by
        // validation, naming the site.
        // At most: original, plain, lfence, routed, routed elsewhere.
        let mut candidates: [Option<Bytes>; 5] = [Some(original), None, None, None, None];
        let mut k = 1;
        for m in [Mode::Plain, Mode::Lfence] {
            if let Ok(b) = inline_form(s, m) {
                candidates[k] = Some(b);
                k += 1;
            }
        }
        if let Some(Ok(b)) = routed {
            candidates[k] = Some(b);
            k += 1;
        }
        // SAFETY: the image's constructor guarantees its text is readable;
        // sites outside it are refused by validation before any read.
        let current = if image.contains_text(s.addr, s.len as usize) {
            unsafe { core::slice::from_raw_parts(s.addr as *const u8, s.len as usize) }
        } else {
            &[]
        };
        // A return site an earlier policy routed to some return thunk: the
        // site's own branch, to a target in the text.
        if s.kind == SiteKind::ReturnThunk && routed_elsewhere(image, s, current) {
            candidates[k] = Some(Bytes::new(current));
        }
        match candidates
            .iter()
            .flatten()
            .find(|c| c.as_slice() == current)
        {
            // No reason per site: a reason is a heap block per edit, and
            // start-up plans every site (listings group them by shape).
            Some(expected) => push_edit(&mut plan, s.addr, expected.as_slice(), new.as_slice(), ""),
            // Bytes of no known state: validation refuses this edit, naming
            // the site, and nothing is written.
            None => plan.push(Edit::new(
                s.addr,
                Expect::Bytes(original_form(s).unwrap_or(new.clone())),
                new,
            )),
        }
        outcomes.push(SiteOutcome { site: *s, outcome });
    }
    Ok((plan, outcomes))
}

/// Builds the plan that puts every thunk slot of this crate in `mode`'s
/// form (batch 2), if the slots lie in `image`'s text.
fn plan_thunks(image: &Image<'_>, mode: Mode) -> Result<(Plan, usize), Error> {
    let mut plan = Plan::for_image(image);
    let mut n = 0;
    if !image.contains_text(thunk_array(), THUNK_SLOT * 16) {
        return Ok((plan, 0));
    }
    for r in Reg::ALL {
        if r == Reg::Rsp {
            continue;
        }
        let addr = thunk(r).expect("a thunk for every register but rsp");
        let forms: Vec<[u8; 6]> = [Mode::Generic, Mode::Lfence, Mode::Plain]
            .iter()
            .map(|&m| thunks::head(r, m))
            .collect();
        // SAFETY: inside the image's text (checked above), readable.
        let current = unsafe { core::slice::from_raw_parts(addr as *const u8, 6) };
        let Some(expected) = forms.iter().find(|f| f[..] == *current) else {
            return Err(Error::BadThunk { reg: r, addr });
        };
        let new = thunks::head(r, mode);
        if *expected != new {
            n += 1;
        }
        push_edit(&mut plan, addr, expected, &new, "thunk head");
    }
    Ok((plan, n))
}

/// Applies `policy` to `image`: first every thunk and return-thunk call
/// site in `sites` (from [`crate::elf::image_sites`] or an embedded table;
/// other kinds are ignored), then this crate's thunks, if they are in the
/// image. Both batches are validated before either is written.
///
/// ```
/// use altpatch::retpoline::{self, Mode, Policy};
/// use altpatch::x86::Reg;
/// use altpatch::{Image, LinuxPoke};
///
/// let image = Image::current();
/// let mut poke = LinuxPoke::new()?;
/// let plain = Policy::new(Mode::Plain, "example");
/// // No sites here: only the thunks change. In place: nothing else runs.
/// let report = unsafe { retpoline::apply(&image, &[], &plain, &mut poke) }?;
/// assert_eq!(report.thunks, 15);
/// let r11 = retpoline::thunk(Reg::R11).unwrap();
/// let head = unsafe { std::slice::from_raw_parts(r11 as *const u8, 6) };
/// assert_eq!(head, [0x0f, 0x1f, 0x00, 0x41, 0xff, 0xe3]); // nop; jmp *%r11
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Safety
///
/// As for [`Plan::apply`] with `poke`. With a live poke, moving towards
/// fewer mitigations is safe while other threads run; moving back is
/// refused by the poke (see the module docs). The mode must be acceptable
/// for the CPU: `plain` removes the protection unless the hardware provides
/// it.
pub unsafe fn apply<P: TextPoke + ?Sized>(
    image: &Image<'_>,
    sites: &[Site],
    policy: &Policy,
    poke: &mut P,
) -> Result<Report, Error> {
    let (mut site_plan, outcomes) = plan_sites(image, sites, policy.mode, policy.returns)?;
    let (mut thunk_plan, thunks) = plan_thunks(image, policy.mode)?;
    // Both batches are checked before either writes, so a refusal (an
    // unexpected byte anywhere) leaves the text as it was.
    site_plan.validate(poke)?;
    thunk_plan.validate(poke)?;
    // SAFETY: forwarded from our caller.
    let sites_applied = unsafe { site_plan.apply(poke) }?;
    // SAFETY: as above.
    let thunks_applied = match unsafe { thunk_plan.apply(poke) } {
        Ok(r) => r,
        Err(error) => {
            // Put the sites back too (which a live poke may refuse: see
            // the module docs). Either way every site works with every
            // thunk form, so the program stays correct.
            // SAFETY: as above.
            let sites_restored = unsafe { site_plan.undo(poke) }.is_ok();
            return Err(Error::Thunks {
                error,
                sites_restored,
            });
        }
    };
    Ok(Report {
        policy: policy.clone(),
        sites: outcomes,
        thunks,
        sites_applied,
        thunks_applied,
    })
}

/// Applies `policy` to the running program, live (`std`): its sites from
/// its relocations (link with `-Wl,--emit-relocs`) or embedded table, then
/// the thunks, published by page swap so other threads may keep running.
/// The error says which step failed.
///
/// ```no_run
/// use altpatch::cpu::{Features, Overrides};
/// use altpatch::retpoline::{self, Policy};
///
/// let policy = Policy::for_process(&Features::detect(), &Overrides::from_env()?);
/// let report = retpoline::apply_current(&policy)?;
/// print!("{report}");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[cfg(all(feature = "std", target_os = "linux"))]
pub fn apply_current(policy: &Policy) -> Result<Report, alloc::string::String> {
    let image = Image::current();
    // The memoized list every mechanism shares: one parse per process.
    let sites = crate::elf::current_sites().map_err(|e| alloc::format!("{e}"))?;
    let mut poke = crate::poke::LinuxPoke::running().map_err(|e| alloc::format!("{e}"))?;
    // SAFETY: the running poke publishes pages atomically (or runs the INT3
    // protocol); it refuses edits that are not one instruction for one.
    unsafe { apply(&image, sites, policy, &mut poke) }.map_err(|e| alloc::format!("{e}"))
}
