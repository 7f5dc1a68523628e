//! The bytes a retpoline site holds in each state: its original branch to
//! the thunk, its inline form per mode, and its branch to a supplied return
//! thunk. Built on the stack and memoized per shape: start-up plans every
//! site of a program (tens of thousands).

use super::Mode;
use crate::arch::x86_64::{self as x86, BranchKind, Encoded};
use crate::image::Image;
use crate::sites::{Site, SiteKind};

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
        let room = &mut self.b[self.n..self.n + bytes.len()];
        // SAFETY: `room` is exactly `bytes.len()` bytes (the slice above
        // panics otherwise); a short copy, not a `memcpy` call per piece.
        unsafe { crate::poke::copy_short(bytes.as_ptr(), room.as_mut_ptr(), bytes.len()) };
        self.n += bytes.len();
    }

    fn push(&mut self, byte: u8) {
        self.extend_from_slice(&[byte]);
    }

    fn len(&self) -> usize {
        self.n
    }

    fn bytes(&self) -> Encoded {
        Encoded::from_slice(&self.b[..self.n])
    }
}

/// Why a site that is not its branch's canonical encoding is left alone.
pub(super) const PREFIXED: &str = "prefixed or unusual encoding: left as is";

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
pub(super) fn inline_form(site: &Site, mode: Mode) -> Result<Encoded, &'static str> {
    let len = site.len as usize;
    if len > 15 {
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
#[inline]
pub(super) fn edit_span(current: &[u8], new: &[u8]) -> usize {
    // Most edits replace a branch whose last byte differs: no scan.
    if current.last() != new.last() {
        return current.len();
    }
    edit_span_scan(current, new)
}

/// [`edit_span`] when the last bytes agree (out of line: rare).
#[inline(never)]
fn edit_span_scan(current: &[u8], new: &[u8]) -> usize {
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

/// A return-thunk site routed to the return thunk at `thunk`: the site's
/// own branch (`jmp` or `jcc`, same length) with the new target.
pub(super) fn routed_form(site: &Site, thunk: usize) -> Result<Encoded, &'static str> {
    let e = match site.form {
        BranchKind::Jmp => x86::jmp_rel32(site.addr, thunk),
        BranchKind::Jcc(cc) => x86::jcc_rel32(cc, site.addr, thunk),
        BranchKind::Call => return Err("a call to the return thunk is not a return site"),
    }
    .map_err(|_| "the supplied return thunk is out of rel32 reach of the site")?;
    if e.len() != site.len as usize {
        return Err(PREFIXED);
    }
    Ok(e)
}

/// Whether `current` is `site`'s own branch (`jmp rel32`, or `jcc rel32`
/// with the same condition) to a target in `image`'s text: a return site
/// routed earlier by [`ReturnSites::Thunk`].
pub(super) fn routed_elsewhere(image: &Image<'_>, site: &Site, current: &[u8]) -> bool {
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
pub(super) fn original_form(site: &Site) -> Option<Encoded> {
    let e = match site.form {
        BranchKind::Call => x86::call_rel32(site.addr, site.target),
        BranchKind::Jmp => x86::jmp_rel32(site.addr, site.target),
        BranchKind::Jcc(cc) => x86::jcc_rel32(cc, site.addr, site.target),
    }
    .ok()?;
    (e.len() == site.len as usize).then_some(e)
}
