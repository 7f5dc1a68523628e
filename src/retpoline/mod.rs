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
//! | mode | thunk becomes | call sites (5-byte `call`/`jmp`, 6-byte `jcc`, one more per `cs` prefix) | protects against Spectre v2 (BTI) |
//! |---|---|---|---|
//! | `generic` | the retpoline (unchanged) | keep calling the thunk | yes, on every CPU: the indirect branch is never predicted from the BTB; costs a mispredicted `ret` per call |
//! | `lfence` | `lfence; jmp *%reg` | `lfence; call/jmp *%reg` where it fits (rax..rdi in 5 bytes, r8..r15 in a `cs`-prefixed 6), inverted short `jcc` over `lfence; jmp *%reg` where that fits (a `cs jcc` through rax..rdi); the rest keep calling the (patched) thunk | vulnerable: Linux reports this mitigation as "Vulnerable: LFENCE" (AMD's 2022 guidance, CVE-2021-26401: not sufficient on AMD; never sufficient on Intel); never chosen by `auto` |
//! | `plain` (alias `off`) | `nop; jmp *%reg` | `nop; call/jmp *%reg`; `jcc` → inverted short `jcc` over `[nop;] jmp *%reg` + `int3` | only if the hardware does it: enhanced IBRS (Intel) or Automatic IBRS (AMD) must be enabled by the OS; otherwise no protection |
//!
//! A site with `cs` prefixes (GCC's and rustc's `-mindirect-branch-cs-prefix`,
//! what the kernel is built with) is found at its first prefix with its
//! full length, where decoding proves the prefix (`crate::elf`), and every
//! byte of it is used: the filler (`lfence` or a NOP of its length) first,
//! then `cs` prefixes on a `call` or `int3` after a `jmp` (Linux's padding;
//! the branch still ends at the site's end).
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
//! [`apply`] validates both batches before writing either — the thunks
//! first, then the call sites as part of writing them (one pass over the
//! sites: a refusal there still comes before any write) — and writes sites
//! first. Moving towards fewer mitigations
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

mod form;
mod its;
mod local;
mod outcomes;
mod planned;
mod policy;
mod report;
mod site_plan;
mod thunks;
mod verdict;

use alloc::vec::Vec;

pub use crate::cpu::mitigation::{Mode, Setting};
pub use its::{ITS_SLOT, its_affected, its_thunk};
pub use outcomes::{SiteOutcomeIter, SiteOutcomes};
pub(crate) use planned::Planned;
pub use policy::{Policy, ReturnSites};
pub use report::{CompiledThunk, Error, Outcome, Report, SiteOutcome};
pub use thunks::{THUNK_SLOT, return_thunk, thunk, thunk_array};
pub use verdict::{CpuinfoFlags, KernelMitigation, KernelVerdict, KernelView};

use form::edit_span;
use site_plan::plan_sites;

use crate::arch::x86_64::Reg;
use crate::image::Image;
use crate::plan::{Edit, Plan};
use crate::poke::{TextPoke, short_eq};
use crate::sites::Site;

/// Pushes the edit taking the bytes at `addr` from `expected` to `new`
/// (nothing if they are equal).
fn push_edit(plan: &mut Plan, addr: usize, expected: &[u8], new: &[u8], reason: &'static str) {
    if short_eq(expected, new) {
        return;
    }
    let (at, n) = edit_span(expected, new);
    let span = at..at + n;
    plan.push(Edit::replace(addr + at, &expected[span.clone()], &new[span]).reason(reason));
}

/// Puts the retpoline thunks compiled into the program that `sites`
/// reach (LLVM's, GCC's local ones: see `local.rs`) in `mode`'s form,
/// into `plan` (batch 2), after checking their exact bytes.
fn plan_compiled_thunks(
    image: &Image<'_>,
    sites: &[Site],
    mode: Mode,
    plan: &mut Plan,
) -> Vec<CompiledThunk> {
    let (found, unknown) = local::find(image, sites, thunks::own_thunks());
    let mut out = Vec::with_capacity(found.len() + unknown.len());
    for t in found {
        // SAFETY: `local::find` checked the whole body is in the image's
        // text, which is readable.
        let current = unsafe { core::slice::from_raw_parts(t.addr as *const u8, t.head_len()) };
        let expected = t.state(current).expect("found only in a known state");
        let (new, kept) = t.head(mode);
        push_edit(plan, t.addr, &expected, &new, "compiled-in thunk head");
        out.push(CompiledThunk {
            addr: t.addr,
            reg: t.reg,
            refused: kept,
        });
    }
    out.extend(unknown.into_iter().map(|(addr, reg)| CompiledThunk {
        addr,
        reg,
        refused: Some(
            "not a retpoline body altpatch knows (GCC's or LLVM's): left as is; its sites are \
             planned as usual",
        ),
    }));
    out
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
/// Planning reads every site once, under the update lock (in a process,
/// the one process-wide lock every text change through a
/// [`LinuxPoke`](crate::LinuxPoke) takes; elsewhere, a lock of the
/// retpoline sites' own), held until the last write: the site batch's
/// validation takes planning's reading of a site in its original form
/// instead of reading it again. Where the lock is a spin flag (not a Linux
/// process), do not call this from code that interrupted a call of it on
/// the same CPU.
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
/// let report = unsafe { retpoline::apply(&image, &plain, &[], &mut poke) }?;
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
pub unsafe fn apply<'s, P: TextPoke + ?Sized>(
    image: &Image<'_>,
    policy: &Policy,
    sites: &'s [Site],
    poke: &mut P,
) -> Result<Report<'s>, Error> {
    let mut planned = Planned::new(image, sites, policy, true)?;
    // Both batches are checked before either writes, so a refusal (an
    // unexpected byte anywhere) leaves the text as it was: the thunks here,
    // the sites by `apply` itself before its first write (validating the
    // site batch separately too would read every site twice).
    planned.thunk_plan.validate(poke)?;
    // SAFETY: forwarded from our caller.
    unsafe { planned.write(poke) }
}

/// Applies `policy` to a shared object loaded at run time (`std`), live:
/// the object containing `addr` (any of its symbols), its sites from its
/// file's relocations (link it with `-Wl,--emit-relocs`) or embedded
/// table, published by page swap so other threads may keep running in it.
/// Call it right after `dlopen`, with the policy the program applied to
/// itself, and again after every `dlopen` of it (a fresh load is the
/// file's bytes).
///
/// An object built against the executable's thunks (GCC
/// `-mindirect-branch=thunk-extern`, rustc `+retpoline-external-thunk`)
/// reaches them through its PLT: the executable must export them — link
/// it with `-Wl,--export-dynamic-symbol=__x86_indirect_thunk_*
/// -Wl,--export-dynamic-symbol=__x86_return_thunk` — or `dlopen` fails
/// with "undefined symbol: __x86_indirect_thunk_...". Such sites are
/// inlined where the mode allows; the rest keep calling the executable's
/// thunks (which [`apply_current`] put in the same mode) through the PLT,
/// whose `jmp *slot(%rip)` is itself an unprotected indirect branch: in
/// generic mode the report lists them as refused, saying so. Return sites
/// reached through the PLT become `ret` (the executable's return thunk is
/// this crate's bare `ret`).
///
/// Limits: a policy routing return sites to a thunk of the executable
/// ([`Policy::with_return_thunk`]) is refused with
/// [`Error::BadReturnThunk`] (the thunk is not in the loaded object); and
/// only one copy of this crate may patch a given object — a cdylib that
/// links its own altpatch must not patch itself while the program patches
/// it (each copy has its own patching lock).
///
/// ```no_run
/// use altpatch::retpoline::{self, Mode, Policy};
/// let policy = Policy::new(Mode::Plain, "example");
/// retpoline::apply_current(&policy)?;
/// // ... after `dlopen(...)` and `dlsym(handle, "work")` gave `work`:
/// # let work = 0usize;
/// // SAFETY: the object stays loaded (no dlclose) during the call.
/// let report = unsafe { retpoline::apply_loaded(work, &policy) }?;
/// print!("{report}");
/// # Ok::<(), altpatch::Error>(())
/// ```
///
/// # Safety
///
/// The object must stay loaded, and its file be the one loaded, for the
/// duration of the call (no concurrent `dlclose`).
#[cfg(feature = "std")]
pub unsafe fn apply_loaded(addr: usize, policy: &Policy) -> Result<Report<'static>, Error> {
    // SAFETY: forwarded from our caller.
    let image = unsafe { Image::from_loaded(addr) }.map_err(Error::Load)?;
    let sites = crate::elf::image_sites(&image).map_err(Error::Sites)?;
    let mut poke =
        <crate::os::Process as crate::os::ProcessBackend>::start_up_poke().map_err(Error::Poke)?;
    // SAFETY: as for `apply_current`: the start-up poke stores in place only
    // while no other thread exists, else publishes pages atomically; it
    // refuses edits that are not one instruction for one.
    unsafe { apply(&image, policy, &sites, &mut poke) }.map(Report::into_owned)
}

/// Applies `policy` to the running program, live (`std`): its sites from
/// its relocations (link with `-Wl,--emit-relocs`) or embedded table, then
/// the thunks. While the program has one thread (start-up) the sites are
/// stored in place; once other threads run, each page is published by a
/// page swap so they may keep running (the report's `sites_applied.via`
/// says which). The error says which step failed.
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
#[cfg(feature = "std")]
pub fn apply_current(policy: &Policy) -> Result<Report<'static>, Error> {
    let image = Image::current();
    // The memoized list every mechanism shares: one parse per process.
    let sites = crate::elf::current_sites().map_err(Error::Sites)?;
    let mut poke =
        <crate::os::Process as crate::os::ProcessBackend>::start_up_poke().map_err(Error::Poke)?;
    // SAFETY: the start-up poke stores in place only while no other thread
    // exists (none can appear meanwhile), else publishes pages atomically
    // (or runs the INT3 protocol); it refuses edits that are not one
    // instruction for one.
    unsafe { apply(&image, policy, sites, &mut poke) }
}
