//! What may bypass the thunks without failing the audit: the rules a
//! program or a kernel gates on.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use super::audit_branch::IndirectBranch;
use super::origin::{Origin, glob};
use crate::sites::ThunkNames;

/// What may bypass the thunks without failing the audit.
///
/// A kernel gates on it with the rules objtool applies implicitly: code
/// built without retpolines on purpose (`.init.text`), branches through a
/// table the kernel patches itself (`call *pv_ops+N(%rip)`), and
/// instructions annotated as safe (`ANNOTATE_RETPOLINE_SAFE`: read from
/// the image's `.discard.retpoline_safe` or `.discard.annotate_insn` when
/// it keeps them, or from a list of addresses).
///
/// ```
/// use altpatch::elf::{AuditAllow, Origin};
/// let allow = AuditAllow::default().pattern("std::*").origin(Origin::Plt);
/// assert!(allow.matches_name("std::io::stdio::_print"));
/// assert!(!allow.matches_name("my_crate::dispatch"));
///
/// let kernel = AuditAllow::default()
///     .section(".init.text")
///     .target("pv_ops*")
///     .address_list("# objtool's annotations\n0xffffffff81000010\n")?;
/// # let _ = kernel;
/// # Ok::<(), altpatch::elf::AddressListError>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct AuditAllow {
    patterns: Vec<String>,
    origins: Vec<Origin>,
    sections: Vec<String>,
    targets: Vec<String>,
    /// Sorted.
    addresses: Vec<u64>,
    pub(super) thunks: ThunkNames,
}

impl AuditAllow {
    /// Also allows functions whose name — demangled without its hash, or
    /// as in the symbol table — matches `pattern`, where `*` matches any run
    /// of characters (`std::*`, `*::dispatch`, an exact C name).
    pub fn pattern(mut self, pattern: &str) -> AuditAllow {
        self.patterns.push(pattern.into());
        self
    }

    /// Recognises these thunk names (aliases beyond the built-in ones): the
    /// thunks' own bodies are never reported, and branches to them are
    /// the routed kind.
    ///
    /// ```
    /// use altpatch::elf::AuditAllow;
    /// use altpatch::sites::ThunkNames;
    /// let rules = AuditAllow::default()
    ///     .thunk_names(ThunkNames::new().indirect_prefix("__x86_retpoline_"));
    /// # let _ = rules;
    /// ```
    pub fn thunk_names(mut self, names: ThunkNames) -> AuditAllow {
        self.thunks = names;
        self
    }

    /// Also allows everything of `origin`.
    pub fn origin(mut self, origin: Origin) -> AuditAllow {
        self.origins.push(origin);
        self
    }

    /// Also allows every branch in a section whose name matches `pattern`
    /// (`.init.text`, `.init.*`): a kernel's init code, built without
    /// retpolines on purpose and freed after boot.
    pub fn section(mut self, pattern: &str) -> AuditAllow {
        self.sections.push(pattern.into());
        self
    }

    /// Also allows a branch through memory whose address is inside a data
    /// symbol matching `pattern`: `pv_ops*` allows `call
    /// *pv_ops+0x18(%rip)` (and the absolute form a kernel's code model
    /// uses), a table the kernel patches into direct calls itself.
    pub fn target(mut self, pattern: &str) -> AuditAllow {
        self.targets.push(pattern.into());
        self
    }

    /// Also allows the branches at these link-time addresses (annotated as
    /// safe where the image does not keep the annotations).
    pub fn addresses(mut self, addresses: impl IntoIterator<Item = u64>) -> AuditAllow {
        self.addresses.extend(addresses);
        self.addresses.sort_unstable();
        self
    }

    /// [`addresses`](Self::addresses) from text: one hexadecimal address
    /// per line (`0x` optional), `#` starting a comment, blank lines
    /// ignored. A line that is not an address is an error naming it.
    ///
    /// ```
    /// use altpatch::elf::AuditAllow;
    /// assert!(AuditAllow::default().address_list("0x1000 # ok\nffff8000\n").is_ok());
    /// let e = AuditAllow::default().address_list("0x1000\nnot-hex\n").unwrap_err();
    /// assert_eq!(e.line, 2);
    /// ```
    pub fn address_list(self, text: &str) -> Result<AuditAllow, AddressListError> {
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let word = line.split('#').next().unwrap_or("").trim();
            if word.is_empty() {
                continue;
            }
            let hex = word.strip_prefix("0x").unwrap_or(word);
            let addr = u64::from_str_radix(hex, 16).map_err(|_| AddressListError {
                line: i + 1,
                text: word.into(),
            })?;
            out.push(addr);
        }
        Ok(self.addresses(out))
    }

    /// Whether a function called `name` (demangled, or raw) is allowed by
    /// pattern.
    pub fn matches_name(&self, name: &str) -> bool {
        self.patterns.iter().any(|p| glob(p, name))
    }

    /// Whether `b` (in a function whose demangled name is `demangled`) is
    /// allowed, by any rule.
    pub(super) fn allows(&self, b: &IndirectBranch, demangled: &str) -> bool {
        self.origins.contains(&b.origin)
            || self.matches_name(demangled)
            || self.matches_name(&b.function)
            || self.sections.iter().any(|p| glob(p, &b.section))
            || b.target
                .as_deref()
                .is_some_and(|t| self.targets.iter().any(|p| glob(p, t)))
            || self.addresses.binary_search(&b.addr).is_ok()
    }
}

/// A line of an address list that is not an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressListError {
    /// Its line number, from 1.
    pub line: usize,
    /// What it holds.
    pub text: String,
}

impl fmt::Display for AddressListError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}: `{}` is not a hexadecimal address",
            self.line, self.text
        )
    }
}

impl core::error::Error for AddressListError {}
