//! Site shapes: what a site in its original form becomes depends only on
//! its kind and register, its branch form and condition, and its length,
//! never on its address (but for Indirect Target Selection, which needs
//! one test of it), and a program has a few dozen shapes. Computed once
//! each, they let start-up plan a site without building anything.

use super::super::its;
use super::Routes;
use super::inline_form;
use crate::arch::x86_64::{BranchKind, Encoded};
use crate::retpoline::{Mode, Outcome, ReturnSites};
use crate::sites::{Site, SiteKind};

/// What a site of one shape becomes, when it is in its original form.
#[derive(Clone, Copy)]
pub(super) enum Fast {
    /// The inline form, as a little-endian integer (zero-padded).
    Inline(u64),
    /// Left as it is, with this outcome.
    Keep(Outcome),
    /// Decided by the general path (a routed return site).
    General,
    /// On a CPU Indirect Target Selection affects: the inline form (an
    /// integer, as `Inline`) where its branch's last byte, `end` bytes into
    /// the site, is in the upper half of a cache line; else a branch to the
    /// ITS thunk at `thunk`.
    InlineOrIts { new: u64, end: u8, thunk: usize },
}

/// A site shape's forms, computed once: a form depends on the site's kind
/// and register, its branch form and condition, and its length, never on
/// its address, and a program has a few dozen shapes.
#[derive(Clone, Copy)]
pub(super) struct Shape {
    /// The original branch's opcode bytes (little-endian) and their count;
    /// the rel32 follows them. Its canonical length is `op_len + 4`.
    pub(super) op: u64,
    pub(super) op_len: u8,
    /// The inline form in the mode, or why there is none.
    pub(super) inline: Result<Encoded, &'static str>,
    /// The shape path's decision.
    pub(super) fast: Fast,
    /// Whether that decision holds only for this crate's thunks (another
    /// target must be looked at: a PLT stub, a return retpoline).
    pub(super) own_only: bool,
}

/// 16 thunk registers and the return thunk.
const TARGETS: usize = 17;
/// `call`, `jmp`, and `jcc` per condition.
const FORMS: usize = 18;

/// [`Shape`]s by (target, form), computed on first use, for sites with
/// `PREFIXES` `cs` prefixes (0, or 1 as compilers emit them).
pub(super) struct ShapeCache<const PREFIXES: u8> {
    mode: Mode,
    routes: Routes,
    slots: alloc::boxed::Box<[Option<Shape>; TARGETS * FORMS]>,
}

impl<const PREFIXES: u8> ShapeCache<PREFIXES> {
    pub(super) fn new(mode: Mode, routes: Routes) -> ShapeCache<PREFIXES> {
        let slots = alloc::boxed::Box::new([None; TARGETS * FORMS]);
        ShapeCache {
            mode,
            routes,
            slots,
        }
    }

    /// The shape of `site`, a thunk or return-thunk site; `None` unless the
    /// site is its branch after `PREFIXES` `cs` prefixes.
    #[inline]
    pub(super) fn get(&mut self, site: &Site) -> Option<&Shape> {
        let target = match site.kind {
            SiteKind::IndirectThunk(r) => r as usize,
            _ => 16,
        };
        let (form, op_len) = match site.form {
            BranchKind::Call => (0, 1),
            BranchKind::Jmp => (1, 1),
            BranchKind::Jcc(cc) => (2 + cc as usize, 2),
        };
        if site.len != op_len + 4 + PREFIXES {
            return None;
        }
        let (mode, routes) = (self.mode, self.routes);
        let slot = &mut self.slots[target * FORMS + form];
        Some(slot.get_or_insert_with(|| Shape::of(site, mode, routes)))
    }
}

impl Shape {
    /// The shape of `site` (its branch after at most one `cs` prefix) in
    /// `mode`.
    fn of(site: &Site, mode: Mode, routes: Routes) -> Shape {
        let (opcode, opcode_len) = match site.form {
            BranchKind::Call => (0xe8, 1),
            BranchKind::Jmp => (0xe9, 1),
            BranchKind::Jcc(cc) => (0x0f | (0x80 + cc as u64) << 8, 2),
        };
        let prefixes = site.len - opcode_len - 4;
        let cs = if prefixes == 1 { 0x2e } else { 0 };
        let (op, op_len) = (cs | opcode << (8 * prefixes), prefixes + opcode_len);
        let inline = inline_form(site, mode);
        let ret = site.kind == SiteKind::ReturnThunk;
        let fast = match inline {
            _ if ret && matches!(routes.returns, ReturnSites::Thunk(_)) => Fast::General,
            // Whether an ITS thunk is needed depends on the address: where
            // in the form the branch ends, and which thunk, decide it.
            Ok(b) if routes.its && !ret && mode != Mode::Generic && b.len() <= 8 => {
                match (its::branch_end(&b), its::thunk_for(site)) {
                    (Some(end), Some(thunk)) => Fast::InlineOrIts {
                        new: u64::from_le_bytes(b.head8()),
                        end: end as u8,
                        thunk,
                    },
                    _ => Fast::General,
                }
            }
            Ok(b) if b.len() <= 8 => Fast::Inline(u64::from_le_bytes(b.head8())),
            Ok(_) => Fast::General,
            Err(_) if mode == Mode::Generic => Fast::Keep(Outcome::ViaThunk),
            Err(why) => Fast::Keep(Outcome::Refused(why)),
        };
        // Another object's return thunk may be a return retpoline, which
        // only `plain` drops (only this crate's is known to be a bare
        // `ret`); another object's thunk may be reached through a PLT stub
        // (see `general`).
        let own_only = (ret && mode != Mode::Plain) || (inline.is_err() && mode == Mode::Generic);
        Shape {
            op,
            op_len,
            inline,
            fast,
            own_only,
        }
    }
}
