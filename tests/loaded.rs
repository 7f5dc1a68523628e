//! Retpolines across objects, loaded by tests/fixtures/sites `loader`,
//! patched at load time with `retpoline::apply_loaded` while two threads
//! call into them, unloaded and loaded again (often at the same address:
//! patched again from the file's bytes):
//!
//! * a C shared object built by GCC against the executable's thunks
//!   (`-mindirect-branch=thunk-extern -mfunction-return=thunk-extern`,
//!   `--emit-relocs`; the thunks reached through its PLT from the
//!   executable, which exports them);
//! * a Rust cdylib built with `+retpoline-external-thunk` that links its
//!   own copy of altpatch's thunks (tests/fixtures/rustlib): its sites and
//!   its thunk copy are patched.
//!
//! Every site and thunk is checked byte for byte against encodings
//! written out here, every call's result against the first unpatched load
//! (in the loader) and against the same computation written in Rust here.

mod common;

use common::unhex;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use altpatch::elf;
use altpatch::sites::SiteKind;
use altpatch::x86::{self, Reg};
use object::{Object, ObjectSection, ObjectSymbol};

fn library() -> PathBuf {
    common::retpoline_c_library()
}

#[derive(Debug)]
struct Load {
    base: usize,
    report: Vec<usize>,
    sites: Vec<(usize, String, String, usize, Vec<u8>)>,
    thunks: Vec<(usize, String, Vec<u8>, String)>,
    values: Vec<i64>,
}

fn run(mode: &str, lib: &std::path::Path) -> (Vec<Load>, String) {
    let loader = common::build_fixture("sites", true).join("loader");
    let out = Command::new(loader).arg(mode).arg(lib).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "loader {mode}: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hex = |h: &str| usize::from_str_radix(h.trim_start_matches("0x"), 16).unwrap();
    let mut loads: Vec<Load> = Vec::new();
    let mut last = String::new();
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w[0] {
            "load" => loads.push(Load {
                base: hex(w[3]),
                report: vec![],
                sites: vec![],
                thunks: vec![],
                values: vec![],
            }),
            "thunk" => loads.last_mut().unwrap().thunks.push((
                hex(w[1]),
                w[2].into(),
                unhex(w[3]),
                w[4].into(),
            )),
            "value" => loads.last_mut().unwrap().values.push(w[2].parse().unwrap()),
            "report" => {
                loads.last_mut().unwrap().report =
                    w[1..].iter().map(|n| n.parse().unwrap()).collect()
            }
            "site" => loads.last_mut().unwrap().sites.push((
                hex(w[1]),
                w[2].into(),
                w[3].into(),
                w[4].parse().unwrap(),
                (0..w[5].len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&w[5][i..i + 2], 16).unwrap())
                    .collect(),
            )),
            "wrong" => last = line.into(),
            _ => {}
        }
    }
    (loads, last)
}

fn field(line: &str, name: &str) -> usize {
    let w: Vec<&str> = line.split_whitespace().collect();
    w[w.iter().position(|x| *x == name).unwrap() + 1]
        .parse()
        .unwrap()
}

/// The library file's view: its sites by link-time address, where `work`
/// is, and its PLT.
struct FileView {
    sites: BTreeMap<usize, SiteKind>,
    work: usize,
    plt: Vec<std::ops::Range<usize>>,
}

fn file_view(lib: &std::path::Path) -> FileView {
    let data = std::fs::read(lib).unwrap();
    let found = elf::read_sites(&data).unwrap();
    let file = object::File::parse(&*data).unwrap();
    let work = file
        .symbols()
        .find(|s| s.name() == Ok("work"))
        .unwrap()
        .address() as usize;
    let plt = file
        .sections()
        .filter(|s| matches!(s.name(), Ok(".plt") | Ok(".plt.sec")))
        .map(|s| s.address() as usize..(s.address() + s.size()) as usize)
        .collect();
    FileView {
        sites: found.sites.iter().map(|s| (s.addr, s.kind)).collect(),
        work,
        plt,
    }
}

fn reg_of(kind: &str) -> Option<Reg> {
    kind.strip_prefix("thunk-")
        .map(|r| Reg::from_name(r).unwrap())
}

/// Checks one load in `mode`: the sites are the file's, each in the mode's
/// form (or still its call to the PLT when the form does not fit).
fn check_load(view: &FileView, load: &Load, mode: &str) {
    let bias = load.base - view.work;
    assert_eq!(load.sites.len(), view.sites.len(), "{load:?}");
    // Three registers GCC chose for the pointers (callee-saved), and returns.
    let regs: std::collections::BTreeSet<_> =
        load.sites.iter().filter_map(|s| reg_of(&s.1)).collect();
    assert!(regs.len() >= 3, "{regs:?}");
    for (addr, kind, form, len, bytes) in &load.sites {
        assert!(
            view.sites.contains_key(&(addr - bias)),
            "{addr:#x} is not a file site"
        );
        match reg_of(kind) {
            None => {
                // Returns are inlined in every mode: ret + int3 filler.
                assert_eq!(form, "jmp");
                let mut want = vec![x86::RET];
                want.resize(*len, x86::INT3);
                assert_eq!(bytes, &want, "return site {addr:#x}");
            }
            Some(r) => {
                assert_eq!(form, "call", "{addr:#x}");
                let call = x86::call_reg(r);
                let inline_fits = match mode {
                    "plain" => true,
                    "lfence" => call.len() + 3 <= *len,
                    _ => false,
                };
                if inline_fits {
                    let mut want = if mode == "lfence" {
                        x86::LFENCE.to_vec()
                    } else {
                        x86::nop(len - call.len()).unwrap().to_vec()
                    };
                    want.extend_from_slice(&call);
                    assert_eq!(bytes, &want, "{mode} site {addr:#x} ({r})");
                } else {
                    // Still `call rel32` into the library's PLT (and on to
                    // the executable's thunk, in the same mode).
                    assert_eq!(bytes[0], 0xe8, "{addr:#x}");
                    let rel = i32::from_le_bytes(bytes[1..5].try_into().unwrap());
                    let to = (addr + 5).wrapping_add_signed(rel as isize) - bias;
                    assert!(
                        view.plt.iter().any(|p| p.contains(&to)),
                        "{addr:#x} -> {to:#x}"
                    );
                }
            }
        }
    }
}

/// `work` of the C library, written again here.
fn c_work(x: i64) -> i64 {
    // three(add1, dbl, neg, x): r = x + 1; r += 2r; r += -r (0); then
    // 0 + add1(0) + dbl(x) + neg(x).
    let three = 1 + x;
    let dispatch = match x & 7 {
        0 => x + 3,
        1 => x * 5,
        2 => x - 7,
        3 => x ^ 0x55,
        4 => x << 2,
        5 => x / 3,
        6 => x % 11,
        _ => 0,
    };
    three + dispatch
}

/// `work` of the Rust cdylib, written again here.
fn rust_work(x: i64) -> i64 {
    let w = |k: i64| [3, 17, 5, 101, 7, 13, 29, 1][(k & 7) as usize];
    let r = (x + 3) + w(x);
    let r = r.wrapping_mul(5) + w(1 + x);
    (r ^ 0x55) + w(2 + x)
}

#[test]
fn a_shared_object_is_patched_at_load_under_running_threads_and_again_after_reload() {
    let lib = library();
    let view = file_view(&lib);
    assert!(view.sites.values().any(|k| *k == SiteKind::ReturnThunk));
    for mode in ["plain", "lfence", "generic"] {
        let (loads, wrong) = run(mode, &lib);
        assert_eq!(loads.len(), 2, "{mode}");
        for load in &loads {
            check_load(&view, load, mode);
            // Every site changed on each load was written by that load's
            // call: a fresh load is the file's bytes again.
            let [sites, inlined, via, refused, written] = load.report[..] else {
                panic!("{:?}", load.report)
            };
            assert_eq!(sites, view.sites.len());
            assert_eq!(inlined + via + refused, sites);
            assert_eq!(written, inlined, "{mode}: {:?}", load.report);
            // Its PLT stubs are not thunks of its own.
            assert!(load.thunks.is_empty(), "{:?}", load.thunks);
            assert_eq!(load.values, (0..8).map(c_work).collect::<Vec<_>>());
        }
        assert_eq!(field(&wrong, "wrong"), 0, "{mode}: {wrong}");
        assert!(field(&wrong, "calls") >= 1024, "{mode}: {wrong}");
    }
}

#[test]
fn a_rust_cdylib_with_its_own_thunks_is_patched_with_them() {
    let lib = common::build_fixture("rustlib", true).join("librustlib_fixture.so");
    let view = file_view(&lib);
    assert!(view.sites.len() > 20, "{}", view.sites.len());
    let r11 = x86::call_reg(Reg::R11);
    for mode in ["plain", "lfence", "generic"] {
        let (loads, wrong) = run(mode, &lib);
        assert_eq!(loads.len(), 2, "{mode}");
        for load in &loads {
            let bias = load.base - view.work;
            assert_eq!(
                load.values,
                (0..8).map(rust_work).collect::<Vec<_>>(),
                "{mode}"
            );
            // Its own copy of this crate's r11 slot, in the mode's form.
            assert_eq!(load.thunks.len(), 1, "{:?}", load.thunks);
            let (thunk, reg, head, state) = &load.thunks[0];
            assert_eq!((reg.as_str(), state.as_str()), ("r11", "in-form"));
            let want: &[u8] = match mode {
                "plain" => &[0x0f, 0x1f, 0x00, 0x41, 0xff, 0xe3],
                "lfence" => &[0x0f, 0xae, 0xe8, 0x41, 0xff, 0xe3],
                _ => &[0x2e, 0xe8, 0x07, 0, 0, 0],
            };
            assert_eq!(head, want, "{mode} thunk head");
            for (addr, kind, form, len, bytes) in &load.sites {
                assert_eq!(kind, "thunk-r11");
                assert!(view.sites.contains_key(&(addr - bias)), "{addr:#x}");
                if mode == "plain" && form == "call" {
                    let mut w = x86::nop(len - r11.len()).unwrap().to_vec();
                    w.extend_from_slice(&r11);
                    assert_eq!(bytes, &w, "{addr:#x}");
                } else if mode != "plain" {
                    // Left on the library's own thunk (lfence needs 6
                    // bytes for %r11; generic keeps every site).
                    let op = if form == "jcc" { 2 } else { 1 };
                    let rel = i32::from_le_bytes(bytes[op..op + 4].try_into().unwrap());
                    assert_eq!(
                        (addr + len).wrapping_add_signed(rel as isize),
                        *thunk,
                        "{addr:#x}"
                    );
                }
            }
            let [sites, inlined, via, refused, written] = load.report[..] else {
                panic!("{:?}", load.report)
            };
            assert_eq!(sites, view.sites.len());
            assert_eq!(
                (inlined, via, refused, written),
                match mode {
                    "plain" => (sites, 0, 0, sites),
                    "lfence" => (0, 0, sites, 0),
                    _ => (0, sites, 0, 0),
                },
                "{mode}"
            );
        }
        assert_eq!(field(&wrong, "wrong"), 0, "{mode}: {wrong}");
        assert!(field(&wrong, "calls") >= 1024, "{mode}: {wrong}");
    }
}
