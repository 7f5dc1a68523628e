//! The `altpatch` command-line tool: sites, embed, audit, and its errors.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_altpatch");

fn altpatch(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run altpatch")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A private copy of a fixture binary, so tests can modify it.
fn copy_of(name: &str, tag: &str) -> PathBuf {
    let src = common::build_fixture("sites", true).join(name);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli").join(tag);
    std::fs::create_dir_all(&dir).unwrap();
    let dst = dir.join(name);
    std::fs::copy(&src, &dst).unwrap();
    dst
}

#[test]
fn sites_tables_and_json() {
    let image = copy_of("sites", "tables");
    let o = altpatch(&["sites", image.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    for header in [
        "thunk (",
        "return_thunk (",
        "static_call (2):",
        "ifunc (1):",
        "rejected (4), never patched:",
    ] {
        assert!(t.contains(header), "missing {header}:\n{t}");
    }
    assert!(t.contains("-> __x86_indirect_thunk_r9"), "{t}");

    let o = altpatch(&["sites", "--json", image.to_str().unwrap()]);
    assert!(o.status.success());
    let j = String::from_utf8(o.stdout).unwrap();
    assert!(j.starts_with('{') && j.trim_end().ends_with('}'), "{j}");
    assert!(
        j.contains("\"kind\":\"static_call\",\"register\":null,\"form\":\"jmp\""),
        "{j}"
    );
    assert!(j.contains("\"register\":\"r9\""), "{j}");
    assert!(j.contains("\"why\":\"a call to the return thunk\""), "{j}");
    // As many site objects as the library finds.
    let found = altpatch::elf::read_sites(&std::fs::read(&image).unwrap()).unwrap();
    assert_eq!(j.matches("\"addr\":").count(), found.sites.len());
}

#[test]
fn embed_then_run_round_trip_and_idempotence() {
    let image = copy_of("sites", "embed");
    let path = image.to_str().unwrap();
    let found = altpatch::elf::read_sites(&std::fs::read(&image).unwrap()).unwrap();
    let o = altpatch(&["embed", path]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!(
            "embedded {} sites (capacity 4096)",
            found.sites.len()
        )),
        "{}",
        text(&o)
    );
    // The file is still a valid program, and now reads its sites from the
    // embedded table (no relocation reading): the same sites.
    let run = Command::new(&image).output().unwrap();
    assert!(run.status.success());
    let out = String::from_utf8(run.stdout).unwrap();
    assert!(
        out.contains(&format!("embedded {}", found.sites.len())),
        "{out}"
    );
    let bias = out
        .lines()
        .find_map(|l| l.strip_prefix("bias 0x"))
        .map(|h| usize::from_str_radix(h, 16).unwrap())
        .unwrap();
    let runtime: Vec<usize> = out
        .lines()
        .filter_map(|l| l.strip_prefix("site 0x"))
        .map(|l| usize::from_str_radix(l.split(' ').next().unwrap(), 16).unwrap())
        .collect();
    let expected: Vec<usize> = found.sites.iter().map(|s| s.addr + bias).collect();
    assert_eq!(runtime, expected);
    // `sites` still works on the embedded image (relocations are kept).
    assert!(altpatch(&["sites", path]).status.success());

    // Embedding again changes nothing, not even the file's bytes.
    let before = std::fs::read(&image).unwrap();
    let o = altpatch(&["embed", path]);
    assert!(o.status.success());
    assert!(text(&o).contains("unchanged"), "{}", text(&o));
    assert_eq!(std::fs::read(&image).unwrap(), before);
}

#[test]
fn embed_reports_the_capacity_needed() {
    let image = copy_of("sites_small", "small");
    let before = std::fs::read(&image).unwrap();
    let o = altpatch(&["embed", image.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let found = altpatch::elf::read_sites(&before).unwrap();
    let n = found.sites.len();
    let t = text(&o);
    assert!(
        t.contains(&format!("has {n} sites but its table holds 2"))
            && t.contains(&format!("reserve_site_table!({n})")),
        "{t}"
    );
    assert_eq!(
        std::fs::read(&image).unwrap(),
        before,
        "a failed embed changed the file"
    );
}

#[test]
fn embed_without_a_reserved_table_or_relocations() {
    let plain = common::gcc(
        "cli_plain",
        "int main(void) { return 0; }\n",
        &["-O2", "-Wl,--emit-relocs"],
    );
    let o = altpatch(&["embed", plain.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("reserves no site table"), "{}", text(&o));
    let norelocs = common::gcc("cli_norelocs", "int main(void) { return 0; }\n", &["-O2"]);
    let o = altpatch(&["sites", norelocs.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("--emit-relocs"), "{}", text(&o));
}

/// A freestanding program built with external thunks: every indirect branch
/// goes through a thunk, except in `planted`, when present.
fn audit_image(name: &str, planted: bool) -> PathBuf {
    let mut src = String::from(
        r#"
typedef long (*fn_t)(long);
__asm__(".irp reg, rax, rcx, rdx, rbx, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15\n"
        ".weak __x86_indirect_thunk_\\reg\n__x86_indirect_thunk_\\reg: jmp *%\\reg\n"
        ".endr\n"
        ".weak __x86_return_thunk\n__x86_return_thunk: ret\n");
long twice(fn_t f, long x) { return f(f(x)); }
long inc(long x) { return x + 1; }
"#,
    );
    if planted {
        src.push_str(
            "long planted(fn_t f, long x) { long r; __asm__ volatile(\"call *%1\" : \"=a\"(r) : \"r\"(f), \"D\"(x) : \"memory\"); return r; }\n",
        );
    }
    src.push_str("void _start(void) { twice(inc, 1); for (;;) {} }\n");
    common::gcc(
        name,
        &src,
        &[
            "-O2",
            "-ffreestanding",
            "-nostdlib",
            "-static",
            "-fno-pic",
            "-no-pie",
            "-fcf-protection=none",
            "-mindirect-branch=thunk-extern",
            "-mfunction-return=thunk-extern",
            "-Wl,--emit-relocs",
        ],
    )
}

#[test]
fn audit_finds_a_planted_indirect_call_and_passes_a_clean_image() {
    let clean = audit_image("audit_clean", false);
    let o = altpatch(&["audit", clean.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("no indirect branch bypasses the thunks"));

    let dirty = audit_image("audit_dirty", true);
    let o = altpatch(&["audit", dirty.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("1 indirect branches bypass the thunks"), "{t}");
    assert!(t.contains("<planted+") && t.contains("call *%"), "{t}");

    let o = altpatch(&["audit", "--allow", "planted", dirty.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

#[test]
fn bad_input_gives_clear_errors() {
    let o = altpatch(&["sites", "/nonexistent/image"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o).contains("/nonexistent/image") && text(&o).contains("No such file"),
        "{}",
        text(&o)
    );

    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli");
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk.bin");
    std::fs::write(&junk, b"#!/bin/sh\necho not an elf\n").unwrap();
    for cmd in ["sites", "embed", "audit"] {
        let o = altpatch(&[cmd, junk.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(2), "{cmd}: {}", text(&o));
        assert!(text(&o).contains("not an ELF file"), "{cmd}: {}", text(&o));
    }
    // Usage errors and help.
    let o = altpatch(&["sites"]);
    assert_eq!(o.status.code(), Some(2));
    let o = altpatch(&["--help"]);
    assert!(o.status.success() && text(&o).contains("audit"));
}
