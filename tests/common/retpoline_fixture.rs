//! The `retpoline` fixture program (tests/fixtures/sites, binary
//! `retpoline`) run with steps, and what it prints read back; the
//! encodings written out independently of the crate. Shared by
//! `tests/retpoline.rs` and `tests/retpoline_its.rs` (included by path).
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use altpatch::x86::Reg;

use crate::common::{self, addr, unhex};

pub const RESULTS: &str =
    "13 42 80 11 jcc [15, 1005, 2005, 15, 9, 7] cs [63935, 15, 3005, 15, 4005]";

pub fn fixture() -> PathBuf {
    common::build_fixture("sites", true).join("retpoline")
}

/// One site as the fixture prints it after a step.
#[derive(Debug, Clone)]
pub struct SiteLine {
    pub addr: usize,
    pub kind: String,
    pub reg: Option<u8>,
    pub form: String,
    pub len: usize,
    pub outcome: String,
    pub bytes: Vec<u8>,
}

/// What the fixture printed for one step.
#[derive(Debug, Default)]
pub struct StepOut {
    pub name: String,
    pub error: Option<String>,
    pub unchanged: Option<bool>,
    pub sites: Vec<SiteLine>,
    pub thunks: HashMap<u8, (usize, Vec<u8>)>,
    /// The ITS thunks' entries, by register number.
    pub its_thunks: HashMap<u8, usize>,
    pub return_thunk: usize,
    pub results: String,
    pub report: String,
}

pub struct Run {
    pub before: String,
    pub bias: usize,
    pub steps: Vec<StepOut>,
    pub wrong: u64,
}

pub fn run(steps: &[&str]) -> Run {
    run_with(steps, &[])
}

/// [`run`] with environment variables set for the program.
pub fn run_with(steps: &[&str], env: &[(&str, &str)]) -> Run {
    let text = common::run_program(&fixture(), steps, env);
    let mut r = Run {
        before: String::new(),
        bias: 0,
        steps: Vec::new(),
        wrong: u64::MAX,
    };
    for line in text.lines() {
        let w: Vec<&str> = line.split(' ').collect();
        match w[0] {
            "before" => r.before = line["before ".len()..].to_string(),
            "bias" => r.bias = addr(w[1]),
            "step" => r.steps.push(StepOut {
                name: w[1].to_string(),
                ..Default::default()
            }),
            "error" => r.steps.last_mut().unwrap().error = Some(line.to_string()),
            "unchanged" => r.steps.last_mut().unwrap().unchanged = Some(w[1] == "true"),
            "site" => r.steps.last_mut().unwrap().sites.push(SiteLine {
                addr: addr(w[1]),
                kind: w[2].to_string(),
                reg: Reg::from_name(w[3]).map(|r| r as u8),
                form: w[4].to_string(),
                len: w[5].parse().unwrap(),
                outcome: w[6].to_string(),
                bytes: unhex(w[7]),
            }),
            "thunk" => {
                let reg = Reg::from_name(w[1]).unwrap() as u8;
                let step = r.steps.last_mut().unwrap();
                step.thunks.insert(reg, (addr(w[2]), unhex(w[3])));
            }
            "its-thunk" => {
                let reg = Reg::from_name(w[1]).unwrap() as u8;
                r.steps
                    .last_mut()
                    .unwrap()
                    .its_thunks
                    .insert(reg, addr(w[2]));
            }
            "return-thunk" => r.steps.last_mut().unwrap().return_thunk = addr(w[1]),
            "results" => r.steps.last_mut().unwrap().results = line["results ".len()..].into(),
            "caller" => r.wrong = w[3].parse().unwrap(),
            _ => {
                if let Some(s) = r.steps.last_mut() {
                    s.report.push_str(line);
                    s.report.push('\n');
                }
            }
        }
    }
    r
}

// The encodings, written out independently of the crate.

pub fn nop(n: usize) -> Vec<u8> {
    match n {
        2 => vec![0x66, 0x90],
        3 => vec![0x0f, 0x1f, 0x00],
        _ => panic!("no {n}-byte NOP expected"),
    }
}

/// `call *%reg` (`ff d0+r`) or `jmp *%reg` (`ff e0+r`), REX.B for r8..r15.
pub fn reg_branch(call: bool, r: u8) -> Vec<u8> {
    let op = if call { 0xd0 } else { 0xe0 };
    if r < 8 {
        vec![0xff, op + r]
    } else {
        vec![0x41, 0xff, op + r - 8]
    }
}

pub const LFENCE: [u8; 3] = [0x0f, 0xae, 0xe8];

/// `call`/`jmp`/`jcc rel32` from `s` to `target`, after `cs` prefixes
/// filling the site's length.
pub fn rel32_form(s: &SiteLine, target: usize) -> Vec<u8> {
    let op = match s.form.as_str() {
        "call" => vec![0xe8],
        "jmp" => vec![0xe9],
        f => vec![0x0f, 0x80 + f["jcc".len()..].parse::<u8>().unwrap()],
    };
    let mut b = vec![0x2e; s.len - op.len() - 4];
    b.extend(op);
    let rel = (target as i64 - (s.addr + s.len) as i64) as i32;
    b.extend_from_slice(&rel.to_le_bytes());
    b
}
