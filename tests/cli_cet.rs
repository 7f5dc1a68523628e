//! `altpatch audit --cet`: every indirect-branch target altpatch created in
//! an image (static-call trampolines, ifunc stubs, closure trampolines)
//! must start with `endbr64`. A fixture built today passes; a copy whose
//! file bytes lose one trampoline's `endbr64` fails, naming it.

#[path = "common/cli.rs"]
mod cli;
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use cli::{altpatch, text};

use altpatch::elf::{CetTargetKind, audit_cet};

/// A 4-byte NOP: what a trampoline without its landing pad would start
/// with (it still runs; only an indirect call to it faults under IBT).
const NOP4: [u8; 4] = [0x0f, 0x1f, 0x40, 0x00];

/// A private copy of the fixture's `cet` program.
fn copy_of_cet(tag: &str) -> PathBuf {
    let src = common::build_fixture("sites", true).join("cet");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("cli_cet")
        .join(tag);
    std::fs::create_dir_all(&dir).unwrap();
    let dst = dir.join("cet");
    std::fs::copy(&src, &dst).unwrap();
    dst
}

/// The file offset of link-time address `addr` in `data`.
fn file_offset(data: &[u8], addr: u64) -> usize {
    use object::{Object, ObjectSection};
    let file = object::File::parse(data).unwrap();
    let s = file
        .sections()
        .find(|s| (s.address()..s.address() + s.size()).contains(&addr))
        .unwrap_or_else(|| panic!("no section holds {addr:#x}"));
    let (off, _) = s.file_range().expect("a section with file bytes");
    (off + addr - s.address()) as usize
}

/// Overwrites the 4 bytes at link-time address `addr` of the file `path`.
fn patch_file(path: &Path, addr: u64, bytes: [u8; 4]) {
    let mut data = std::fs::read(path).unwrap();
    let at = file_offset(&data, addr);
    data[at..at + 4].copy_from_slice(&bytes);
    std::fs::write(path, data).unwrap();
}

/// The address of the one function symbol whose name contains all of
/// `parts`.
fn symbol(path: &Path, parts: &[&str]) -> u64 {
    let syms = common::symbols(path);
    let hits: Vec<_> = syms
        .iter()
        .filter(|(n, (_, size))| *size > 0 && parts.iter().all(|p| n.contains(p)))
        .collect();
    assert_eq!(hits.len(), 1, "symbols containing {parts:?}: {hits:?}");
    hits[0].1.0
}

#[test]
fn a_fixture_built_today_has_endbr64_everywhere() {
    let image = copy_of_cet("clean");
    let path = image.to_str().unwrap();
    let o = altpatch(&["audit", "--cet", path]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("all 2050 indirect-branch targets altpatch created start with endbr64")
            && t.contains("1 static_call_trampoline, 1 ifunc_stub, 2048 closure_trampoline"),
        "{t}"
    );

    let o = altpatch(&["audit", "--cet", "--json", path]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let j = String::from_utf8(o.stdout).unwrap();
    assert!(
        j.contains(
            r#""targets":2050,"counts":{"static_call_trampoline":1,"ifunc_stub":1,"closure_trampoline":2048},"missing_endbr64":[]"#
        ),
        "{j}"
    );

    // The library agrees, target by target: the trampoline and the stub
    // are the symbols' addresses.
    let audit = audit_cet(&std::fs::read(&image).unwrap()).unwrap();
    assert_eq!(audit.missing().count(), 0);
    let tramp = symbol(&image, &["scale", "__altpatch_sc_tramp"]);
    let stub = symbol(&image, &["ones", "__altpatch_ifunc_stub"]);
    for (addr, kind) in [
        (tramp, CetTargetKind::StaticCallTrampoline),
        (stub, CetTargetKind::IfuncStub),
    ] {
        assert!(
            audit
                .targets
                .iter()
                .any(|t| t.addr == addr && t.kind == kind && t.has_endbr64()),
            "{addr:#x} {kind:?}: {:?}",
            audit.targets.iter().take(4).collect::<Vec<_>>()
        );
    }
    // The hand-written trampoline and stub of the sites fixture too.
    let sites = common::build_fixture("sites", true).join("sites");
    let o = altpatch(&["audit", "--cet", sites.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("(1 static_call_trampoline, 1 ifunc_stub, 0 closure_trampoline)"),
        "{}",
        text(&o)
    );
}

#[test]
fn a_trampoline_without_endbr64_is_reported_by_name() {
    let image = copy_of_cet("no_endbr");
    let path = image.to_str().unwrap();
    let tramp = symbol(&image, &["scale", "__altpatch_sc_tramp"]);
    patch_file(&image, tramp, NOP4);
    // Still a working program (a direct call runs the NOP4 as it ran the
    // endbr64): only an indirect call under IBT would fault.
    let run = Command::new(&image).output().unwrap();
    assert!(run.status.success(), "{}", text(&run));
    assert_eq!(
        String::from_utf8_lossy(&run.stdout).trim(),
        "scale=10 ones=2 inc=6"
    );

    let o = altpatch(&["audit", "--cet", path]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("1 of 2050 indirect-branch targets altpatch created lack endbr64"),
        "{t}"
    );
    let line = t
        .lines()
        .find(|l| l.contains("static_call_trampoline ") && l.trim_start().starts_with("0x"))
        .unwrap_or_else(|| panic!("no line for the trampoline:\n{t}"));
    assert!(
        line.contains(&format!("{tramp:#x}"))
            && line.contains("scale")
            && line.contains("__altpatch_sc_tramp")
            && line.contains("0f 1f 40 00"),
        "{line}"
    );
    assert_eq!(
        t.lines().filter(|l| l.starts_with("  0x")).count(),
        1,
        "{t}"
    );

    let o = altpatch(&["audit", "--cet", "--json", path]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let j = String::from_utf8(o.stdout).unwrap();
    assert!(
        j.contains(&format!(
            r#""missing_endbr64":[{{"addr":"{tramp:#x}","kind":"static_call_trampoline","name":"#
        )),
        "{j}"
    );
    assert!(j.contains(r#""first_bytes":"0f 1f 40 00""#), "{j}");
    // Addresses are strings, never JSON numbers: Python reads the one
    // missing target's back exactly.
    assert!(
        !j.contains(r#""addr":0"#) && !j.contains(r#""addr":1"#),
        "{j}"
    );
    assert_eq!(cli::python_reads(&j), 1);

    let audit = audit_cet(&std::fs::read(&image).unwrap()).unwrap();
    let missing: Vec<_> = audit.missing().map(|t| (t.addr, t.kind)).collect();
    assert_eq!(missing, [(tramp, CetTargetKind::StaticCallTrampoline)]);
}

#[test]
fn a_stub_and_a_closure_trampoline_without_endbr64_are_reported() {
    let image = copy_of_cet("no_endbr_stub_table");
    let stub = symbol(&image, &["ones", "__altpatch_ifunc_stub"]);
    let table = symbol(&image, &["altpatch_v1_", "_trampoline_table"]);
    patch_file(&image, stub, NOP4);
    patch_file(&image, table + 5 * 32, NOP4);
    let o = altpatch(&["audit", "--cet", image.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("2 of 2050"), "{t}");
    assert!(
        t.lines()
            .any(|l| l.contains(&format!("{stub:#x} ifunc_stub "))
                && l.contains("__altpatch_ifunc_stub")),
        "{t}"
    );
    assert!(
        t.contains(&format!(
            "{:#x} closure_trampoline altpatch_v1_{}_trampoline_table+0xa0: starts with 0f 1f 40 00",
            table + 0xa0,
            altpatch::records::TAG
        )),
        "{t}"
    );
}

#[test]
fn cet_audit_refusals_are_clear() {
    let image = copy_of_cet("refusals");
    let path = image.to_str().unwrap();
    // The retpoline audit's options do not apply.
    let o = altpatch(&["audit", "--cet", "--allow", "std::*", path]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("'--cet' cannot be used with"),
        "{}",
        text(&o)
    );
    // Without a symbol table the entries cannot be found: an error, not a
    // pass.
    let stripped = image.with_file_name("cet-stripped");
    let s = Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(&image)
        .status()
        .unwrap();
    assert!(s.success());
    let o = altpatch(&["audit", "--cet", stripped.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("no symbol table"), "{}", text(&o));
    let o = altpatch(&["audit", "--cet", "/nonexistent/image"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}
