//! The names that make a symbol a retpoline thunk: the built-in ones and
//! the aliases a project registers.

use alloc::string::String;
use alloc::vec::Vec;

use super::names;
use crate::arch::x86_64::Reg;

/// Which symbol names are retpoline thunks, for site discovery
/// (`altpatch::elf::read_sites_with`), the
/// audit (`altpatch::elf::AuditAllow::thunk_names`) and the CLI
/// (`--thunk-prefix`, `--return-thunk`).
///
/// Always included: `__x86_indirect_thunk_<reg>` (GCC's and rustc's
/// external thunks), `__llvm_retpoline_<reg>` (LLVM's local thunks), the
/// names newer Linux kernels branch to (`__x86_indirect_call_thunk_<reg>`
/// and `__x86_indirect_jump_thunk_<reg>` with call-depth tracking,
/// `__x86_indirect_its_thunk_<reg>` for Indirect Target Selection) and
/// `__x86_return_thunk`. A name ending in `_array` (the array holding a
/// set of thunks, whose address is taken, never called) is no thunk. Projects that alias the thunks under other names
/// add them: a prefix followed by a register name (`rax` ... `r15`) is an
/// indirect thunk through that register.
///
/// ```
/// use altpatch::sites::ThunkNames;
/// use altpatch::x86::Reg;
///
/// let names = ThunkNames::new()
///     .indirect_prefix("__x86_retpoline_") // the name Linux 5.9–5.11 used
///     .return_thunk("my_return_thunk");
/// use altpatch::sites::ThunkName;
/// assert_eq!(names.classify(b"__x86_retpoline_rax"), Some(ThunkName::Indirect(Reg::Rax)));
/// assert_eq!(names.classify(b"__llvm_retpoline_r11"), Some(ThunkName::Indirect(Reg::R11)));
/// assert_eq!(names.classify(b"__x86_indirect_thunk_rsp"), Some(ThunkName::BadRegister));
/// assert_eq!(names.classify(b"my_return_thunk"), Some(ThunkName::Return));
/// assert_eq!(names.classify(b"memcpy"), None);
/// assert_eq!(names.classify(b"__x86_indirect_its_thunk_r11"), Some(ThunkName::Indirect(Reg::R11)));
/// assert_eq!(names.classify(b"__x86_indirect_call_thunk_rdx"), Some(ThunkName::Indirect(Reg::Rdx)));
/// assert_eq!(names.classify(b"__x86_indirect_jump_thunk_array"), None);
/// assert!(!ThunkNames::new().is_thunk(b"__x86_retpoline_rax"));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ThunkNames {
    prefixes: Vec<String>,
    returns: Vec<String>,
}

/// The built-in indirect-thunk prefixes.
const BUILT_IN: [&str; 5] = [
    names::INDIRECT_THUNK_PREFIX,
    names::LLVM_RETPOLINE_PREFIX,
    "__x86_indirect_call_thunk_",
    "__x86_indirect_jump_thunk_",
    "__x86_indirect_its_thunk_",
];

impl ThunkNames {
    /// The built-in names only.
    pub fn new() -> ThunkNames {
        ThunkNames::default()
    }

    /// Also treats `<prefix><reg>` as an indirect thunk through `reg`.
    pub fn indirect_prefix(mut self, prefix: &str) -> ThunkNames {
        self.prefixes.push(prefix.into());
        self
    }

    /// Also treats `name` as a return thunk.
    pub fn return_thunk(mut self, name: &str) -> ThunkNames {
        self.returns.push(name.into());
        self
    }

    /// What `name` names, if it is a thunk's.
    pub fn classify(&self, name: &[u8]) -> Option<ThunkName> {
        if self.is_return_thunk(name) {
            return Some(ThunkName::Return);
        }
        let rest = BUILT_IN
            .iter()
            .copied()
            .chain(self.prefixes.iter().map(String::as_str))
            .find_map(|p| name.strip_prefix(p.as_bytes()))?;
        // An array of thunks (this crate's, Linux's) is not a thunk: its
        // address is taken, never called.
        if rest == b"array" {
            return None;
        }
        Some(
            match core::str::from_utf8(rest).ok().and_then(Reg::from_name) {
                Some(Reg::Rsp) | None => ThunkName::BadRegister,
                Some(r) => ThunkName::Indirect(r),
            },
        )
    }

    /// Whether `name` is a return thunk's.
    pub fn is_return_thunk(&self, name: &[u8]) -> bool {
        name == names::RETURN_THUNK.as_bytes() || self.returns.iter().any(|r| r.as_bytes() == name)
    }

    /// Whether `name` is any thunk's (indirect, even with a bad register,
    /// or return).
    pub fn is_thunk(&self, name: &[u8]) -> bool {
        self.classify(name).is_some()
    }
}

/// What a thunk name says ([`ThunkNames::classify`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThunkName {
    /// An indirect branch through this register.
    Indirect(Reg),
    /// A thunk prefix followed by no register a thunk can use (`rsp`, or
    /// not a register name).
    BadRegister,
    /// A return thunk.
    Return,
}
