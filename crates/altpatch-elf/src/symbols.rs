//! Which symbols make a relocation against them a site: the thunk names,
//! the return thunk, the static-call and ifunc marks, `STT_GNU_IFUNC`; and
//! the per-symbol memo that lets discovery look at each name once.

use object::elf;

use crate::sites::{SiteKind, ThunkName, ThunkNames, names};

/// What a symbol name makes of a relocation against it.
pub(super) enum Class {
    Site(SiteKind),
    BadThunk,
}

pub(super) fn classify(name: &[u8], sym_type: u8, marks: &Marks<'_>) -> Option<Class> {
    match marks.thunks.classify(name) {
        Some(ThunkName::Indirect(r)) => return Some(Class::Site(SiteKind::IndirectThunk(r))),
        Some(ThunkName::BadRegister) => return Some(Class::BadThunk),
        Some(ThunkName::Return) => return Some(Class::Site(SiteKind::ReturnThunk)),
        None => {}
    }
    if marks.static_call.find(name).is_some() {
        return Some(Class::Site(SiteKind::StaticCall));
    }
    if sym_type == elf::STT_GNU_IFUNC.0 || marks.ifunc.find(name).is_some() {
        return Some(Class::Site(SiteKind::Ifunc));
    }
    None
}

/// The names that make sites: the thunk names, and the name marks of
/// static-call trampolines and ifunc stubs, each looked for in every symbol
/// name a relocation in code names (thousands of mangled names of ~80
/// bytes in a Rust program) with SIMD searchers built once per image read.
pub(super) struct Marks<'n> {
    thunks: &'n ThunkNames,
    static_call: memchr::memmem::Finder<'static>,
    ifunc: memchr::memmem::Finder<'static>,
}

impl<'n> Marks<'n> {
    pub(super) fn new(thunks: &'n ThunkNames) -> Marks<'n> {
        Marks {
            thunks,
            static_call: memchr::memmem::Finder::new(names::STATIC_CALL_TRAMPOLINE_MARK),
            ifunc: memchr::memmem::Finder::new(names::IFUNC_STUB_MARK),
        }
    }
}

/// A byte per symbol remembering its [`Class`] (and whether its name was
/// recorded), so discovery looks at each symbol's name once.
pub(super) mod memo {
    use super::Class;
    use crate::sites::SiteKind;
    use alloc::collections::BTreeMap;
    use alloc::string::String;

    /// Not classified yet.
    pub(crate) const UNSEEN: u8 = 0;
    /// Not a site symbol.
    const NONE: u8 = 0x7f;
    /// A thunk name with no such register.
    const BAD_THUNK: u8 = 0x7e;
    /// Set once the symbol's name is in [`FoundSites::names`](crate::FoundSites::names).
    const NAMED: u8 = 0x80;

    pub(crate) fn encode(class: Option<Class>) -> u8 {
        match class {
            None => NONE,
            Some(Class::BadThunk) => BAD_THUNK,
            Some(Class::Site(k)) => {
                let (kind, reg) = k.encode();
                // kind 1..=4, reg 0..=15: 0x10..=0x4f, clear of the tags.
                kind << 4 | reg
            }
        }
    }

    pub(crate) fn decode(m: u8) -> Option<Class> {
        match m & !NAMED {
            NONE => None,
            BAD_THUNK => Some(Class::BadThunk),
            m => SiteKind::decode(m >> 4, m & 0xf).map(Class::Site),
        }
    }

    /// Records the name of the symbol at `value` the first time one of its
    /// sites is kept (the first of several aliases at one address wins).
    pub(crate) fn name_once<'d>(
        m: &mut u8,
        names: &mut BTreeMap<usize, String>,
        value: u64,
        name: impl FnOnce() -> &'d [u8],
    ) {
        if *m & NAMED == 0 {
            *m |= NAMED;
            names
                .entry(value as usize)
                .or_insert_with(|| String::from_utf8_lossy(name()).into_owned());
        }
    }
}
