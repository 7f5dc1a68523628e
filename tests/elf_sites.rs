//! Site discovery from relocations, on an image with known sites
//! (tests/fixtures/sites: hand-written asm at exported labels, Rust built
//! with `+retpoline-external-thunk`, C built by GCC with external thunks),
//! cross-checked against an independent decode; run-time discovery; bad
//! input.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use altpatch::elf::{self, ElfError};
use altpatch::sites::{Site, SiteKind};
use altpatch::x86::{BranchKind, Cond, Reg};

fn fixture() -> PathBuf {
    common::build_fixture("sites", true).join("sites")
}

fn sym(syms: &HashMap<String, (u64, u64)>, name: &str) -> (usize, usize) {
    let (a, s) = syms.get(name).unwrap_or_else(|| panic!("no symbol {name}"));
    (*a as usize, *s as usize)
}

use common::{func, within};

/// The fixture's switch, built here without retpolines: the reference.
mod switch {
    include!("fixtures/sites/src/switch.rs");
}

#[test]
fn hand_written_sites_exact() {
    let path = fixture();
    let data = std::fs::read(&path).unwrap();
    let found = elf::read_sites(&data).unwrap();
    let syms = common::symbols(&path);
    let at = |n: &str| sym(&syms, n).0;
    let thunk = |r: &str| sym(&syms, &format!("__x86_indirect_thunk_{r}")).0;
    let ret = at("__x86_return_thunk");
    let tramp = at("__altpatch_sc_tramp_fixture");
    let ifunc = at("__altpatch_ifunc_fixture");
    let t = |addr, len, form, kind, target| Site {
        addr,
        len,
        form,
        kind,
        target,
    };
    use BranchKind::*;
    use SiteKind::*;
    let expected = vec![
        t(
            at("site_call_rax"),
            5,
            Call,
            IndirectThunk(Reg::Rax),
            thunk("rax"),
        ),
        t(
            at("site_jmp_rcx"),
            5,
            Jmp,
            IndirectThunk(Reg::Rcx),
            thunk("rcx"),
        ),
        t(
            at("site_jne_rdx"),
            6,
            Jcc(Cond::Ne),
            IndirectThunk(Reg::Rdx),
            thunk("rdx"),
        ),
        // The cs prefix is the site's, as objtool records it: decoding
        // from `asm_sites` proves the 2e byte starts the instruction.
        t(
            at("site_cs_call_r11"),
            6,
            Call,
            IndirectThunk(Reg::R11),
            thunk("r11"),
        ),
        t(
            at("site_call_r9"),
            5,
            Call,
            IndirectThunk(Reg::R9),
            thunk("r9"),
        ),
        t(at("site_ret"), 5, Jmp, ReturnThunk, ret),
        t(at("site_jne_ret"), 6, Jcc(Cond::Ne), ReturnThunk, ret),
        t(at("site_static_call"), 5, Call, StaticCall, tramp),
        t(at("site_static_tail"), 5, Jmp, StaticCall, tramp),
        t(at("site_ifunc"), 5, Call, Ifunc, ifunc),
        // After `mov $0x2e, %al`: the 2e is mov's, decoding says so.
        t(
            at("site_after_imm_2e"),
            5,
            Call,
            IndirectThunk(Reg::Rsi),
            thunk("rsi"),
        ),
    ];
    let got = within(&found.sites, sym(&syms, "asm_sites"));
    assert_eq!(got, expected);
    // Outside any function symbol, after a 2e byte nothing proves to be a
    // prefix: the site is the call alone (a cs prefix before what is
    // written there changes nothing).
    let nosym = at("site_nosym_2e");
    assert_eq!(
        found
            .sites
            .iter()
            .find(|s| s.addr + s.len as usize == nosym + 5),
        Some(&t(nosym, 5, Call, IndirectThunk(Reg::Rbp), thunk("rbp")))
    );

    let mut rejected: Vec<(u64, &str, &str)> = found
        .rejected
        .iter()
        .map(|r| (r.offset, r.symbol.as_str(), r.why))
        .collect();
    rejected.sort();
    let r = |label: &str, off: u64| at(label) as u64 + off;
    assert_eq!(
        rejected,
        vec![
            (
                r("bad_lea_thunk", 3),
                "__x86_indirect_thunk_r8",
                "not a call/jmp/jcc rel32 with the relocation at its displacement"
            ),
            (
                r("bad_call_rsp", 1),
                "__x86_indirect_thunk_rsp",
                "no such thunk register (%rsp is never a thunk register)"
            ),
            (
                r("bad_call_ret", 1),
                "__x86_return_thunk",
                "a call to the return thunk"
            ),
            (
                r("bad_into_thunk", 1),
                "__x86_indirect_thunk_rax",
                "branch does not reach the symbol's first byte"
            ),
            (
                r("bad_66_cs_call", 3),
                "__x86_indirect_thunk_rdi",
                "a branch with a prefix other than cs (decoded from its function's start): \
                 not a form compilers emit, left alone"
            ),
        ]
    );
    assert_eq!(found.name_of(tramp), Some("__altpatch_sc_tramp_fixture"));
}

#[test]
fn compiler_generated_sites() {
    let path = fixture();
    let data = std::fs::read(&path).unwrap();
    let found = elf::read_sites(&data).unwrap();
    let syms = common::symbols(&path);

    // Rust (+retpoline-external-thunk): LLVM uses r11 only.
    let calls = within(&found.sites, func(&syms, "rust_calls"));
    assert!(calls.len() >= 2, "{calls:?}");
    assert!(
        calls
            .iter()
            .all(|s| s.kind == SiteKind::IndirectThunk(Reg::R11))
    );
    assert!(calls.iter().any(|s| s.form == BranchKind::Call));
    let tail = within(&found.sites, func(&syms, "rust_tail"));
    assert_eq!(tail.len(), 1, "{tail:?}");
    assert_eq!(
        (tail[0].form, tail[0].kind),
        (BranchKind::Jmp, SiteKind::IndirectThunk(Reg::R11))
    );

    // C (GCC, thunk-extern): ten indirect calls in c_chain through several
    // registers, r8..r15 among them; every return through the return thunk.
    let chain = within(&found.sites, sym(&syms, "c_chain"));
    let thunks: Vec<Reg> = chain
        .iter()
        .filter_map(|s| match s.kind {
            SiteKind::IndirectThunk(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(thunks.len(), 10, "{chain:#?}");
    let regs: BTreeSet<Reg> = thunks.iter().copied().collect();
    assert!(regs.len() >= 3, "{regs:?}");
    assert!(
        regs.iter().any(|&r| r as u8 >= 8),
        "no r8..r15 thunk: {regs:?}"
    );
    let add_one = within(&found.sites, sym(&syms, "c_add_one"));
    assert_eq!(add_one.len(), 1);
    assert_eq!(
        (add_one[0].kind, add_one[0].form),
        (SiteKind::ReturnThunk, BranchKind::Jmp)
    );
    let dispatch = within(&found.sites, sym(&syms, "c_dispatch"));
    assert_eq!(
        dispatch
            .iter()
            .filter(|s| matches!(s.kind, SiteKind::IndirectThunk(_)))
            .count(),
        1,
        "{dispatch:#?}"
    );
    assert!(dispatch.iter().any(|s| s.kind == SiteKind::ReturnThunk));
}

#[test]
fn independent_decode_finds_the_same_sites() {
    let data = std::fs::read(fixture()).unwrap();
    let found = elf::read_sites(&data).unwrap();
    let scanned = elf::scan_branches(&data).unwrap();
    // The same instructions, prefixes included (only decoding a function
    // from its start proves them, which both do; outside any function the
    // decoder sees nothing).
    let syms = common::symbols(&fixture());
    let (nosym, _) = sym(&syms, "nosym_after_2e");
    let key = |s: &Site| (s.addr, s.len, s.form, s.kind, s.target);
    let from_relocs: BTreeSet<_> = found
        .sites
        .iter()
        .filter(|s| s.kind != SiteKind::Ifunc && !(nosym..nosym + 16).contains(&s.addr))
        .map(key)
        .collect();
    let from_decode: BTreeSet<_> = scanned.iter().map(key).collect();
    assert!(
        from_relocs.len() > 100,
        "a retpoline-built program has many sites"
    );
    let only_relocs: Vec<_> = from_relocs.difference(&from_decode).collect();
    let only_decode: Vec<_> = from_decode.difference(&from_relocs).collect();
    assert!(
        only_relocs.is_empty() && only_decode.is_empty(),
        "only from relocations: {only_relocs:x?}\nonly from decoding: {only_decode:x?}"
    );
    // Prefixed sites: the hand-written one and GCC's.
    let cs = sym(&syms, "site_cs_call_r11").0;
    assert!(found.sites.iter().any(|s| s.addr == cs && s.len == 6));
    let six = found
        .sites
        .iter()
        .filter(|s| s.len == 6 && s.form != BranchKind::Jcc(Cond::Ne))
        .count();
    assert!(six >= 13, "{six} prefixed call/jmp sites");
}

#[test]
fn the_running_program_finds_its_own_sites() {
    let path = fixture();
    let data = std::fs::read(&path).unwrap();
    let found = elf::read_sites(&data).unwrap();
    let out = std::process::Command::new(&path).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("results 13 42 80 11"), "{text}");
    assert!(text.contains("cs [63935, 15, 3005, 15, 4005]"), "{text}");
    assert!(text.contains("embedded none"), "{text}");
    let bias = text
        .lines()
        .find_map(|l| l.strip_prefix("bias 0x"))
        .map(|h| usize::from_str_radix(h, 16).unwrap())
        .expect("bias line");
    let runtime: Vec<(usize, String, usize)> = text
        .lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("site ")?.split(' ');
            let addr = usize::from_str_radix(w.next()?.trim_start_matches("0x"), 16).ok()?;
            let kind = w.next()?.to_string();
            let len = w.next()?.parse().ok()?;
            Some((addr, kind, len))
        })
        .collect();
    let expected: Vec<(usize, String, usize)> = found
        .sites
        .iter()
        .map(|s| (s.addr + bias, s.kind.name().to_string(), s.len as usize))
        .collect();
    assert_eq!(runtime, expected);
}

#[test]
fn without_emit_relocs_the_error_names_the_flag() {
    let plain = common::gcc("plain", "int main(void) { return 0; }\n", &["-O2"]);
    let e = elf::read_sites(&std::fs::read(plain).unwrap()).unwrap_err();
    assert_eq!(e, ElfError::NoRelocations);
    assert!(e.to_string().contains("--emit-relocs"), "{e}");
}

#[test]
fn stripped_image() {
    let plain = common::gcc(
        "tostrip",
        "int main(void) { return 0; }\n",
        &["-O2", "-Wl,--emit-relocs"],
    );
    let stripped = plain.with_file_name("stripped");
    let r = std::process::Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(&plain)
        .status()
        .unwrap();
    assert!(r.success());
    let e = elf::read_sites(&std::fs::read(stripped).unwrap()).unwrap_err();
    assert_eq!(e, ElfError::Stripped, "{e}");
}

fn fixture_bytes() -> Vec<u8> {
    std::fs::read(fixture()).unwrap()
}

#[test]
fn wrong_class_endianness_machine_and_kind() {
    let good = fixture_bytes();
    let mut b = good.clone();
    b[4] = 1; // ELFCLASS32
    assert_eq!(elf::read_sites(&b).unwrap_err(), ElfError::WrongClass);
    let mut b = good.clone();
    b[5] = 2; // big endian
    assert_eq!(elf::read_sites(&b).unwrap_err(), ElfError::WrongEndian);
    let mut b = good.clone();
    b[18..20].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
    assert_eq!(
        elf::read_sites(&b).unwrap_err(),
        ElfError::WrongMachine(183)
    );
    let mut b = good.clone();
    b[16..18].copy_from_slice(&1u16.to_le_bytes()); // ET_REL
    assert_eq!(elf::read_sites(&b).unwrap_err(), ElfError::NotLinked);
    assert_eq!(
        elf::read_sites(b"not an elf at all").unwrap_err(),
        ElfError::NotElf
    );
    assert_eq!(elf::read_sites(&[]).unwrap_err(), ElfError::NotElf);
}

#[test]
fn truncated_and_corrupt_images_never_panic() {
    let good = fixture_bytes();
    // Every prefix length on a coarse grid, and all of the first kilobyte.
    let mut lens: Vec<usize> = (0..1024).collect();
    lens.extend((1024..good.len()).step_by(good.len() / 257 + 1));
    for len in lens {
        let r = elf::read_sites(&good[..len]);
        assert!(r.is_err() || len > good.len() / 2, "prefix {len} parsed");
    }
    // Section header table offset past the end.
    let mut b = good.clone();
    b[40..48].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(elf::read_sites(&b), Err(ElfError::Corrupt(_))));
    // Deterministic random byte flips anywhere in the headers.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..120 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut b = good.clone();
        let shoff = u64::from_le_bytes(b[40..48].try_into().unwrap()) as usize;
        let at = if x & 1 == 0 {
            (x as usize >> 8) % 64
        } else {
            shoff + (x as usize >> 8) % (b.len() - shoff)
        };
        b[at] ^= (x >> 32) as u8 | 1;
        let _ = elf::read_sites(&b);
        let _ = elf::scan_branches(&b);
        let _ = elf::audit(&b, &[]);
        let _ = elf::audit_cet(&b);
    }
}

#[test]
fn relocation_outside_its_section_is_an_error() {
    use object::read::elf::{FileHeader, Rela, SectionHeader};
    let mut b = fixture_bytes();
    // Find the file offset of the first entry of a .rela section that
    // applies to code, and point it far beyond its section.
    let (entry_off, target_name) = {
        let le = object::endian::LittleEndian;
        let h = object::elf::FileHeader64::<object::endian::LittleEndian>::parse(&*b).unwrap();
        let sections = h.sections(le, &*b).unwrap();
        let mut found = None;
        for s in sections.iter() {
            if s.sh_type(le) != object::elf::SHT_RELA {
                continue;
            }
            let Ok(target) = sections.section(object::SectionIndex(s.sh_info(le) as usize)) else {
                continue;
            };
            if target.sh_flags(le).0 & object::elf::SHF_EXECINSTR.0 == 0 || s.sh_size(le) == 0 {
                continue;
            }
            // An entry against a site symbol, so the reader looks at it.
            let (relas, _) = s.rela(le, &*b).unwrap().unwrap();
            let syms = sections.symbols(le, &*b, object::elf::SHT_SYMTAB).unwrap();
            for (i, r) in relas.iter().enumerate() {
                let Some(si) = r.symbol(le, false) else {
                    continue;
                };
                let name = syms.symbol_name(le, syms.symbol(si).unwrap()).unwrap();
                if name.starts_with(b"__x86_indirect_thunk_r11") {
                    found = Some((
                        s.sh_offset(le) as usize + i * 24,
                        sections.section_name(le, target).unwrap().to_vec(),
                    ));
                    break;
                }
            }
            if found.is_some() {
                break;
            }
        }
        found.expect("a thunk relocation in code")
    };
    b[entry_off..entry_off + 8].copy_from_slice(&0x7fff_0000_0000u64.to_le_bytes());
    let e = elf::read_sites(&b).unwrap_err();
    assert_eq!(
        e,
        ElfError::RelocationOutsideSection {
            offset: 0x7fff_0000_0000,
            section: String::from_utf8(target_name).unwrap()
        }
    );
}

#[test]
fn fuzzer_findings_stay_fixed() {
    // Inputs that once made the reader panic (fuzz/ found them).
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        let _ = elf::read_sites(&data);
        let _ = elf::scan_branches(&data);
        let _ = elf::audit(&data, &[]);
        let _ = elf::audit_cet(&data);
        let _ = elf::embed(&mut data.clone());
        n += 1;
    }
    assert!(n > 0);
}

/// The fixture is built with the README's recipe
/// (`+retpoline-external-thunk,+retpoline-indirect-branches`): its own
/// dense switch, a jump table otherwise, has no indirect branch left that
/// bypasses the thunks, and computes what the same code computes here.
#[test]
fn jump_tables_go_through_the_thunks_too() {
    let path = common::build_fixture("sites", true).join("retpoline");
    let data = std::fs::read(&path).unwrap();
    let syms = common::symbols(&path);
    let name = syms
        .keys()
        .find(|k| k.contains("dense_switch"))
        .expect("dense_switch in the fixture")
        .clone();
    let bypasses = elf::audit(&data, &[]).unwrap();
    let inside: Vec<String> = bypasses
        .iter()
        .filter(|b| b.function == name)
        .map(|b| b.to_string())
        .collect();
    assert!(inside.is_empty(), "jump table not covered: {inside:#?}");

    // Run it (no steps): the switch's results.
    let out = std::process::Command::new(&path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let expect: Vec<u64> = (0..10u32)
        .map(|op| switch::dense_switch(op, 1000))
        .collect();
    assert!(text.contains(&format!("switch {expect:?}")), "{text}");
}

/// `ALTPATCH_DEBUG=1` summarizes each applied plan per reason with its
/// first edits; `ALTPATCH_DEBUG=all` lists every edit.
#[test]
fn debug_output_is_a_summary_unless_all() {
    let path = common::build_fixture("sites", true).join("retpoline");
    let run = |level: &str| {
        let out = std::process::Command::new(&path)
            .arg("plain@inplace")
            .env("ALTPATCH_DEBUG", level)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let summary = run("1");
    let all = run("all");
    // Grouped by shape: the thunk sites become `nop; call/jmp *%r11`.
    assert!(
        summary.contains(" x call X -> xchg %ax,%ax; call *%r11:"),
        "{summary}"
    );
    assert!(summary.contains(" x thunk head:"), "{summary}");
    assert!(
        summary.contains("ALTPATCH_DEBUG=all lists every edit"),
        "{summary}"
    );
    let edits = |t: &str| {
        t.lines()
            .filter(|l| l.trim_start().starts_with("[wrote]"))
            .count()
    };
    assert!(summary.contains("... "), "{summary}");
    assert!(edits(&summary) * 4 < edits(&all), "{summary}");
    assert!(
        edits(&all) > edits(&summary),
        "all:\n{all}\nsummary:\n{summary}"
    );
}

/// The thunk names newer kernels branch to are sites like the classic
/// ones (prefixed or not), and the arrays holding them are not.
#[test]
fn newer_kernel_thunk_names_are_sites() {
    let src = r#"
__asm__(".section .text.thunks,\"ax\",@progbits\n"
        ".irp kind, call_thunk, jump_thunk, its_thunk\n"
        ".globl __x86_indirect_\\kind\\()_array\n__x86_indirect_\\kind\\()_array:\n"
        ".irp reg, rax, r11\n"
        ".globl __x86_indirect_\\kind\\()_\\reg\n__x86_indirect_\\kind\\()_\\reg: jmp *%\\reg\n"
        ".endr\n.endr\n"
        ".text\n.globl _start\n.type _start, @function\n_start:\n"
        "call __x86_indirect_call_thunk_rax\n"
        "jmp __x86_indirect_jump_thunk_r11\n"
        ".byte 0x2e\ncall __x86_indirect_its_thunk_r11\n"
        "lea __x86_indirect_its_thunk_array(%rip), %rax\n"
        "ret\n.size _start, . - _start\n");
"#;
    let image = common::asm_image("newer_thunk_names", src);
    let found = elf::read_sites(&std::fs::read(&image).unwrap()).unwrap();
    let syms = common::symbols(&image);
    let at = |n: &str| syms[n].0 as usize;
    let got: Vec<(usize, u8, BranchKind, SiteKind, usize)> = found
        .sites
        .iter()
        .map(|s| (s.addr, s.len, s.form, s.kind, s.target))
        .collect();
    let start = at("_start");
    assert_eq!(
        got,
        vec![
            (
                start,
                5,
                BranchKind::Call,
                SiteKind::IndirectThunk(Reg::Rax),
                at("__x86_indirect_call_thunk_rax")
            ),
            (
                start + 5,
                5,
                BranchKind::Jmp,
                SiteKind::IndirectThunk(Reg::R11),
                at("__x86_indirect_jump_thunk_r11")
            ),
            (
                start + 10,
                6,
                BranchKind::Call,
                SiteKind::IndirectThunk(Reg::R11),
                at("__x86_indirect_its_thunk_r11")
            ),
        ]
    );
    // The array's address taken is neither a site nor a bad thunk.
    assert!(found.rejected.is_empty(), "{:?}", found.rejected);
}
