//! Where audited code came from, by its symbol's name, and the name
//! patterns `--allow` takes.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

/// Where the code holding an indirect branch came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Origin {
    /// Rust code of this build (any crate but the prebuilt standard
    /// library's): compiled with the retpoline flags or not.
    Compiled,
    /// The prebuilt Rust standard library (`core`, `std`, `alloc` and their
    /// dependencies) and the C runtime's start-up objects (`_start`,
    /// `_init`, ...): not compiled by this build, so no flag reaches them.
    Prebuilt,
    /// Other code with C (unmangled) symbol names: C objects linked in.
    C,
    /// Procedure linkage table stubs (`.plt`, `.plt.sec`, `.plt.got`):
    /// `jmp *GOT` for calls to shared objects.
    Plt,
}

impl Origin {
    /// The name `--allow-origin` takes: `compiled`, `prebuilt`, `c`, `plt`.
    ///
    /// ```
    /// use altpatch::elf::Origin;
    /// assert_eq!(Origin::from_name("plt"), Some(Origin::Plt));
    /// assert_eq!(Origin::Prebuilt.name(), "prebuilt");
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            Origin::Compiled => "compiled",
            Origin::Prebuilt => "prebuilt",
            Origin::C => "c",
            Origin::Plt => "plt",
        }
    }

    /// The origin called `name`.
    pub fn from_name(name: &str) -> Option<Origin> {
        [Origin::Compiled, Origin::Prebuilt, Origin::C, Origin::Plt]
            .into_iter()
            .find(|o| o.name() == name)
    }
}

/// Whether `name` matches `pattern` (`*`: any run of characters).
pub(super) fn glob(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for p in middle {
        match rest.find(p) {
            Some(i) => rest = &rest[i + p.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

/// The prebuilt crates of the Rust standard library.
const PREBUILT_CRATES: &[&str] = &[
    "core",
    "std",
    "alloc",
    "std_detect",
    "hashbrown",
    "rustc_demangle",
    "addr2line",
    "gimli",
    "object",
    "miniz_oxide",
    "memchr",
    "adler2",
    "panic_unwind",
    "panic_abort",
    "unwind",
    "compiler_builtins",
    "__rustc",
    "proc_macro",
    "test",
];

/// C runtime start-up and toolchain symbols.
const RUNTIME_SYMBOLS: &[&str] = &[
    "_start",
    "_init",
    "_fini",
    "frame_dummy",
    "register_tm_clones",
    "deregister_tm_clones",
    "__do_global_dtors_aux",
    "_dl_relocate_static_pie",
    "__libc_csu_init",
    "__libc_csu_fini",
    "rust_eh_personality",
];

/// The demangled name without its hash, and the crate that defines it as
/// far as the name shows (see [`crate_of`]).
pub(super) fn demangle(raw: &str) -> (String, Option<String>) {
    let Ok(d) = rustc_demangle::try_demangle(raw) else {
        return (raw.into(), None);
    };
    let name = alloc::format!("{d:#}");
    let krate = crate_of(&name).map(str::to_string);
    (name, krate)
}

/// The crate a demangled path belongs to: its first segment; for an impl
/// `<Type as Trait>::f` the type's crate, else the trait's; for an
/// inherent impl on a primitive, slice or reference (`<str>::f`, which only
/// the standard library may define) `core`.
fn crate_of(path: &str) -> Option<&str> {
    let p = path.trim_start_matches(['&', '*']);
    let p = p
        .trim_start_matches("mut ")
        .trim_start_matches("const ")
        .trim_start_matches("dyn ");
    if let Some(rest) = p.strip_prefix('<') {
        // The group up to its matching `>`, split at a top-level " as ".
        let mut depth = 0usize;
        let mut end = rest.len();
        let mut split = None;
        for (i, c) in rest.char_indices() {
            match c {
                '<' => depth += 1,
                '>' if depth == 0 => {
                    end = i;
                    break;
                }
                '>' => depth -= 1,
                ' ' if depth == 0 && split.is_none() && rest[i..].starts_with(" as ") => {
                    split = Some(i)
                }
                _ => {}
            }
        }
        let inner = &rest[..end];
        let (ty, tr) = match split {
            Some(i) => (&inner[..i], Some(&inner[i + 4..])),
            None => (inner, None),
        };
        return crate_of(ty)
            .or_else(|| tr.and_then(crate_of))
            .or(Some("core"));
    }
    let seg = p.split("::").next()?;
    let ident = !seg.is_empty() && seg.chars().all(|c| c == '_' || c.is_ascii_alphanumeric());
    (p.contains("::") && ident).then_some(seg)
}

/// Where a function came from. A function that calls or jumps to a thunk
/// was compiled with the retpoline flags, whatever its name (generic code
/// of `core` instantiated in the program's crates, say); otherwise the
/// crate its name shows decides.
pub(super) fn origin_of(raw: &str, krate: Option<&str>, calls_thunks: bool) -> Origin {
    if calls_thunks {
        return Origin::Compiled;
    }
    match krate {
        Some(k) if PREBUILT_CRATES.contains(&k) => Origin::Prebuilt,
        Some(_) => Origin::Compiled,
        None if RUNTIME_SYMBOLS.contains(&raw) || raw.starts_with("__rust_") => Origin::Prebuilt,
        None if raw.starts_with("_ZN") || raw.starts_with("_R") => Origin::Compiled,
        None => Origin::C,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("std::*", "std::io::stdio::_print"));
        assert!(glob("*::dispatch", "my::dispatch"));
        assert!(glob("a*b*c", "a-x-b-y-c"));
        assert!(!glob("a*b*c", "a-x-c-y-b"));
        assert!(glob("planted", "planted"));
        assert!(!glob("planted", "planted2"));
        assert!(glob("*", ""));
    }

    #[test]
    fn origins_from_names() {
        let o = |raw: &str| {
            let (_, k) = demangle(raw);
            origin_of(raw, k.as_deref(), false)
        };
        assert_eq!(
            o("_ZN4core3fmt5write17h0123456789abcdefE"),
            Origin::Prebuilt
        );
        assert_eq!(
            o("_ZN8altpatch4poke5linux4trap10on_sigtrap17hfb9ad9eceaeb0eacE"),
            Origin::Compiled
        );
        assert_eq!(
            o("_RNvCsfLfy6EI15iL_7___rustc10rust_panic"),
            Origin::Prebuilt
        );
        assert_eq!(o("_start"), Origin::Prebuilt);
        for (path, krate) in [
            ("<str>::to_uppercase", Some("core")),
            (
                "<u8 as <[_]>::to_vec_in::ConvertVec>::to_vec::<alloc::alloc::Global>",
                Some("core"),
            ),
            (
                "<&[u8] as <alloc::ffi::c_str::CString>::new::SpecNewImpl>::spec_new_impl",
                Some("alloc"),
            ),
            (
                "<my_crate::Thing as core::fmt::Display>::fmt",
                Some("my_crate"),
            ),
            ("<u32 as my_crate::Trait>::f", Some("my_crate")),
            ("my_crate::f::{closure#0}", Some("my_crate")),
            ("main", None),
        ] {
            assert_eq!(crate_of(path), krate, "{path}");
        }
        assert_eq!(o("sqlite3VdbeExec"), Origin::C);
        // An impl for a primitive: the trait's crate; for a type: its crate.
        assert_eq!(
            o("_RNvXst_NtNtCsgEmfK2I1SDS_4core3str7patternReNtB5_7Pattern15is_contained_in"),
            Origin::Prebuilt
        );
        assert_eq!(
            o(
                "_ZN60_$LT$my_crate..Thing$u20$as$u20$core..fmt..Display$GT$3fmt17h0123456789abcdefE"
            ),
            Origin::Compiled
        );
    }
}
