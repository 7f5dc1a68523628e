//! Planning the thunk sites (batch 1): for each site, the bytes it holds
//! now checked against the forms it may be in, and the policy's form for
//! it.
//!
//! Start-up plans every site of a program (tens of thousands), and nearly
//! all are in their original form with an outcome that depends only on
//! their *shape* (kind and register, branch form and condition, length).
//! Those take the shape path: the original branch is computed and the
//! text read as integers, and nothing is built per site but the edit.
//! Every other site (another state, a return site routed to a supplied
//! thunk, a target that must be looked at) takes the general path, which
//! decides the same way with every case spelled out. A test checks that
//! the two agree on every shape, mode and state.

use super::form::{PREFIXED, edit_span, inline_form, original_form, routed_elsewhere, routed_form};
use super::{Error, Mode, Outcome, ReturnSites, SiteOutcomes, its, local, thunks};
use crate::arch::x86_64::{Encoded, Reg};
use crate::image::Image;
use crate::plan::CompactPlan;
use crate::poke::{in_ranges, load_short, short_eq};
use crate::sites::{Site, SiteKind};
use crate::sync::UpdateGuard;

/// Why a site kept in generic mode on another object's thunk through this
/// object's PLT is not counted as going through the retpoline.
const PLT_KEPT: &str = "kept calling the program's thunk through this object's PLT stub, whose \
                        `jmp *slot(%rip)` is an unprotected indirect branch (GNU ld makes no \
                        retpoline PLT): inline it with lfence or plain where the CPU allows";

/// Builds the plan for the sites (batch 1) and the report entries. With
/// the update lock `held` until the plan is applied (and nothing else
/// writing text on this thread before then), the shape path's edits are
/// pushed observed: validation takes this planning's reading of them.
/// Without, every edit is read again by validation.
// Inlined into its one caller (`Planned::new`) with the loop below: the
// caller's constants (the lock held, the return-site form) then reach the
// per-site loop. Left to the compiler, the module split of the arch seam
// put the two in different codegen units and start-up paid 3 instructions
// a site (BENCHMARKS.md, "Arch seam").
#[inline(always)]
pub(super) fn plan_sites<'s>(
    image: &Image<'_>,
    sites: &'s [Site],
    mode: Mode,
    returns: ReturnSites,
    its: bool,
    held: Option<&UpdateGuard<'_>>,
) -> Result<(CompactPlan, SiteOutcomes<'s>), Error> {
    let routes = Routes { returns, its };
    plan_sites_by(image, sites, mode, routes, true, held)
}

/// Where a site goes when it is not inlined: the return-site policy, and
/// whether a `plain` site whose branch would end in the lower half of a
/// cache line goes to an ITS thunk instead ([`super::its`]).
#[derive(Clone, Copy, Debug)]
struct Routes {
    returns: ReturnSites,
    its: bool,
}

/// [`plan_sites`], with the shape path or without it (for the test that
/// compares them).
#[inline(always)]
fn plan_sites_by<'s>(
    image: &Image<'_>,
    sites: &'s [Site],
    mode: Mode,
    routes: Routes,
    use_shapes: bool,
    held: Option<&UpdateGuard<'_>>,
) -> Result<(CompactPlan, SiteOutcomes<'s>), Error> {
    if let ReturnSites::Thunk(t) = routes.returns
        && !image.contains_text(t, 1)
    {
        return Err(Error::BadReturnThunk { addr: t });
    }
    // No reason: listings group the sites by shape (`call X -> ...`).
    let mut plan = CompactPlan::for_image(image, "");
    plan.reserve(sites.len());
    let mut outcomes = SiteOutcomes::for_sites(sites);
    let mut shapes = ShapeCache::<0>::new(mode, routes);
    // Sites with one `cs` prefix, on the first.
    let mut with_cs: Option<ShapeCache<1>> = None;
    let own = thunks::own_thunks();
    // The text range the last site was in (tried first).
    let mut hit = 0;
    for s in sites {
        match s.kind {
            SiteKind::IndirectThunk(Reg::Rsp) => return Err(Error::RspSite { site: s.addr }),
            SiteKind::IndirectThunk(_) | SiteKind::ReturnThunk => {}
            _ => {
                outcomes.skip();
                continue;
            }
        }
        let Some(shape) = shapes.get(s) else {
            let ctx = (image, mode, routes, use_shapes, held);
            prefixed(
                ctx,
                s,
                &own,
                &mut with_cs,
                &mut hit,
                &mut plan,
                &mut outcomes,
            );
            continue;
        };
        let foreign = || !own.contains(&s.target);
        let taken = use_shapes
            && by_shape(
                image,
                &mut hit,
                s,
                shape,
                foreign,
                &mut plan,
                &mut outcomes,
                held,
            );
        if !taken {
            let outcome = general(image, s, shape.inline, mode, routes, foreign(), &mut plan);
            outcomes.push(outcome);
        }
    }
    Ok((plan, outcomes))
}

/// The shape path: for a site in its original form whose shape decides
/// it, its edit and outcome pushed (`true`); `false` sends the site to the
/// general path (which may well agree).
#[inline(always)]
#[allow(clippy::too_many_arguments)] // the loop's state, inlined into it
fn by_shape(
    image: &Image<'_>,
    hit: &mut usize,
    s: &Site,
    shape: &Shape,
    foreign: impl Fn() -> bool,
    plan: &mut CompactPlan,
    outcomes: &mut SiteOutcomes<'_>,
    held: Option<&UpdateGuard<'_>>,
) -> bool {
    if shape.own_only && foreign() {
        return false;
    }
    let len = s.len as usize;
    // The original branch: its opcode, then the rel32 to the thunk.
    let rel = s.target.wrapping_sub(s.addr.wrapping_add(len)) as isize;
    let Ok(rel32) = i32::try_from(rel) else {
        return false;
    };
    let original = shape.op | u64::from(rel32 as u32) << (8 * shape.op_len);
    match s.addr.checked_add(len) {
        Some(end) if in_ranges(image.text(), hit, s.addr, end) => {}
        _ => return false,
    }
    // SAFETY: inside the image's text (checked above), which its
    // constructor guarantees is readable; `len` is 5 or 6.
    let now = unsafe { load_short(s.addr as *const u8, len) };
    if now != original {
        return false;
    }
    match shape.fast {
        // The whole site: an original branch and an inline form never share
        // a first byte (a `call`/`jmp`/`jcc rel32` opcode is no filler), so
        // `edit_span` would cover every byte too.
        Fast::Inline(new) => {
            match held {
                // SAFETY: `original` was read at the site just above, inside
                // the plan's text (the image's), and the update lock is held
                // until the plan is applied (`plan_sites`'s contract).
                Some(_) => unsafe { plan.push_observed(s.addr, original, new, len) },
                None => plan.push_short(s.addr, original, new, len),
            }
            outcomes.push(Outcome::Inlined);
            true
        }
        // Indirect Target Selection: the inline form where its branch ends
        // in an upper half, else the original's opcode with the ITS thunk
        // as its target.
        Fast::InlineOrIts { new, end, thunk } => {
            let (new, outcome) = if (s.addr + end as usize) & 0x20 != 0 {
                (new, Outcome::Inlined)
            } else {
                let rel = thunk.wrapping_sub(s.addr.wrapping_add(len)) as isize;
                let Ok(rel32) = i32::try_from(rel) else {
                    return false;
                };
                let its = shape.op | u64::from(rel32 as u32) << (8 * shape.op_len);
                (its, Outcome::ViaThunk)
            };
            match held {
                // SAFETY: as for `Fast::Inline` above.
                Some(_) => unsafe { plan.push_observed(s.addr, original, new, len) },
                None => plan.push_short(s.addr, original, new, len),
            }
            outcomes.push(outcome);
            true
        }
        Fast::Keep(outcome) => {
            outcomes.push(outcome);
            true
        }
        Fast::General => false,
    }
}

/// What planning a site needs besides the site: the image, the mode, the
/// return-site policy, whether the shape path is taken, the lock held.
type Ctx<'a, 'i, 'g> = (
    &'a Image<'i>,
    Mode,
    Routes,
    bool,
    Option<&'a UpdateGuard<'g>>,
);

/// A prefixed site (`cs call`, 6 bytes; rare but in code built with `cs`
/// prefixes): its edit and outcome pushed, through the shape path of its
/// own shapes (one `cs` prefix) or the general path. Out of line: it keeps
/// the loop as it is for unprefixed code. One longer than 8 bytes (an
/// assembler's branch padding: up to five `cs` prefixes) is planned in its
/// last 8, which hold every form: the `cs` prefixes before them stay, and a
/// `cs` changes nothing of what is written after it.
#[inline(never)]
fn prefixed(
    (image, mode, routes, use_shapes, held): Ctx<'_, '_, '_>,
    s: &Site,
    own: &core::ops::Range<usize>,
    with_cs: &mut Option<ShapeCache<1>>,
    hit: &mut usize,
    plan: &mut CompactPlan,
    outcomes: &mut SiteOutcomes<'_>,
) {
    let foreign = || !own.contains(&s.target);
    let shapes = with_cs.get_or_insert_with(|| ShapeCache::new(mode, routes));
    if let Some(shape) = shapes.get(s) {
        if !(use_shapes && by_shape(image, hit, s, shape, foreign, plan, outcomes, held)) {
            outcomes.push(general(
                image,
                s,
                shape.inline,
                mode,
                routes,
                foreign(),
                plan,
            ));
        }
        return;
    }
    let last8 = Site {
        addr: s.addr + (s.len as usize).saturating_sub(8),
        len: s.len.min(8),
        ..*s
    };
    let inline = inline_form(&last8, mode);
    outcomes.push(general(
        image,
        &last8,
        inline,
        mode,
        routes,
        foreign(),
        plan,
    ));
}

/// The general path: the site's outcome, and its edit (from whichever
/// state it is in now) pushed. `inline` is the site's inline form in
/// `mode`, or why there is none. Out of line: it keeps the shape path's
/// loop small (at start-up nearly every site takes that path).
#[inline(never)]
fn general(
    image: &Image<'_>,
    s: &Site,
    inline: Result<Encoded, &'static str>,
    mode: Mode,
    routes: Routes,
    foreign: bool,
    plan: &mut CompactPlan,
) -> Outcome {
    let Some(original) = original_form(s) else {
        return Outcome::Refused(PREFIXED);
    };
    let its = its::its_form(s, &inline, mode, routes.its);
    let routed = match (s.kind, routes.returns) {
        (SiteKind::ReturnThunk, ReturnSites::Thunk(t)) => Some(routed_form(s, t)),
        _ => None,
    };
    let (new, outcome) = match routed {
        Some(Ok(b)) => (b, Outcome::ViaThunk),
        Some(Err(why)) => (original, Outcome::Refused(why)),
        // A return thunk that is itself a return retpoline (GCC's local
        // one, `-mfunction-return=thunk`) is a mitigation only `plain`
        // may drop; this crate's (not `foreign`: no read needed) and the
        // program's, reached through a PLT, are a bare `ret`.
        None if s.kind == SiteKind::ReturnThunk
            && mode != Mode::Plain
            && foreign
            && !local::returns_at_once(image, s.target) =>
        {
            (original, Outcome::ViaThunk)
        }
        // Indirect Target Selection: the branch would end in the lower half
        // of a cache line; an aligned thunk's does not (if in reach).
        None if let Some(its) = its => match its {
            Ok(b) => (b, Outcome::ViaThunk),
            Err(why) => (original, Outcome::Refused(why)),
        },
        None => match inline {
            Ok(b) => (b, Outcome::Inlined),
            // Kept on a PLT stub: its `jmp *slot(%rip)` is an indirect
            // branch of its own, not a retpoline.
            Err(_) if mode == Mode::Generic && foreign && local::plt_stub(image, s.target) => {
                (original, Outcome::Refused(PLT_KEPT))
            }
            // Generic mode is not a refusal: calls belong in the retpoline.
            Err(_) if mode == Mode::Generic => (original, Outcome::ViaThunk),
            Err(why) => (original, Outcome::Refused(why)),
        },
    };
    // SAFETY: the image's constructor guarantees its text is readable;
    // sites outside it are refused by validation before any read.
    let current = if image.contains_text(s.addr, s.len as usize) {
        unsafe { core::slice::from_raw_parts(s.addr as *const u8, s.len as usize) }
    } else {
        &[]
    };
    // Whichever state the site is in now (original, or put in another
    // form by an earlier policy) is the expected one; anything else is
    // refused by validation, naming the site.
    if short_eq(current, &original) {
        push_site_edit(plan, s.addr, &original, &new);
    } else if !short_eq(current, &new) {
        match known_state(image, s, routed, current) {
            Some(expected) => push_site_edit(plan, s.addr, &expected, &new),
            // Bytes of no known state: validation refuses this edit,
            // naming the site, and nothing is written.
            None => plan.push(s.addr, &original, &new),
        }
    }
    outcome
}

/// The edit taking a site from `expected` to `new`, pushed (nothing if
/// they are equal): a compact edit (sites are a few bytes, and a program
/// has tens of thousands).
fn push_site_edit(plan: &mut CompactPlan, addr: usize, expected: &Encoded, new: &Encoded) {
    if expected == new {
        return;
    }
    match edit_span(expected, new) {
        (0, n) => plan.push_encoded(addr, expected, new, n),
        // The filler after a short jcc, alone (rare: a mode switch).
        (at, n) => plan.push(addr + at, &expected[at..at + n], &new[at..at + n]),
    }
}

/// The form `site` is in, if it is one this crate writes: plain, lfence,
/// routed to the policy's return thunk, routed to another return thunk by
/// an earlier policy (the site's own branch, to a target in the text), or
/// sent to an ITS thunk by an earlier `plain` on an affected CPU.
fn known_state(
    image: &Image<'_>,
    site: &Site,
    routed: Option<Result<Encoded, &'static str>>,
    current: &[u8],
) -> Option<Encoded> {
    let its = its::routed_form(site);
    let forms = [Mode::Plain, Mode::Lfence]
        .into_iter()
        .filter_map(|m| inline_form(site, m).ok())
        .chain(routed.and_then(Result::ok))
        .chain(its);
    for f in forms {
        if short_eq(&f, current) {
            return Some(f);
        }
    }
    (site.kind == SiteKind::ReturnThunk && routed_elsewhere(image, site, current))
        .then(|| Encoded::from_slice(current))
}

mod shape;

use shape::{Fast, Shape, ShapeCache};

#[cfg(test)]
mod tests;
