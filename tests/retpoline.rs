//! Retpolines: the thunks and their sites patched per mode, in a program
//! built with retpolines (tests/fixtures/sites, binary `retpoline`: Rust
//! with `+retpoline-external-thunk`, C by GCC with thunk-extern and
//! return thunks, hand-written `jcc`s), checked byte for byte against
//! encodings written out here, and by calling through them; refusals.

mod common;
#[path = "common/retpoline_fixture.rs"]
mod fixture;

use common::func;
use fixture::*;

use std::collections::BTreeSet;
use std::sync::Mutex;

use altpatch::Image;
use altpatch::LinuxPoke;
use altpatch::elf;
use altpatch::plan::{Edit, Plan};
use altpatch::retpoline::{self, Error, Mode, Policy};
use altpatch::sites::{Site, SiteKind};
use altpatch::x86::Reg;

/// The outcome and bytes a site must have after `mode`. On a host
/// Indirect Target Selection affects (the report says so), an inline
/// branch that would end in the lower half of a cache line is a branch to
/// the ITS thunk for its register instead.
fn expected(s: &SiteLine, mode: &str, step: &StepOut) -> (&'static str, Vec<u8>) {
    let (outcome, bytes) = expected_without_its(s, mode, step);
    let its = step.report.contains("Indirect Target Selection");
    match (s.reg, bytes.iter().position(|&b| b == 0xff)) {
        (Some(r), Some(k)) if its && outcome == "inlined" && (s.addr + k + 1) & 0x20 == 0 => {
            ("via-thunk", rel32_form(s, step.its_thunks[&r]))
        }
        _ => (outcome, bytes),
    }
}

/// [`expected`] on a CPU Indirect Target Selection does not affect.
fn expected_without_its(s: &SiteLine, mode: &str, step: &StepOut) -> (&'static str, Vec<u8>) {
    let cc = s.form.strip_prefix("jcc").map(|c| c.parse::<u8>().unwrap());
    let int3s = |b: &mut Vec<u8>| b.resize(s.len, 0xcc);
    if s.kind == "return_thunk" {
        // `ret` in every mode; a jcc skips it when its condition fails.
        let mut b = match cc {
            None => vec![0xc3],
            Some(cc) => vec![0x70 + (cc ^ 1), (s.len - 2) as u8, 0xc3],
        };
        int3s(&mut b);
        return ("inlined", b);
    }
    let r = s.reg.expect("a thunk register");
    let thunk = step.thunks[&r].0;
    let original = rel32_form(s, thunk);
    // Filler first (lfence, or a NOP of the same length wherever lfence
    // fits), then the branch; bytes beyond both (a `cs`-prefixed site) are
    // `cs` prefixes on a call and `int3`s after a jmp.
    let call = s.form == "call";
    let br = reg_branch(call, r);
    let excess = s.len - br.len();
    let filler = excess.min(3);
    let tail = || {
        let pad = excess - filler;
        let mut b = if call { vec![0x2e; pad] } else { vec![] };
        b.extend(&br);
        b.resize(b.len() + if call { 0 } else { pad }, 0xcc);
        b
    };
    let jcc_lfence_fits = 2 + 3 + reg_branch(false, r).len() <= s.len;
    match (mode, cc) {
        ("generic", _) => ("via-thunk", original),
        ("lfence", Some(_)) if !jcc_lfence_fits => ("refused:jcc;", original),
        ("lfence", None) if filler < 3 => ("refused:lfence;", original),
        ("lfence", None) => ("inlined", [LFENCE.to_vec(), tail()].concat()),
        ("plain", None) => ("inlined", [nop(filler), tail()].concat()),
        (_, Some(cc)) => {
            let mut b = vec![0x70 + (cc ^ 1), (s.len - 2) as u8];
            if mode == "lfence" {
                b.extend(LFENCE);
            } else if jcc_lfence_fits {
                b.extend(nop(3));
            }
            b.extend(reg_branch(false, r));
            int3s(&mut b);
            ("inlined", b)
        }
        _ => unreachable!(),
    }
}

/// Checks every site and thunk of a step against `mode`'s encodings.
fn check_step(step: &StepOut, mode: &str) {
    assert!(step.error.is_none(), "{}: {:?}", step.name, step.error);
    assert_eq!(step.results, RESULTS, "{}: results", step.name);
    assert!(
        step.sites.len() > 1000,
        "{}: {} sites",
        step.name,
        step.sites.len()
    );
    for s in &step.sites {
        let (outcome, bytes) = expected(s, mode, step);
        assert!(
            s.outcome.starts_with(outcome),
            "{}: site {:#x} {} {:?} {}: outcome {} (expected {outcome})",
            step.name,
            s.addr,
            s.kind,
            s.reg,
            s.form,
            s.outcome
        );
        assert_eq!(
            s.bytes, bytes,
            "{}: site {:#x} {} r{:?} {}",
            step.name, s.addr, s.kind, s.reg, s.form
        );
    }
    assert_eq!(step.thunks.len(), 15, "every register but rsp");
    assert!(!step.thunks.contains_key(&4));
    for (&r, (_, head)) in &step.thunks {
        let want = match mode {
            "generic" => vec![0x2e, 0xe8, 7, 0, 0, 0],
            _ => {
                let mut b = if mode == "lfence" {
                    LFENCE.to_vec()
                } else {
                    nop(3)
                };
                b.extend(reg_branch(false, r));
                b.resize(6, 0xcc);
                b
            }
        };
        assert_eq!(*head, want, "{}: thunk r{r}", step.name);
    }
    assert!(step.report.contains(&format!("retpoline mode {mode}")));
}

fn within(step: &StepOut, bias: usize, (start, size): (usize, usize)) -> Vec<SiteLine> {
    step.sites
        .iter()
        .filter(|s| s.addr >= start + bias && s.addr < start + bias + size)
        .cloned()
        .collect()
}

#[test]
fn every_mode_patches_rust_and_gcc_sites_live() {
    let syms = common::symbols(&fixture());
    for mode in ["generic", "lfence", "plain"] {
        let r = run(&[mode]);
        assert_eq!(r.before, RESULTS);
        assert_eq!(r.steps.len(), 1);
        let step = &r.steps[0];
        check_step(step, mode);
        assert_eq!(r.wrong, 0, "{mode}: a concurrent caller saw a wrong result");

        // Rust: calls and a tail call through r11.
        let calls = within(step, r.bias, func(&syms, "rust_calls"));
        assert!(calls.len() >= 2, "{calls:?}");
        assert!(calls.iter().all(|s| s.reg == Some(11)));
        assert!(calls.iter().any(|s| s.form == "call"));
        let tail = within(step, r.bias, func(&syms, "rust_tail"));
        assert_eq!(tail.len(), 1);
        assert_eq!((tail[0].form.as_str(), tail[0].reg), ("jmp", Some(11)));

        // GCC: many registers, r8..r15 among them, and return thunks.
        let chain = within(step, r.bias, func(&syms, "c_chain"));
        let regs: BTreeSet<u8> = chain.iter().filter_map(|s| s.reg).collect();
        assert!(regs.len() >= 3 && regs.iter().any(|&r| r >= 8), "{regs:?}");
        assert!(regs.iter().any(|&r| r < 8), "{regs:?}");
        let dispatch = within(step, r.bias, func(&syms, "c_dispatch"));
        assert!(dispatch.iter().any(|s| s.kind == "return_thunk"));
        assert!(dispatch.iter().any(|s| s.kind == "thunk"));
        let refused = chain.iter().filter(|s| s.outcome.starts_with("refused"));
        match mode {
            // r8..r15 cannot take lfence inline: documented refusal.
            "lfence" => assert!(refused.clone().count() > 0),
            _ => assert_eq!(refused.count(), 0),
        }

        // Hand-written jcc sites at exported labels, exactly.
        let at = |n: &str| syms[n].0 as usize + r.bias;
        let site = |n: &str| {
            let a = at(n);
            step.sites.iter().find(|s| s.addr == a).unwrap().clone()
        };
        let (tail_jne, tail_je, ret_jne) = (
            site("jcc_tail_site"),
            site("jcc_tail_r10_site"),
            site("jcc_ret_site"),
        );
        assert_eq!((tail_jne.form.as_str(), tail_jne.reg), ("jcc5", Some(0)));
        assert_eq!((tail_je.form.as_str(), tail_je.reg), ("jcc4", Some(10)));
        assert_eq!(ret_jne.kind, "return_thunk");
        // On a host Indirect Target Selection affects, check_step has
        // checked every site's bytes, some sent to ITS thunks; the exact
        // encodings below are for the others.
        let its = step.report.contains("Indirect Target Selection");
        if mode == "plain" && !its {
            // je over jmp *%rax; jne over jmp *%r10; je over ret.
            assert_eq!(tail_jne.bytes, [0x74, 4, 0xff, 0xe0, 0xcc, 0xcc]);
            assert_eq!(tail_je.bytes, [0x75, 4, 0x41, 0xff, 0xe2, 0xcc]);
        }
        assert_eq!(ret_jne.bytes, [0x74, 4, 0xc3, 0xcc, 0xcc, 0xcc]);

        // GCC's cs-prefixed sites (-mindirect-branch-cs-prefix): 6 bytes
        // from the cs byte, every byte used; none refused in any mode.
        let sym = |n: &str| (syms[n].0 as usize, syms[n].1 as usize);
        for reg in 8..=15u8 {
            let name = format!("r{reg}");
            let calls = within(step, r.bias, sym(&format!("cs_call_{name}")));
            let call = calls.iter().find(|s| s.kind == "thunk").unwrap();
            assert_eq!(
                (call.len, call.reg, call.form.as_str()),
                (6, Some(reg), "call")
            );
            assert!(!call.outcome.starts_with("refused"), "{call:?}");
            let (b, modrm) = (&call.bytes, 0xd0 + reg - 8);
            match mode {
                _ if its && call.outcome.starts_with("via-thunk") => {}
                "lfence" => assert_eq!(b, &[0x0f, 0xae, 0xe8, 0x41, 0xff, modrm]),
                "plain" => assert_eq!(b, &[0x0f, 0x1f, 0x00, 0x41, 0xff, modrm]),
                _ => assert_eq!(b[..2], [0x2e, 0xe8]),
            }
            if reg <= 11 {
                let tails = within(step, r.bias, sym(&format!("cs_tail_{name}")));
                let jmp = tails.iter().find(|s| s.kind == "thunk").unwrap();
                assert_eq!((jmp.len, jmp.reg, jmp.form.as_str()), (6, Some(reg), "jmp"));
                assert!(!jmp.outcome.starts_with("refused"), "{jmp:?}");
            }
        }
        // Hand-written `cs jne`/`cs je` (7 bytes) and `cs jmp` to the
        // return thunk (6): jne over lfence; jmp *%rax fits in 7 bytes,
        // with %r9's REX it does not.
        let cs_rax = within(step, r.bias, sym("jcc_cs_rax"));
        let (jne, ret) = (&cs_rax[0], &cs_rax[1]);
        assert_eq!(
            (jne.len, jne.form.as_str(), ret.len, ret.kind.as_str()),
            (7, "jcc5", 6, "return_thunk")
        );
        let cs_r9 = within(step, r.bias, sym("jcc_cs_r9"));
        assert_eq!((cs_r9[0].len, cs_r9[0].form.as_str()), (7, "jcc4"));
        match mode {
            _ if its => {}
            "lfence" => {
                assert_eq!(jne.bytes, [0x74, 5, 0x0f, 0xae, 0xe8, 0xff, 0xe0]);
                assert!(cs_r9[0].outcome.starts_with("refused:jcc;"));
            }
            "plain" => {
                assert_eq!(jne.bytes, [0x74, 5, 0x0f, 0x1f, 0x00, 0xff, 0xe0]);
                assert_eq!(cs_r9[0].bytes, [0x75, 5, 0x41, 0xff, 0xe1, 0xcc, 0xcc]);
            }
            _ => assert_eq!(jne.bytes[..3], [0x2e, 0x0f, 0x85]),
        }
        assert_eq!(ret.bytes, [0xc3, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc]);
    }
}

#[test]
fn moving_between_modes_live_and_in_place() {
    let steps = [
        "lfence",
        "plain",
        "lfence",
        "plain@inplace",
        "generic@inplace",
        "plain",
        "lfence",
        "lfence@inplace",
        "plain",
    ];
    let r = run(&steps);
    assert_eq!(r.steps.len(), steps.len());
    for (i, step) in r.steps.iter().enumerate() {
        assert_eq!(step.name, steps[i]);
        let mode = steps[i].trim_end_matches("@inplace");
        // Live, towards more mitigation: lfence after plain puts r8..r15
        // sites back through the thunk, which a thread may be inside of.
        if i == 2 || i == 6 {
            let e = step.error.as_deref().unwrap();
            // The message says why and what to do instead.
            assert!(
                e.contains("not safe while other threads run") && e.contains("LinuxPoke::new"),
                "{e}"
            );
            assert_eq!(step.unchanged, Some(true), "a refused batch writes nothing");
            continue;
        }
        check_step(step, mode);
    }
    assert_eq!(r.wrong, 0);
}

#[test]
fn the_trap_handler_has_no_sites() {
    // A site inside the SIGTRAP handler could hold an int3 when the handler
    // runs, killing the process.
    let path = fixture();
    let data = std::fs::read(&path).unwrap();
    let found = elf::read_sites(&data).unwrap();
    let syms = common::symbols(&path);
    let inside = common::within(&found.sites, func(&syms, "on_sigtrap"));
    assert!(inside.is_empty(), "{inside:#?}");
    assert!(found.sites.len() > 1000);
}

// In this test binary: hand-written sites calling the crate's thunks.
core::arch::global_asm!(
    r#"
    .pushsection .text.retpoline_test,"ax",@progbits
    .balign 64
    # rp_call_rax(f, x) = f(x) + 1, through __x86_indirect_thunk_rax
    .globl rp_call_rax
    .type rp_call_rax, @function
rp_call_rax:
    push %rbx
    mov %rdi, %rax
    mov %rsi, %rdi
    .globl rp_call_rax_site
rp_call_rax_site:
    call __x86_indirect_thunk_rax
    add $1, %rax
    pop %rbx
    ret
    .size rp_call_rax, . - rp_call_rax
    # rp_call_r9(f, x) = f(x) + 2, through __x86_indirect_thunk_r9
    .globl rp_call_r9
    .type rp_call_r9, @function
rp_call_r9:
    push %rbx
    mov %rdi, %r9
    mov %rsi, %rdi
    .globl rp_call_r9_site
rp_call_r9_site:
    call __x86_indirect_thunk_r9
    add $2, %rax
    pop %rbx
    ret
    .size rp_call_r9, . - rp_call_r9
    .popsection
    "#,
    options(att_syntax)
);

unsafe extern "C" {
    fn rp_call_rax(f: extern "C" fn(u64) -> u64, x: u64) -> u64;
    fn rp_call_r9(f: extern "C" fn(u64) -> u64, x: u64) -> u64;
    static rp_call_rax_site: [u8; 0];
    static rp_call_r9_site: [u8; 0];
}

extern "C" fn square(x: u64) -> u64 {
    x * x
}

/// The thunks are shared by every test of this binary.
static THUNKS: Mutex<()> = Mutex::new(());

fn my_sites() -> Vec<Site> {
    let want = [
        (&raw const rp_call_rax_site) as usize,
        (&raw const rp_call_r9_site) as usize,
    ];
    let sites: Vec<Site> = elf::current_sites()
        .unwrap()
        .iter()
        .filter(|s| want.contains(&s.addr))
        .copied()
        .collect();
    assert_eq!(sites.len(), 2, "{sites:?}");
    sites
}

fn call_both() -> (u64, u64) {
    // SAFETY: C-ABI asm functions given a valid C function.
    unsafe { (rp_call_rax(square, 7), rp_call_r9(square, 5)) }
}

/// Every site's bytes and every thunk slot.
fn snapshot(sites: &[Site]) -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = sites
        .iter()
        .map(|s| common::read(s.addr, s.len as usize))
        .collect();
    v.push(common::read(
        retpoline::thunk_array(),
        retpoline::THUNK_SLOT * 17,
    ));
    v
}

fn policy(mode: Mode) -> Policy {
    Policy::new(mode, "test")
}

#[test]
fn hand_written_sites_in_place_and_back() {
    let _g = THUNKS.lock().unwrap_or_else(|e| e.into_inner());
    let image = Image::current();
    let sites = my_sites();
    let original = snapshot(&sites);
    assert_eq!(call_both(), (50, 27));
    let mut poke = LinuxPoke::new().unwrap();
    // SAFETY: the in-place poke; no other thread runs these functions.
    let report =
        unsafe { retpoline::apply(&image, &policy(Mode::Plain), &sites, &mut poke) }.unwrap();
    assert_eq!(report.counts(|_| true), (2, 0, 0));
    assert_eq!(call_both(), (50, 27));
    let rax = (&raw const rp_call_rax_site) as usize;
    let r9 = (&raw const rp_call_r9_site) as usize;
    assert_eq!(common::read(rax, 5), [0x0f, 0x1f, 0x00, 0xff, 0xd0]);
    assert_eq!(common::read(r9, 5), [0x66, 0x90, 0x41, 0xff, 0xd1]);
    // SAFETY: as above.
    unsafe { retpoline::apply(&image, &policy(Mode::Lfence), &sites, &mut poke) }.unwrap();
    assert_eq!(common::read(rax, 5), [0x0f, 0xae, 0xe8, 0xff, 0xd0]);
    assert_eq!(common::read(r9, 5)[0], 0xe8, "r9: back through the thunk");
    assert_eq!(call_both(), (50, 27));
    // SAFETY: as above.
    unsafe { retpoline::apply(&image, &policy(Mode::Generic), &sites, &mut poke) }.unwrap();
    assert_eq!(snapshot(&sites), original);
    assert_eq!(call_both(), (50, 27));
}

#[test]
fn unexpected_bytes_at_a_site_writes_nothing() {
    let _g = THUNKS.lock().unwrap_or_else(|e| e.into_inner());
    let image = Image::current();
    let mut sites = my_sites();
    // A "site" on the `mov` before the real one: not a branch to a thunk.
    let bogus = Site {
        addr: sites[0].addr - 3,
        ..sites[0]
    };
    sites.push(bogus);
    let before = snapshot(&sites);
    let mut poke = LinuxPoke::new().unwrap();
    // SAFETY: the in-place poke; no other thread runs these functions.
    let err =
        unsafe { retpoline::apply(&image, &policy(Mode::Plain), &sites, &mut poke) }.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Plan(_)), "{err:?}");
    assert!(msg.contains(&format!("{:x}", bogus.addr)), "{msg}");
    assert_eq!(snapshot(&sites), before, "nothing written");
    assert_eq!(call_both(), (50, 27));
}

#[test]
fn a_site_for_rsp_writes_nothing() {
    let _g = THUNKS.lock().unwrap_or_else(|e| e.into_inner());
    let image = Image::current();
    let mut sites = my_sites();
    let rsp = Site {
        kind: SiteKind::IndirectThunk(Reg::Rsp),
        target: retpoline::thunk_array() + 4 * retpoline::THUNK_SLOT,
        ..sites[1]
    };
    sites.push(rsp);
    let before = snapshot(&sites);
    let mut poke = LinuxPoke::new().unwrap();
    // SAFETY: as above.
    let err =
        unsafe { retpoline::apply(&image, &policy(Mode::Plain), &sites, &mut poke) }.unwrap_err();
    assert!(
        matches!(err, Error::RspSite { site } if site == rsp.addr),
        "{err:?}"
    );
    assert!(err.to_string().contains("%rsp"), "{err}");
    assert_eq!(snapshot(&sites), before, "nothing written");
    assert!(retpoline::thunk(Reg::Rsp).is_none());
}

#[test]
fn a_thunk_with_unexpected_bytes_writes_no_site_either() {
    let _g = THUNKS.lock().unwrap_or_else(|e| e.into_inner());
    let image = Image::current();
    let sites = my_sites();
    let r13 = retpoline::thunk(Reg::R13).unwrap();
    let mut poke = LinuxPoke::new().unwrap();
    // Damage %r13's thunk head (the generic `cs call`), then try a mode.
    let mut damage = Plan::for_image(&image);
    damage.push(Edit::replace(r13, &[0x2e, 0xe8], &[0xcc, 0xcc]));
    // SAFETY: nothing calls through %r13's thunk in this binary.
    unsafe { damage.apply(&mut poke) }.unwrap();
    let before = snapshot(&sites);
    // SAFETY: the in-place poke; no other thread runs these functions.
    let err =
        unsafe { retpoline::apply(&image, &policy(Mode::Plain), &sites, &mut poke) }.unwrap_err();
    assert!(
        matches!(err, Error::BadThunk { reg: Reg::R13, addr } if addr == r13),
        "{err:?}"
    );
    assert_eq!(snapshot(&sites), before, "no site and no thunk written");
    // SAFETY: as above.
    unsafe { damage.undo(&mut poke) }.unwrap();
    assert_eq!(call_both(), (50, 27));
}

#[test]
fn auto_policy_and_override() {
    use altpatch::cpu::{Feature, Features, Overrides, Vendor};
    let intel = Features::none().with_vendor(Vendor::Intel, 6, 0x5e);
    let amd = Features::none().with_vendor(Vendor::Amd, 0x17, 0x31);
    let p = Policy::auto(&intel);
    assert_eq!(p.mode, Mode::Generic);
    assert!(p.reason.contains("enhanced IBRS"), "{p}");
    assert_eq!(Policy::auto(&intel.with(Feature::Eibrs)).mode, Mode::Plain);
    assert_eq!(Policy::auto(&amd).mode, Mode::Generic);
    assert!(Policy::auto(&amd).reason.contains("CVE-2021-26401"));
    assert_eq!(Policy::auto(&amd.with(Feature::AutoIbrs)).mode, Mode::Plain);
    for (s, m) in [
        ("retpoline=lfence", Mode::Lfence),
        ("retpoline=off", Mode::Plain),
        ("retpoline=generic", Mode::Generic),
    ] {
        let p = Policy::choose(&amd.with(Feature::AutoIbrs), &Overrides::parse(s).unwrap());
        assert_eq!(p.mode, m, "{s}");
    }
    let p = Policy::choose(&intel, &Overrides::parse("retpoline=auto").unwrap());
    assert_eq!(p.mode, Mode::Generic);
    let e = Overrides::parse("retpoline=fast").unwrap_err().to_string();
    assert!(e.contains("auto, generic, lfence, plain, off"), "{e}");
}
