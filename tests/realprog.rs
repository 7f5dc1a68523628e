//! A real-crate program built with the README's retpoline recipe
//! (tests/fixtures/realprog: regex + serde_json + trait objects, every
//! indirect branch through a thunk, `--emit-relocs`): patched in each mode
//! at start-up and live under running threads, its results identical to
//! the unpatched run.

mod common;

use std::path::PathBuf;
use std::process::Command;

fn fixture() -> PathBuf {
    common::build_fixture("realprog", true).join("realprog-fixture")
}

/// The report lines (`sites N inlined N ...`) of a run.
fn reports(lines: &[String]) -> Vec<&String> {
    lines.iter().filter(|l| l.starts_with("sites ")).collect()
}

/// Runs the fixture with `steps`; its stdout lines.
fn run(steps: &[&str]) -> Vec<String> {
    let out = Command::new(fixture()).args(steps).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "fixture {steps:?} failed: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines().map(str::to_owned).collect()
}

/// The numbers after each word of a `sites N inlined N ...` line.
fn field(line: &str, name: &str) -> usize {
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == name {
            return words.next().unwrap().parse().unwrap();
        }
    }
    panic!("no {name} in {line:?}")
}

fn result(lines: &[String]) -> &str {
    lines
        .last()
        .and_then(|l| l.strip_prefix("result "))
        .expect("a result line")
}

#[test]
fn every_mode_gives_the_unpatched_result() {
    let reference = run(&["none"]);
    let reference = result(&reference).to_owned();
    let plain = run(&["plain"]);
    assert_eq!(result(&plain), reference);
    // Thousands of compiler-generated sites, every one inlined and written.
    let sites = field(&plain[0], "sites");
    assert!(sites > 5000, "{}", plain[0]);
    assert_eq!(field(&plain[0], "inlined"), sites, "{}", plain[0]);
    assert_eq!(field(&plain[0], "written"), sites, "{}", plain[0]);
    // Generic keeps every site on the thunks; lfence cannot fit `call
    // *%r11` (the register Rust uses) with an lfence in 5 bytes.
    let generic = run(&["generic"]);
    assert_eq!(result(&generic), reference);
    assert_eq!(field(&generic[0], "via_thunk"), sites, "{}", generic[0]);
    let lfence = run(&["lfence"]);
    assert_eq!(result(&lfence), reference);
    assert_eq!(field(&lfence[0], "refused"), sites, "{}", lfence[0]);
    // Applying twice writes nothing the second time.
    let twice = run(&["plain", "plain"]);
    let second = reports(&twice)[1];
    assert_eq!(field(second, "written"), 0, "{second}");
    assert_eq!(result(&twice), reference);
}

#[test]
fn live_patching_under_running_threads_keeps_every_result() {
    let reference = run(&["none"]);
    let lines = run(&["live"]);
    let wrong = lines
        .iter()
        .find(|l| l.starts_with("wrong "))
        .expect("a wrong line");
    assert_eq!(field(wrong, "wrong"), 0, "{wrong}");
    // The workers ran before, between and after the two batches.
    assert!(field(wrong, "before") >= 4, "{wrong}");
    assert!(field(wrong, "after") >= 8, "{wrong}");
    // The second batch inlined every site while they ran.
    let plain = reports(&lines)[1];
    assert_eq!(field(plain, "inlined"), field(plain, "sites"), "{plain}");
    assert!(field(plain, "written") > 5000, "{plain}");
    assert_eq!(result(&lines), result(&reference));
}
