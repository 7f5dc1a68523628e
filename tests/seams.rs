//! The seams, checked: outside the arch seam only listed files name
//! x86-64, and only the OS seam asks which OS the crate is built for
//! (ARCHITECTURE.md, "Adding an architecture" and "Adding an OS").

use std::collections::BTreeSet;

#[path = "common/source.rs"]
mod source;
use source::crate_sources;

/// Files outside the arch seam that may name x86-64 directly
/// (`arch::x86_64`, the `x86` alias, iced-x86, raw-cpuid), each with why.
/// Everything else names only `crate::arch`'s contract, so a second
/// architecture leaves it alone (ARCHITECTURE.md, "Adding an
/// architecture"). A file joining this list is a seam leak to fix or to
/// argue for here.
const X86_OUTSIDE_ARCH: &[(&str, &str)] = &[
    ("lib.rs", "the façade: `altpatch::x86`"),
    (
        "crates/altpatch-core/src/lib.rs",
        "the core's supported-target gate",
    ),
    (
        "bin/altpatch.rs",
        "the CLI: retpoline site listings and the audits",
    ),
    (
        "static_call/mod.rs",
        "the `ENDBR64` re-export (its old path)",
    ),
    (
        "sites/mod.rs",
        "`SiteKind::IndirectThunk(Reg)`: retpoline sites",
    ),
    (
        "sites/embedded.rs",
        "the embedded table's encoding of thunk sites",
    ),
    ("sites/thunk_names.rs", "x86 thunk names (retpolines only)"),
    ("elf/mod.rs", "GOT-call forms at relocations"),
    ("elf/branch.rs", "the rel32 branch a relocation names"),
    (
        "elf/prefix.rs",
        "x86 prefixes before a branch, proven by decoding",
    ),
    ("elf/audit.rs", "the retpoline audit (x86 only)"),
    ("elf/cet.rs", "the CET audit (x86 only)"),
];

#[test]
fn only_listed_files_name_x86_outside_the_arch_seam() {
    let mut leaks = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for (rel, text) in crate_sources() {
        // The seam, and the Linux backend's per-architecture folder.
        if rel.starts_with("arch/") || rel.starts_with("os/linux/x86_64/") {
            continue;
        }
        // Retpolines are x86-only as a whole (the aarch64 issue keeps
        // them so).
        if rel.starts_with("retpoline/") {
            continue;
        }
        let names_x86 = ["arch::x86_64", "x86::", "iced_x86", "raw_cpuid", " as x86"]
            .iter()
            .any(|p| text.contains(p));
        if !names_x86 {
            continue;
        }
        if X86_OUTSIDE_ARCH.iter().any(|(f, _)| *f == rel) {
            seen.insert(rel);
        } else {
            leaks.insert(rel);
        }
    }
    assert!(
        leaks.is_empty(),
        "files outside the arch seam (crates/altpatch-core/src/arch/) naming x86-64 directly (use the crate::arch contract, \
         or list them in X86_OUTSIDE_ARCH with the reason): {leaks:?}"
    );
    let stale: Vec<_> = X86_OUTSIDE_ARCH
        .iter()
        .filter(|(f, _)| !seen.contains(*f))
        .collect();
    assert!(
        stale.is_empty(),
        "listed but no longer naming x86: {stale:?}"
    );
}

/// The files that may ask which OS the crate is built for: the OS seam's
/// declaration of its backends and its choice of the build's `Host`
/// (issue 27: "no `target_os` cfg outside the OS backend").
const TARGET_OS_FILES: &[&str] = &["os/mod.rs", "host.rs"];

#[test]
fn only_the_os_seam_asks_which_os() {
    let mut asking = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for (rel, text) in crate_sources() {
        if text.contains("target_os") {
            if TARGET_OS_FILES.contains(&rel.as_str()) {
                seen.insert(rel);
            } else {
                asking.insert(rel);
            }
        }
    }
    assert!(
        asking.is_empty(),
        "files outside the OS seam testing target_os (go through host::Host, \
         or a backend's own folder chosen in os/mod.rs): {asking:?}"
    );
    assert_eq!(
        seen.len(),
        TARGET_OS_FILES.len(),
        "the OS seam's own files should be where the choice is made: {seen:?}"
    );
}
