//! The `altpatch` command-line tool: sites, embed, audit, and its errors.

mod common;

#[path = "common/cli.rs"]
mod cli;

use std::path::{Path, PathBuf};
use std::process::Command;

use cli::{altpatch, hex_addr, text};

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
        "rejected (5), never patched:",
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
    // As many site objects as the library finds, each address a hex
    // string that reads back exactly (a JSON number would be a double to
    // jq and JavaScript, rounding a kernel's 64-bit addresses).
    let found = altpatch::elf::read_sites(&std::fs::read(&image).unwrap()).unwrap();
    assert_eq!(j.matches("\"addr\":").count(), found.sites.len());
    // Python reads it, every address back exactly: two per site (its
    // address and target), one per rejected relocation.
    let hex = cli::python_reads(&j);
    assert_eq!(hex, 2 * found.sites.len() + found.rejected.len());
    let v: serde_json::Value = serde_json::from_str(&j).unwrap();
    let sites = v["sites"].as_array().unwrap();
    for (s, site) in sites.iter().zip(&found.sites) {
        assert_eq!(hex_addr(&s["addr"]), site.addr as u64, "{s}");
        assert_eq!(hex_addr(&s["target"]), site.target as u64, "{s}");
        assert_eq!(s["len"].as_u64(), Some(site.len as u64), "{s}");
    }
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
    cli::thunk_extern_image(name, &src)
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

/// A small freestanding image whose Rust part (a dense switch) is built
/// with `+retpoline-external-thunk`, plus `+retpoline-indirect-branches`
/// if `tables`: without it the switch stays a jump table.
fn switch_image(name: &str, tables: bool) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("audit");
    std::fs::create_dir_all(&dir).unwrap();
    let rs = dir.join(format!("{name}.rs"));
    std::fs::write(
        &rs,
        r#"#![no_std]
#[unsafe(no_mangle)]
pub extern "C" fn dense_switch(op: u32, x: u64) -> u64 {
    match op {
        0 => x.wrapping_mul(3),
        1 => x ^ 0x55,
        2 => x.rotate_left(7),
        3 => x / 3 + 1,
        4 => x.count_ones() as u64,
        5 => x.leading_zeros() as u64,
        6 => x.swap_bytes(),
        7 => x.wrapping_sub(9),
        8 => x.wrapping_add(x << 2),
        _ => 0,
    }
}
"#,
    )
    .unwrap();
    let obj = dir.join(format!("{name}.o"));
    let features = if tables {
        "+retpoline-external-thunk,+retpoline-indirect-branches"
    } else {
        "+retpoline-external-thunk"
    };
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let r = Command::new(rustc)
        .args(["--edition", "2024", "--crate-type=lib", "--emit=obj", "-O"])
        .args([
            "-C",
            "panic=abort",
            "-C",
            &format!("target-feature={features}"),
        ])
        .arg("-o")
        .arg(&obj)
        .arg(&rs)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let c = format!(
        "{}{}",
        cli::WEAK_THUNKS_C,
        "unsigned long dense_switch(unsigned, unsigned long);\n\
         void _start(void) { dense_switch(3, 9); for (;;) {} }\n"
    );
    let mut args = cli::FREESTANDING.to_vec();
    args.push(obj.to_str().unwrap());
    common::gcc(name, &c, &args)
}

/// The audit gate: the recipe's flags audit clean; without
/// `+retpoline-indirect-branches` it fails naming the jump table; patterns,
/// origins and JSON; this crate's own intended indirect calls are never
/// reported.
#[test]
fn audit_gates_on_the_recipe() {
    let clean = switch_image("switch_tables", true);
    let o = altpatch(&["audit", clean.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));

    let bare = switch_image("switch_bare", false);
    let path = bare.to_str().unwrap();
    let o = altpatch(&["audit", path]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("<dense_switch+") && t.contains("jump-table"),
        "{t}"
    );
    let o = altpatch(&["audit", "--allow", "dense_*", path]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = altpatch(&["audit", "--json", path]);
    assert_eq!(o.status.code(), Some(1));
    let t = text(&o);
    assert!(
        t.starts_with("{\"format\":2,\"bypasses\":[{") && t.contains("\"kind\":\"jump-table\""),
        "{t}"
    );
    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
    for b in v["bypasses"].as_array().unwrap() {
        hex_addr(&b["addr"]);
    }
    // Address and offset of each bypass, as hex strings Python reads back.
    assert_eq!(
        cli::python_reads(&t),
        2 * v["bypasses"].as_array().unwrap().len()
    );
    let o = altpatch(&["audit", "--allow-origin", "nonsense", path]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("expected compiled, prebuilt, c or plt"),
        "{}",
        text(&o)
    );

    // A Rust program built with the recipe, linking this crate: clean once
    // the prebuilt standard library and PLT stubs are allowed, and the
    // crate's own trap-handler calls are counted as intended, not listed.
    let fixture = common::build_fixture("sites", true).join("retpoline");
    let f = fixture.to_str().unwrap();
    let o = altpatch(&["audit", f]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(!text(&o).contains("on_sigtrap"), "{}", text(&o));
    assert!(text(&o).contains(" prebuilt call"), "{}", text(&o));
    let o = altpatch(&["audit", "--allow-origin", "prebuilt,plt", f]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let t = text(&o);
    let intended: usize = t
        .split(" intended by the code")
        .next()
        .and_then(|s| s.rsplit(", ").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(intended > 0, "{t}");
}

#[test]
fn thunk_aliases_and_llvm_retpolines() {
    // A project's alias: a site only when named, and the alias's own
    // `jmp *%rax` is a bypass only when it is not known to be a thunk.
    let exe = common::aliased_thunk_program();
    let exe = exe.to_str().unwrap();
    let o = altpatch(&["sites", exe]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("thunk (0)"), "{}", text(&o));
    let o = altpatch(&["sites", "--thunk-prefix", "__x86_retpoline_", exe]);
    assert!(text(&o).contains("-> __x86_retpoline_rax"), "{}", text(&o));
    let o = altpatch(&["audit", "--allow-origin", "prebuilt,plt", exe]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("__x86_retpoline_rax"), "{}", text(&o));
    let o = altpatch(&[
        "audit",
        "--allow-origin",
        "prebuilt,plt",
        "--thunk-prefix",
        "__x86_retpoline_",
        exe,
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));

    // LLVM's own retpolines are built in: every site found, and a program
    // built with both LLVM retpoline features audits clean but for the
    // prebuilt standard library.
    let llvm = common::build_fixture("llvmret", true).join("llvmret-fixture");
    let llvm = llvm.to_str().unwrap();
    let o = altpatch(&["sites", llvm]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("-> __llvm_retpoline_r11"), "{}", text(&o));
    let o = altpatch(&["audit", "--allow-origin", "prebuilt,c,plt", llvm]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

#[test]
fn sites_and_audit_of_loadable_objects() {
    // The C library reaches the executable's thunks through its PLT: each
    // call and return is a site, named by the thunk it reaches.
    let c = common::retpoline_c_library();
    let o = altpatch(&["sites", c.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    for reg in ["r12", "r13", "r14"] {
        assert!(t.contains(&format!("-> __x86_indirect_thunk_{reg}")), "{t}");
    }
    assert!(
        t.contains("-> __x86_return_thunk") && t.contains("0 rejected"),
        "{t}"
    );
    // Its own code calls every pointer through the thunks; the C
    // runtime's start-up code GCC links in (`_init`, crtstuff's
    // `register_tm_clones`: no size, so no function symbol covers them)
    // does not, and is reported, never skipped.
    let o = altpatch(&["audit", "--allow-origin", "plt", c.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("<_init+") && t.contains("prebuilt call in .init, outside any function symbol"),
        "{t}"
    );
    let o = altpatch(&[
        "audit",
        "--allow-origin",
        "plt,prebuilt",
        c.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // The Rust cdylib: its sites reach its own copy of the thunks; built
    // with both features it audits clean but for the prebuilt library.
    let r = common::build_fixture("rustlib", true).join("librustlib_fixture.so");
    let o = altpatch(&["sites", r.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("-> __x86_indirect_thunk_r11"),
        "{}",
        text(&o)
    );
    let o = altpatch(&[
        "audit",
        "--allow-origin",
        "prebuilt,c,plt",
        r.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

/// A call into another crate's ifunc, as rustc makes it (no PLT: `mov
/// slot(%rip), %r13`, hoisted out of the loop, then `call *%r13`), in a
/// program with no retpolines: the rejection says what the site is and
/// why relocations alone cannot make it direct, and names no retpoline.
#[test]
fn a_got_indirect_call_is_rejected_for_what_it_is() {
    // `-mrelax-relocations=no` and `--no-relax` keep the load a `mov` of
    // the slot under a plain `R_X86_64_GOTPCREL`, as rustc's output linked
    // by its `rust-lld` has it (GNU ld would make it a `lea` of the
    // function).
    let prog = common::gcc(
        "cli_got_call",
        r#"
__asm__(".text\n"
        ".globl __altpatch_ifunc_stub_demo\n"
        ".type __altpatch_ifunc_stub_demo, @function\n"
        "__altpatch_ifunc_stub_demo: lea 1(%rdi), %rax\n ret\n"
        ".globl sum_through_got\n"
        ".type sum_through_got, @function\n"
        "sum_through_got:\n"
        "  push %r13\n push %rbx\n push %r12\n"
        "  mov %rdi, %rbx\n xor %r12d, %r12d\n"
        "  mov __altpatch_ifunc_stub_demo@GOTPCREL(%rip), %r13\n"
        "1: mov %rbx, %rdi\n call *%r13\n add %rax, %r12\n dec %rbx\n jnz 1b\n"
        "  mov %r12, %rax\n pop %r12\n pop %rbx\n pop %r13\n ret\n");
long sum_through_got(long n);
int main(void) { return sum_through_got(3) == 9 ? 0 : 1; }
"#,
        &[
            "-O2",
            "-Wa,-mrelax-relocations=no",
            "-Wl,--no-relax",
            "-Wl,--emit-relocs",
        ],
    );
    assert!(Command::new(&prog).status().unwrap().success());
    let data = std::fs::read(&prog).unwrap();
    let found = altpatch::elf::read_sites(&data).unwrap();
    let got: Vec<_> = found
        .rejected
        .iter()
        .filter(|r| r.symbol == "__altpatch_ifunc_stub_demo")
        .collect();
    assert_eq!(got.len(), 1, "{:?}", found.rejected);
    let why = got[0].why;
    for says in [
        "mov slot(%rip), %reg",
        "another crate",
        "call *%reg",
        "relocations alone cannot make the call direct",
    ] {
        assert!(why.contains(says), "{why}");
    }
    assert!(!why.contains("retpoline"), "{why}");

    let o = altpatch(&["sites", prog.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("rejected (1), never patched:")
            && t.contains(&format!("-> __altpatch_ifunc_stub_demo: {why}")),
        "{t}"
    );
    assert!(!t.contains("retpoline"), "{t}");
}
