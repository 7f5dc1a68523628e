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

/// The `cs` prefix: what compilers put before a branch to a thunk
/// (`-mindirect-branch-cs-prefix`), and what pads a site's `call` so that
/// it still ends where the site ends.
const CS: u8 = 0x2e;

/// The inline form of a site in `mode`, or why there is none.
///
/// `call` and `jmp` forms put their filler *before* the branch (`lfence`,
/// or one NOP), so the branch ends where the original instruction ended:
/// return addresses and fall-through are where threads already expect them,
/// and moving between `lfence` and `plain` changes only the first
/// instruction — one instruction for one, which is safe live. Wherever
/// `lfence` fits, the filler is 3 bytes in both modes, so the two forms
/// share the rest. Bytes beyond the filler and the branch (a prefixed
/// site: `cs call`, 6 bytes) go where Linux puts them: `cs` prefixes on a
/// `call` (one instruction, still ending at the site's end), `int3` after a
/// `jmp` (nothing runs straight on past it, not even speculatively).
/// A `jcc` becomes the inverted short `jcc` over `[lfence;] jmp *%reg`.
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
                    let call = form == BranchKind::Call;
                    let branch = if call {
                        x86::call_reg(r)
                    } else {
                        x86::jmp_reg(r)
                    };
                    let excess = len - branch.len();
                    let filler = excess.min(x86::LFENCE.len());
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
                    let pad = excess - filler;
                    if call {
                        b.extend_from_slice(&[CS; 15][..pad]);
                        b.extend_from_slice(&branch);
                    } else {
                        b.extend_from_slice(&branch);
                        int3s(&mut b, pad);
                    }
                }
                BranchKind::Jcc(cc) => {
                    // Taken: [lfence or NOP;] jmp *%reg. Not taken: the
                    // inverted short jcc skips to the site's end; the int3s
                    // are never run. Where lfence fits, plain has a NOP of
                    // its length there, as for `call`/`jmp`.
                    let branch = x86::jmp_reg(r);
                    let fits = 2 + x86::LFENCE.len() + branch.len() <= len;
                    if lfence && !fits {
                        return Err("jcc; lfence; jmp *%reg needs 7 bytes (8 through \
                                    r8..r15), more than the site has");
                    }
                    b.extend_from_slice(&[0x70 + cc.inverted() as u8, (len - 2) as u8]);
                    if lfence {
                        b.extend_from_slice(&x86::LFENCE);
                    } else if fits {
                        b.extend_from_slice(x86::nop(x86::LFENCE.len()).unwrap_or_default());
                    }
                    b.extend_from_slice(&branch);
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

/// The bytes of `current` an edit to `new` must cover, as (offset,
/// length): only the filler instruction when the two differ just there
/// (`lfence` against a NOP, first in a `call`/`jmp` form or after a `jcc`
/// form's short `jcc`), so the edit stays one instruction for one; else all
/// of them.
#[inline]
pub(super) fn edit_span(current: &[u8], new: &[u8]) -> (usize, usize) {
    // Most edits replace a branch whose last byte differs: no scan.
    if current.last() != new.last() {
        return (0, current.len());
    }
    edit_span_scan(current, new)
}

/// [`edit_span`] when the last bytes agree (out of line: rare).
#[inline(never)]
fn edit_span_scan(current: &[u8], new: &[u8]) -> (usize, usize) {
    let whole = (0, current.len());
    let diff = |(a, b): (&u8, &u8)| a != b;
    let (Some(first), Some(last)) = (
        current.iter().zip(new).position(diff),
        current.iter().zip(new).rposition(diff),
    ) else {
        return whole;
    };
    // Where the filler starts: first, or after the short jcc both share.
    let start = match current {
        [0x70..=0x7f, _, ..] if first >= 2 => 2,
        _ => 0,
    };
    let (a, b) = (&current[start..=last], &new[start..=last]);
    if last + 1 < current.len() && is_filler(a) && is_filler(b) {
        (start, a.len())
    } else {
        whole
    }
}

/// A return-thunk site routed to the return thunk at `thunk`: the site's
/// own branch (`jmp` or `jcc`, with its `cs` prefixes) to the new target.
pub(super) fn routed_form(site: &Site, thunk: usize) -> Result<Encoded, &'static str> {
    let p = prefix_count(site).ok_or(PREFIXED)?;
    let at = site.addr + p;
    let e = match site.form {
        BranchKind::Jmp => x86::jmp_rel32(at, thunk),
        BranchKind::Jcc(cc) => x86::jcc_rel32(cc, at, thunk),
        BranchKind::Call => return Err("a call to the return thunk is not a return site"),
    }
    .map_err(|_| "the supplied return thunk is out of rel32 reach of the site")?;
    Ok(with_cs(p, &e))
}

/// How many `cs` prefixes `site` has: its length beyond its branch's
/// canonical one (`None` if shorter, or too long for any instruction).
fn prefix_count(site: &Site) -> Option<usize> {
    let canonical = match site.form {
        BranchKind::Call | BranchKind::Jmp => 5,
        BranchKind::Jcc(_) => 6,
    };
    (site.len as usize)
        .checked_sub(canonical)
        .filter(|_| site.len <= 15)
}

/// `p` `cs` prefixes, then `e`.
fn with_cs(p: usize, e: &Encoded) -> Encoded {
    let mut b = Form::new();
    b.extend_from_slice(&[CS; 15][..p]);
    b.extend_from_slice(e);
    b.bytes()
}

/// Whether `current` is `site`'s own branch (`jmp rel32`, or `jcc rel32`
/// with the same condition, after the site's `cs` prefixes) to a target in
/// `image`'s text: a return site routed earlier by [`ReturnSites::Thunk`].
pub(super) fn routed_elsewhere(image: &Image<'_>, site: &Site, current: &[u8]) -> bool {
    let Some(p) = prefix_count(site) else {
        return false;
    };
    let op: &[u8] = match site.form {
        BranchKind::Jmp => &[0xe9],
        BranchKind::Jcc(cc) => &[0x0f, 0x80 + cc as u8],
        BranchKind::Call => return false,
    };
    let Some((prefixes, branch)) = current.split_at_checked(p) else {
        return false;
    };
    if !prefixes.iter().all(|&b| b == CS) || branch.len() != op.len() + 4 || !branch.starts_with(op)
    {
        return false;
    }
    let rel = i32::from_le_bytes(branch[op.len()..].try_into().unwrap_or_default());
    let target = (site.addr + current.len()).wrapping_add_signed(rel as isize);
    image.contains_text(target, 1)
}

/// The original form of a site: its branch to the thunk, after its `cs`
/// prefixes (the only prefix discovery keeps in a site).
pub(super) fn original_form(site: &Site) -> Option<Encoded> {
    let p = prefix_count(site)?;
    let at = site.addr + p;
    let e = match site.form {
        BranchKind::Call => x86::call_rel32(at, site.target),
        BranchKind::Jmp => x86::jmp_rel32(at, site.target),
        BranchKind::Jcc(cc) => x86::jcc_rel32(cc, at, site.target),
    }
    .ok()?;
    Some(with_cs(p, &e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::{Cond, Reg};

    fn site(len: u8, form: BranchKind, reg: Reg) -> Site {
        Site {
            addr: 0x1000,
            len,
            form,
            kind: SiteKind::IndirectThunk(reg),
            target: 0x2000,
        }
    }

    #[test]
    fn prefixed_sites_use_every_byte() {
        let forms = |s: &Site| {
            let f = |m| inline_form(s, m).map(|e| e.to_vec());
            (f(Mode::Lfence), f(Mode::Plain))
        };
        // cs call through r8: lfence fits in 6 bytes.
        let (l, p) = forms(&site(6, BranchKind::Call, Reg::R8));
        assert_eq!(l.unwrap(), [0x0f, 0xae, 0xe8, 0x41, 0xff, 0xd0]);
        assert_eq!(p.unwrap(), [0x0f, 0x1f, 0x00, 0x41, 0xff, 0xd0]);
        // Through rax, the byte left over: cs on a call, int3 after a jmp.
        let (l, p) = forms(&site(6, BranchKind::Call, Reg::Rax));
        assert_eq!(l.unwrap(), [0x0f, 0xae, 0xe8, 0x2e, 0xff, 0xd0]);
        assert_eq!(p.unwrap(), [0x0f, 0x1f, 0x00, 0x2e, 0xff, 0xd0]);
        let (l, p) = forms(&site(6, BranchKind::Jmp, Reg::Rax));
        assert_eq!(l.unwrap(), [0x0f, 0xae, 0xe8, 0xff, 0xe0, 0xcc]);
        assert_eq!(p.unwrap(), [0x0f, 0x1f, 0x00, 0xff, 0xe0, 0xcc]);
        // 5 bytes through r8: no room for lfence (as before).
        let (l, p) = forms(&site(5, BranchKind::Call, Reg::R8));
        assert!(l.unwrap_err().starts_with("lfence;"));
        assert_eq!(p.unwrap(), [0x66, 0x90, 0x41, 0xff, 0xd0]);
        // cs jne through rax, 7 bytes: jne over [lfence or NOP3;] jmp.
        let (l, p) = forms(&site(7, BranchKind::Jcc(Cond::Ne), Reg::Rax));
        assert_eq!(l.unwrap(), [0x74, 5, 0x0f, 0xae, 0xe8, 0xff, 0xe0]);
        assert_eq!(p.unwrap(), [0x74, 5, 0x0f, 0x1f, 0x00, 0xff, 0xe0]);
        // Through r9 it does not fit: plain as for 6 bytes, int3 after.
        let (l, p) = forms(&site(7, BranchKind::Jcc(Cond::E), Reg::R9));
        assert!(l.unwrap_err().starts_with("jcc;"));
        assert_eq!(p.unwrap(), [0x75, 5, 0x41, 0xff, 0xe1, 0xcc, 0xcc]);
        // The original keeps its cs prefix, its rel32 from the opcode on.
        let o = original_form(&site(6, BranchKind::Call, Reg::R8)).unwrap();
        assert_eq!(*o, [0x2e, 0xe8, 0xfa, 0x0f, 0, 0]);
    }

    #[test]
    fn switching_fillers_edits_the_filler_alone() {
        let lf = [0x0f, 0xae, 0xe8, 0x41, 0xff, 0xd0];
        let nop = [0x0f, 0x1f, 0x00, 0x41, 0xff, 0xd0];
        assert_eq!(edit_span(&lf, &nop), (0, 3));
        let jl = [0x74, 5, 0x0f, 0xae, 0xe8, 0xff, 0xe0];
        let jn = [0x74, 5, 0x0f, 0x1f, 0x00, 0xff, 0xe0];
        assert_eq!(edit_span(&jl, &jn), (2, 3));
        assert_eq!(edit_span(&jn, &jl), (2, 3));
        // A different branch or condition: the whole site.
        let other = [0x75, 5, 0x0f, 0x1f, 0x00, 0xff, 0xe0];
        assert_eq!(edit_span(&jl, &other), (0, 7));
        let call = [0x2e, 0xe8, 0xfa, 0x0f, 0, 0];
        assert_eq!(edit_span(&call, &lf), (0, 6));
    }
}
