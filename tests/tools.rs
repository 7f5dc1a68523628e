//! Live patching that the tools outside the process survive: a uprobe (the
//! way `perf probe`, bpftrace and eBPF agents attach, through
//! `perf_event_open` on the kernel's uprobe PMU) attached before, across and
//! after an update of the page it sits in, by every strategy and
//! publication; `/proc/self/maps`; `perf record -p` after an update.
//!
//! Every scenario runs in a child process of its own (the `child` test,
//! `TOOLS=<scenario>`): a stray `int3` kills it with `SIGTRAP`, and the
//! parent test reports how it ended.

mod common;

#[path = "tools/hardened.rs"]
mod hardened;
#[path = "tools/pokelog.rs"]
mod pokelog;
#[path = "tools/scenarios.rs"]
mod scenarios;
#[path = "tools/uprobe.rs"]
mod uprobe;

use common::child::{CHILD_ARGS, Outcome, finish, required};

/// The one child entry point: runs the scenario named by `TOOLS`.
#[test]
#[ignore = "run in a child process by the other tests"]
fn child() {
    let scenario = std::env::var("TOOLS").expect("TOOLS names the scenario");
    match scenario.as_str() {
        "probes" => scenarios::probes(),
        "perf_target" => scenarios::perf_target(),
        "shared_object" => scenarios::shared_object(),
        "sealed" => hardened::sealed(),
        "poke_log" => pokelog::replay(),
        "no_anon_exec" => hardened::no_anon_exec(),
        s => panic!("unknown scenario {s}"),
    }
    println!("TOOLS-OK {scenario}");
}

fn run(scenario: &str, env: &[(&str, &str)]) -> Outcome {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(CHILD_ARGS).env("TOOLS", scenario);
    cmd.env_remove("ALTPATCH_POKE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    finish(cmd.output().unwrap(), "TOOLS-OK")
}

/// Whether uprobes can be attached here; if not, says why (and fails where
/// the environment must provide them).
fn uprobes_usable() -> bool {
    match uprobe::unavailable() {
        None => true,
        Some(why) => {
            assert!(!required(), "uprobes are required: {why}");
            eprintln!("SKIPPED: {why}");
            false
        }
    }
}

#[test]
fn a_uprobe_in_the_patched_page_survives_every_strategy_and_publication() {
    if !uprobes_usable() {
        return;
    }
    for s in altpatch::Strategy::ALL {
        // A strategy the environment refuses (memfd under
        // vm.memfd_noexec=2, say) is not tried; procmem must be usable.
        if altpatch::LinuxPoke::with_strategy(altpatch::Publish::InPlace, s).is_err() {
            assert!(
                s != altpatch::Strategy::ProcMem || !required(),
                "procmem is refused here"
            );
            eprintln!("SKIPPED for {}: refused by this environment", s.name());
            continue;
        }
        let poke = s.name();
        for publish in ["swap", "int3", "inplace"] {
            let o = run(
                "probes",
                &[("ALTPATCH_POKE", poke), ("TOOLS_PUBLISH", publish)],
            );
            assert!(
                o.ok("probes"),
                "{poke}, {publish}: the child ended {:?} (signal {:?}):\n{}",
                o.status,
                o.signal,
                o.out
            );
        }
    }
}

#[test]
fn a_uprobe_in_a_shared_object_survives_its_load_time_swap() {
    if !uprobes_usable() {
        return;
    }
    let so = common::build_fixture("altso", false).join("libaltso.so");
    let o = run("shared_object", &[("ALTSO", so.to_str().unwrap())]);
    assert!(o.ok("shared_object"), "{:?}:\n{}", o.status, o.out);
}

/// `perf record -p` attached after an update resolves the samples in the
/// swapped page to the function's symbol in the test binary (not `[JIT]`,
/// not `[unknown]`).
#[test]
fn perf_record_after_an_update_names_the_function() {
    use std::io::BufRead;
    let perf = std::process::Command::new("perf").arg("--version").output();
    if !perf.is_ok_and(|o| o.status.success()) {
        assert!(!required(), "perf is required (apt-get install linux-perf)");
        eprintln!("SKIPPED: perf not found (apt-get install linux-perf)");
        return;
    }
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(CHILD_ARGS)
        .env("TOOLS", "perf_target")
        .env_remove("ALTPATCH_POKE")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let pid = loop {
        let l = lines.next().expect("the child ended before READY").unwrap();
        if let Some(p) = l.split("READY ").nth(1) {
            break p.trim().to_string();
        }
    };
    let data = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("tools-perf.data");
    let rec = std::process::Command::new("perf")
        .args(["record", "-e", "cpu-clock", "-F", "2000", "-p", &pid, "-o"])
        .arg(&data)
        .args(["--", "sleep", "1"])
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let err = String::from_utf8_lossy(&rec.stderr);
    if !rec.status.success() {
        assert!(!required(), "perf record failed: {err}");
        eprintln!("SKIPPED: perf record does not run on this kernel: {err}");
        return;
    }
    let rep = std::process::Command::new("perf")
        .args(["report", "--stdio", "--sort", "dso,sym", "-i"])
        .arg(&data)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&rep.stdout);
    let exe = std::env::current_exe().unwrap();
    let dso = exe.file_name().unwrap().to_str().unwrap();
    let hot = report
        .lines()
        .find(|l| l.contains("tools_hot"))
        .unwrap_or_else(|| panic!("no sample named tools_hot:\n{report}"));
    let share: f64 = hot
        .trim()
        .split('%')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        hot.contains(dso) && share > 50.0,
        "tools_hot is not the binary's hot symbol: {hot}\n{report}"
    );
    assert!(
        !report.contains("[JIT]") && !report.contains("[unknown]"),
        "samples perf could not name:\n{report}"
    );
    println!("perf: {}", hot.trim());
}

#[test]
fn sealed_text_is_updated_in_place_or_refused_with_nothing_written() {
    if !uprobes_usable() {
        return;
    }
    let o = run("sealed", &[]);
    assert!(o.ok("sealed"), "{:?}:\n{}", o.status, o.out);
    if o.out.contains("SKIPPED") {
        assert!(!required(), "mseal is required:\n{}", o.out);
        eprintln!("SKIPPED: no mseal on this kernel");
    }
}

#[test]
fn every_api_works_without_anonymous_exec_memory() {
    let o = run("no_anon_exec", &[]);
    assert!(o.ok("no_anon_exec"), "{:?}:\n{}", o.status, o.out);
}

#[test]
fn the_poke_log_replays_to_the_text() {
    let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("tools-poke-log.jsonl");
    let _ = std::fs::remove_file(&log);
    let o = run("poke_log", &[("ALTPATCH_POKE_LOG", log.to_str().unwrap())]);
    assert!(o.ok("poke_log"), "{:?}:\n{}", o.status, o.out);
}
