//! Thunks under other names: a program built with LLVM's own retpolines
//! (tests/fixtures/llvmret: `+retpoline-indirect-calls,
//! +retpoline-indirect-branches`, one local `__llvm_retpoline_r11`) has its
//! sites found, inlined and its compiled-in thunk rewritten per mode, each
//! checked byte for byte and by the program's own results; and a project's
//! thunk aliases (`ThunkNames`) recognised by discovery and the audit.

mod common;

use common::{addr, unhex};

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use altpatch::elf::{self, AuditAllow};
use altpatch::sites::{SiteKind, ThunkNames};
use altpatch::x86::{self, Reg};
use object::{Object, ObjectSymbol};

fn fixture() -> PathBuf {
    common::build_fixture("llvmret", true).join("llvmret-fixture")
}

struct Run {
    report: String,
    thunks: Vec<(usize, String, String, String)>,
    sites: Vec<(usize, String, usize, Vec<u8>)>,
    result: String,
}

/// Runs the fixture; the last step's report.
fn run(steps: &[&str]) -> Run {
    let out = Command::new(fixture()).args(steps).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "fixture {steps:?}: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut r = Run {
        report: String::new(),
        thunks: vec![],
        sites: vec![],
        result: String::new(),
    };
    for line in text.lines() {
        let w: Vec<&str> = line.splitn(5, ' ').collect();
        match w[0] {
            "sites" => {
                r.report = line.into();
                r.thunks.clear();
                r.sites.clear();
            }
            "thunk" => r
                .thunks
                .push((addr(w[1]), w[2].into(), w[3].into(), w[4].into())),
            "site" => r
                .sites
                .push((addr(w[1]), w[2].into(), w[3].parse().unwrap(), unhex(w[4]))),
            "result" => r.result = w[1].into(),
            _ => {}
        }
    }
    r
}

fn field(line: &str, name: &str) -> usize {
    let w: Vec<&str> = line.split_whitespace().collect();
    let i = w.iter().position(|x| *x == name).unwrap();
    w[i + 1].parse().unwrap()
}

/// The plain-mode bytes of a site through %r11, written out here.
fn plain(form: &str, len: usize, bytes_before: &[u8]) -> Vec<u8> {
    match form {
        "call" | "jmp" => {
            let b = if form == "call" {
                x86::call_reg(Reg::R11)
            } else {
                x86::jmp_reg(Reg::R11)
            };
            let mut v = x86::nop(len - b.len()).unwrap().to_vec();
            v.extend_from_slice(&b);
            v
        }
        _ => {
            // Inverted short jcc over `jmp *%r11`, int3 filler; the
            // condition is the original `0f 8x`'s.
            let cc = bytes_before[1] & 0xf;
            let mut v = vec![0x70 + (cc ^ 1), (len - 2) as u8, 0x41, 0xff, 0xe3];
            v.resize(len, 0xcc);
            v
        }
    }
}

#[test]
fn llvm_retpolines_are_found_inlined_and_their_thunk_rewritten() {
    let none = run(&["none"]);
    let generic = run(&["generic"]);
    let p = run(&["plain"]);
    assert_eq!(p.result, none.result);
    assert_eq!(generic.result, none.result);

    // The file's own view: every site reaches __llvm_retpoline_r11.
    let data = std::fs::read(fixture()).unwrap();
    let file = object::File::parse(&*data).unwrap();
    let thunk_sym = file
        .symbols()
        .find(|s| s.name() == Ok("__llvm_retpoline_r11"))
        .expect("the local LLVM thunk")
        .address() as usize;
    let found = elf::read_sites(&data).unwrap();
    assert!(found.sites.len() > 100, "{}", found.sites.len());
    assert!(
        found
            .sites
            .iter()
            .all(|s| s.kind == SiteKind::IndirectThunk(Reg::R11) && s.target == thunk_sym)
    );
    let forms: BTreeSet<_> = generic.sites.iter().map(|s| s.1.clone()).collect();
    assert_eq!(
        forms,
        ["call", "jcc", "jmp"].map(String::from).into(),
        "calls, tail calls and jump tables"
    );

    // One compiled-in thunk, at the symbol's run-time address, rewritten.
    assert_eq!(p.thunks.len(), 1, "{:?}", p.thunks);
    let (t, reg, head, state) = &p.thunks[0];
    assert_eq!((reg.as_str(), state.as_str()), ("%r11", "in-form"));
    assert_eq!(
        unhex(head),
        [0x66, 0x90, 0x41, 0xff, 0xe3],
        "nop; jmp *%r11"
    );
    let bias = t - thunk_sym;
    // Generic leaves it as LLVM wrote it.
    assert_eq!(unhex(&generic.thunks[0].2), [0xe8, 0x0b, 0, 0, 0]);

    // Every site the run patched is one the file lists, with the exact
    // inline encoding; the generic run left each as its branch to the thunk.
    let file_sites: BTreeSet<usize> = found.sites.iter().map(|s| s.addr).collect();
    assert_eq!(p.sites.len(), file_sites.len());
    assert_eq!(field(&p.report, "inlined"), p.sites.len(), "{}", p.report);
    let gt = generic.thunks[0].0;
    for (g, s) in generic.sites.iter().zip(&p.sites) {
        assert!(file_sites.contains(&(s.0 - bias)), "{:#x}", s.0);
        assert_eq!(s.3, plain(&s.1, s.2, &g.3), "site {:#x} {}", s.0, s.1);
        let original = match g.1.as_str() {
            "call" => x86::call_rel32(g.0, gt).unwrap(),
            "jmp" => x86::jmp_rel32(g.0, gt).unwrap(),
            _ => x86::jcc_rel32(x86::Cond::from_nibble(g.3[1]), g.0, gt).unwrap(),
        };
        assert_eq!(g.3, &original[..], "generic site {:#x}", g.0);
    }
}

#[test]
fn lfence_keeps_r11_on_the_full_llvm_retpoline() {
    let none = run(&["none"]);
    let l = run(&["lfence"]);
    assert_eq!(l.result, none.result);
    // `lfence; call *%r11` needs 6 bytes and the sites have 5; the thunk's
    // head cannot hold `lfence; jmp *%r11` either: both stay a retpoline.
    assert_eq!(field(&l.report, "refused"), l.sites.len(), "{}", l.report);
    assert_eq!(field(&l.report, "written"), 0, "{}", l.report);
    let (_, _, head, state) = &l.thunks[0];
    assert_eq!(unhex(head), [0xe8, 0x0b, 0, 0, 0]);
    assert!(state.starts_with("kept: lfence; jmp *%r8..%r15"), "{state}");
    // Plain then writes every site; plain again writes nothing.
    let twice = run(&["plain", "plain"]);
    assert_eq!(field(&twice.report, "written"), 0, "{}", twice.report);
    assert_eq!(twice.result, none.result);
}

#[test]
fn aliases_are_thunks_for_discovery_and_audit() {
    let exe = common::aliased_thunk_program();
    assert!(Command::new(&exe).status().unwrap().success());
    let data = std::fs::read(&exe).unwrap();
    let names = ThunkNames::new().indirect_prefix("__x86_retpoline_");

    // Without the alias: no thunk site; with it: the call, through %rax.
    let plain = elf::read_sites(&data).unwrap();
    assert!(
        plain
            .of_kind(SiteKind::IndirectThunk(Reg::Rax))
            .next()
            .is_none()
    );
    let with = elf::read_sites_with(&data, &names).unwrap();
    let sites: Vec<_> = with.of_kind(SiteKind::IndirectThunk(Reg::Rax)).collect();
    // (The call, and its copy where GCC inlined `via_alias` into `main`.)
    assert!(!sites.is_empty(), "{:?}", with.sites);
    assert!(
        sites
            .iter()
            .all(|s| with.name_of(s.target) == Some("__x86_retpoline_rax"))
    );

    // The audit reports the alias's own `jmp *%rax` unless it knows the
    // name; the program's code calls through it either way.
    let bypasses = |a: &elf::Audit| {
        a.bypasses
            .iter()
            .filter(|b| b.function == "__x86_retpoline_rax")
            .count()
    };
    let rules = AuditAllow::default().origin(elf::Origin::Prebuilt);
    assert_eq!(bypasses(&elf::audit_with(&data, &rules).unwrap()), 1);
    let a = elf::audit_with(&data, &rules.thunk_names(names)).unwrap();
    assert_eq!(bypasses(&a), 0);
}

/// A C program through a function pointer, built by GCC with `args`.
fn gcc_program(name: &str, args: &[&str]) -> PathBuf {
    const C: &str = "long (*volatile fp)(long);\n\
                     static long inc(long x) { return x + 1; }\n\
                     int main(void) { fp = inc; return fp(41) == 42 ? 0 : 1; }\n";
    let exe = common::gcc(name, C, &[&["-O2", "-Wl,--emit-relocs"][..], args].concat());
    assert!(Command::new(&exe).status().unwrap().success());
    exe
}

/// GCC's local thunks (`-mindirect-branch=thunk`, not `thunk-extern`): the
/// same body with a 7-byte `call` displacement. Patched in a private
/// read+write copy of the program's text (nothing runs it), per mode and
/// back, against encodings written out here.
#[test]
fn gcc_local_thunks_are_rewritten_per_mode_and_back() {
    use altpatch::retpoline::Mode;

    let t = common::TextCopy::of(&gcc_program(
        "gcc-local-thunk",
        &["-mindirect-branch=thunk"],
    ));
    assert_eq!(t.sites.len(), 1, "{:?}", t.sites);
    let (site, thunk) = (t.sites[0].addr, t.sites[0].target);
    let original = (t.at(site, 5), t.at(thunk, 5));
    assert_eq!(
        original.1,
        [0xe8, 7, 0, 0, 0],
        "GCC's thunk starts with call +7"
    );
    let step = |mode: Mode| {
        let r = t.apply(mode);
        assert_eq!(r.compiled_thunks.len(), 1);
        assert_eq!(
            r.compiled_thunks[0].refused, None,
            "{:?}",
            r.compiled_thunks
        );
        (t.at(site, 5), t.at(thunk, 5))
    };
    // call *%rax behind a 3-byte NOP; the thunk jumps through %rax behind
    // a NOP where lfence mode puts its `lfence` (one instruction apart).
    let plain = (
        vec![0x0f, 0x1f, 0x00, 0xff, 0xd0],
        vec![0x0f, 0x1f, 0x00, 0xff, 0xe0],
    );
    assert_eq!(step(Mode::Plain), plain);
    // lfence fits both for %rax.
    let lf = [0x0f, 0xae, 0xe8];
    assert_eq!(
        step(Mode::Lfence),
        (
            [&lf[..], &[0xff, 0xd0]].concat(),
            [&lf[..], &[0xff, 0xe0]].concat()
        )
    );
    // Back to plain: the filler alone changes (the `jmp` stays at +3).
    assert_eq!(step(Mode::Plain), plain);
    // Back to the compiler's bytes exactly.
    assert_eq!(step(Mode::Generic), original);
    // The rest of the body was never touched.
    let off = thunk - t.copy.as_ptr() as usize;
    assert_eq!(t.copy[off..off + 17], t.original[off..off + 17]);
}

/// GCC's local return thunk (`-mfunction-return=thunk`) is a return
/// retpoline, not a bare `ret`: only plain mode may replace its sites by
/// `ret`; generic and lfence keep them on it.
#[test]
fn a_compiled_in_return_retpoline_is_kept_but_in_plain_mode() {
    use altpatch::retpoline::{Mode, Outcome};

    let t = common::TextCopy::of(&gcc_program(
        "gcc-local-return-thunk",
        &["-mindirect-branch=thunk", "-mfunction-return=thunk"],
    ));
    let returns: Vec<_> = t
        .sites
        .iter()
        .filter(|s| s.kind == SiteKind::ReturnThunk)
        .collect();
    assert!(!returns.is_empty(), "{:?}", t.sites);
    let before: Vec<_> = returns.iter().map(|s| t.at(s.addr, 5)).collect();
    for (mode, inlined) in [
        (Mode::Generic, false),
        (Mode::Lfence, false),
        (Mode::Plain, true),
    ] {
        let r = t.apply(mode);
        for (s, old) in returns.iter().zip(&before) {
            let o = r
                .sites
                .iter()
                .find(|o| o.site.addr == s.addr)
                .unwrap()
                .outcome;
            if inlined {
                assert_eq!(o, Outcome::Inlined);
                assert_eq!(t.at(s.addr, 5), [x86::RET, 0xcc, 0xcc, 0xcc, 0xcc]);
            } else {
                assert_eq!(o, Outcome::ViaThunk, "{mode}");
                assert_eq!(
                    &t.at(s.addr, 5),
                    old,
                    "{mode}: the return site is left on the thunk"
                );
            }
        }
    }
}
