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
fn the_embedded_table_gives_the_same_sites_and_result_without_the_file() {
    // A copy with its reserved table filled (what `altpatch embed` does).
    let dir = std::env::temp_dir().join(format!("altpatch-realprog-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let embedded = dir.join("realprog-embedded");
    let mut bytes = std::fs::read(fixture()).unwrap();
    let filled = altpatch::elf::embed(&mut bytes).unwrap();
    std::fs::write(&embedded, &bytes).unwrap();
    let mut perms = std::fs::metadata(fixture()).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&embedded, perms).unwrap();
    let from_relocs = run(&["plain"]);
    let run_embedded = |steps: &[&str]| {
        let out = Command::new(&embedded).args(steps).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let from_table = run_embedded(&["plain"]);
    let sites = field(&from_relocs[0], "sites");
    assert!(
        matches!(filled, altpatch::elf::EmbedOutcome::Written { sites: n, .. } if n >= sites),
        "{filled:?}"
    );
    // Read from the table, not the file: the same sites, inlined and
    // written, and the same result.
    assert!(from_relocs.iter().any(|l| l == "source relocations"));
    assert!(
        from_table.iter().any(|l| l == "source table"),
        "{from_table:?}"
    );
    assert_eq!(reports(&from_table), reports(&from_relocs));
    assert_eq!(result(&from_table), result(&run(&["none"])));
    let _ = std::fs::remove_dir_all(&dir);
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
