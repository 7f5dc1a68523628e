//! A real-crate program built with the README's retpoline recipe
//! (tests/fixtures/realprog: regex + serde_json + trait objects, every
//! indirect branch through a thunk, `--emit-relocs`): patched in each mode
//! at start-up and live under running threads, its results identical to
//! the unpatched run; its start-up stores in place while it has one thread,
//! under a uprobe attached before and after, and under signal handlers
//! that run its sites and start a thread meanwhile.

mod common;
#[path = "tools/uprobe.rs"]
mod uprobe;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// How start-up publishes while the program has one thread.
const IN_PLACE: &str = "via pwrite to /proc/self/mem, in place (start-up: the only thread)";

fn fixture() -> PathBuf {
    common::build_fixture("realprog", true).join("realprog-fixture")
}

/// The report lines (`sites N inlined N ...`) of a run.
fn reports(lines: &[String]) -> Vec<&String> {
    lines.iter().filter(|l| l.starts_with("sites ")).collect()
}

/// Runs the fixture with `steps`; its stdout lines.
fn run(steps: &[&str]) -> Vec<String> {
    run_with(steps, &[])
}

/// [`run`] with environment variables set for the fixture.
fn run_with(steps: &[&str], env: &[(&str, &str)]) -> Vec<String> {
    let text = common::run_program(&fixture(), steps, env);
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
    // Alone at start-up: stored in place, no page swapped.
    assert!(plain.iter().any(|l| l == IN_PLACE), "{plain:?}");
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
    // With threads running, the same start-up call swaps pages.
    let via = lines
        .iter()
        .find(|l| l.starts_with("via "))
        .expect("a via line");
    assert_eq!(via, "via pwrite to /proc/self/mem, page swap", "{lines:?}");
    assert_eq!(result(&lines), result(&reference));
}

/// A start-up whose in-place store fails halfway (a partial `pwrite`,
/// injected) leaves the program's text its file's bytes — no site half
/// written, which the plan's own rollback could not put back, since a
/// half-written site is no instruction to replace — and runs right; the
/// next start-up applies.
#[test]
fn a_start_up_whose_store_fails_halfway_leaves_the_text_as_it_was() {
    let reference = run(&["none"]);
    let lines = run(&["fail", "page", "work", "plain", "page"]);
    assert!(lines[0].contains("injected for tests"), "{lines:?}");
    assert_eq!(lines[1], "page same", "{lines:?}");
    assert_eq!(lines[2], format!("work {}", result(&reference)));
    assert!(lines.iter().any(|l| l == IN_PLACE), "{lines:?}");
    assert!(lines.iter().any(|l| l == "page patched"), "{lines:?}");
    assert_eq!(result(&lines), result(&reference));
}

/// A uprobe on a function whose page the start-up rewrites in place:
/// attached before it, it counts every call after it; detached, it leaves
/// the file's byte (no stray `int3` to kill the process); attached again,
/// it counts every call. The program stays the file's text throughout.
#[test]
fn a_uprobe_around_the_in_place_start_up_counts_every_call_and_leaves_nothing() {
    if let Some(why) = uprobe::unavailable() {
        assert!(!common::child::required(), "uprobes are required: {why}");
        eprintln!("SKIPPED: {why}");
        return;
    }
    let reference = run(&["none"]);
    let steps = [
        "probe", "plain", "page", "work", "wait", "work", "byte", "wait", "work", "wait",
    ];
    let mut child = Command::new(fixture())
        .args(steps)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = || lines.next().expect("a line").unwrap();
    let mut go = || writeln!(stdin, "go").unwrap();
    let probe = next();
    let mut words = probe.split_whitespace().skip(1);
    let at = (
        words.next().unwrap().to_owned(),
        words.next().unwrap().parse::<u64>().unwrap(),
    );
    let pid = child.id() as libc::pid_t;
    assert_eq!(next(), "wait");
    // Attached before the start-up (the child has one thread: its pid).
    let before = uprobe::Uprobe::attach_threads(&at, &[pid]).unwrap();
    go();
    let mut seen = Vec::new();
    let work = loop {
        let l = next();
        if l.starts_with("work ") {
            break l;
        }
        seen.push(l);
    };
    assert!(seen.iter().any(|l| l == IN_PLACE), "{seen:?}");
    assert!(seen.iter().any(|l| l == "page patched"), "{seen:?}");
    let expected = result(&reference);
    assert_eq!(work, format!("work {expected}"));
    assert_eq!(next(), "wait");
    // 200 records, one call each.
    assert_eq!(before.count(), 200);
    drop(before);
    go();
    assert_eq!(next(), format!("work {expected}"));
    assert_eq!(next(), "byte same");
    assert_eq!(next(), "wait");
    let after = uprobe::Uprobe::attach_threads(&at, &[pid]).unwrap();
    go();
    assert_eq!(next(), format!("work {expected}"));
    assert_eq!(next(), "wait");
    assert_eq!(after.count(), 200);
    drop(after);
    go();
    assert_eq!(next(), format!("result {expected}"));
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// Signal handlers run a site and, the first time, start a thread (from the
/// handler) that runs it in a loop, while the program applies `plain` at
/// start-up. A thread that exists when the batch commits makes it a page
/// swap; one started later finds the sites whole — with every signal
/// blocked while the start-up stores in place, no handler can start one
/// between two stores.
#[test]
fn handlers_that_run_sites_and_start_a_thread_during_start_up_see_whole_sites() {
    // The first alarm 0.2 ms in (the thread exists before the commit),
    // during the start-up, and long after it.
    for (delay, via) in [
        ("200", Some("page swap")),
        ("2000", None),
        ("6000", None),
        ("300000", Some("in place (start-up: the only thread)")),
    ] {
        let lines = run_with(&["storm"], &[("STORM_DELAY_US", delay)]);
        let storm = lines
            .iter()
            .find(|l| l.starts_with("storm "))
            .expect("a storm line");
        assert_eq!(field(storm, "wrong"), 0, "delay {delay}: {storm}");
        assert!(field(storm, "handled") > 0, "{storm}");
        assert!(field(storm, "runs") > 100_000, "{storm}");
        if let Some(via) = via {
            assert!(storm.ends_with(via), "delay {delay}: {storm}");
        }
    }
}
