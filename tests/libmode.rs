//! Library mode (issue 26): a library's `ifunc!` resolved, and its stub
//! made a direct `jmp`, when the object that holds it is loaded — with no
//! help from the application. `tests/fixtures/libmode` holds the library
//! (`fastlib`), an application that depends on it alone, built with a
//! plain `cargo build --release`, and the library as a `cdylib`, which a C
//! host loads with `dlopen`; `altlib` and `altapp`, the same for an
//! `alternative!`.

mod common;

use altpatch::cpu::{Feature, Features};

/// `tests/fixtures/libmode` built (once) with `cargo_args`, into its own
/// target directory: the release output folder.
fn build(name: &str, cargo_args: &[&str]) -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("tests/fixtures/libmode");
    assert!(
        !dir.join(".cargo").exists(),
        "the application must build with no .cargo/config.toml"
    );
    let target = root.join("target/fixtures-libmode").join(name);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["build", "--release", "--quiet"])
        .args(cargo_args)
        .current_dir(&dir)
        .env("CARGO_TARGET_DIR", &target)
        // A plain build: none of the flags this crate's tests link with.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "building tests/fixtures/libmode ({cargo_args:?}) failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    target.join("release")
}

fn built() -> std::path::PathBuf {
    static DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| build("default", &[])).clone()
}

fn run(exe: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = std::process::Command::new(exe);
    cmd.args(args).env_remove("ALTPATCH");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{exe:?} {args:?} failed:\n{text}");
    text
}

/// The numbers on the line starting with `key`.
fn line_numbers(out: &str, key: &str) -> Vec<usize> {
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key:?} line:\n{out}"));
    line.split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect()
}

fn expected_implementation() -> &'static str {
    if Features::detect().has(Feature::Popcnt) {
        "popcnt"
    } else {
        "portable"
    }
}

#[test]
fn the_application_gets_the_cpus_implementation_with_the_stub_direct_from_the_start() {
    let out = run(&built().join("app"), &[], &[]);
    // The library's constructor ran before `main`: resolved, stub direct,
    // before any call.
    assert!(out.contains("before-first-call direct true"), "{out}");
    // The calls `count_raw` recorded (fastlib's own and the ones inlined
    // into the application) call the implementation directly.
    let calls = line_numbers(&out, "recorded calls");
    let [n, to_impl, to_stub] = calls[..] else {
        panic!("{out}")
    };
    assert!(n >= 2, "{out}");
    assert_eq!((to_impl, to_stub), (n, 0), "{out}");
    assert!(
        out.contains(&format!(
            "startup Applied {{ ifuncs: 1, calls: {n}, left: 0, took: "
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("implementation {}", expected_implementation())),
        "{out}"
    );
    assert!(
        out.contains("direct true") && out.contains("APP-OK"),
        "{out}"
    );
}

/// The binary-size twins (BENCHMARKS.md measures their sizes; nothing here
/// asserts one) are the same program and count the same, from 5 threads.
#[test]
fn the_size_twins_run_and_agree() {
    let with_altpatch = run(&built().join("size_ifunc"), &[], &[]);
    let with_atomic_ptr = run(&built().join("size_atomic"), &[], &[]);
    assert!(with_altpatch.starts_with("SIZE-OK "), "{with_altpatch}");
    assert_eq!(with_altpatch, with_atomic_ptr);
}

#[test]
fn startup_off_leaves_the_stub_and_the_program_correct() {
    let out = run(&built().join("app"), &[], &[("ALTPATCH", "startup=off")]);
    assert!(out.contains("startup Off"), "{out}");
    assert!(out.contains("before-first-call direct false"), "{out}");
    let calls = line_numbers(&out, "recorded calls");
    assert!(calls[0] >= 2 && calls[1..] == [0, calls[0]], "{out}");
    assert!(
        out.contains("direct false") && out.contains("APP-OK"),
        "{out}"
    );
}

#[test]
fn the_no_startup_feature_leaves_the_stub_and_the_program_correct() {
    let dir = build("optout", &["--features", "app/optout"]);
    let out = run(&dir.join("app"), &[], &[]);
    assert!(out.contains("startup Off"), "{out}");
    assert!(
        out.contains("direct false") && out.contains("APP-OK"),
        "{out}"
    );
}

#[test]
fn the_cdylib_patches_itself_at_each_load_and_nothing_of_the_host() {
    let host = common::gcc(
        "libmode_host",
        include_str!("fixtures/libmode/host.c"),
        &["-O1"],
    );
    let so = built().join("libfastlib.so");
    let out = run(&host, &[so.to_str().unwrap()], &[]);
    let want = if expected_implementation() == "popcnt" {
        2
    } else {
        1
    };
    for round in 0..2 {
        assert!(
            out.contains(&format!(
                "round {round}: direct-at-load 1 implementation {want} calls-direct 1 "
            )),
            "{out}"
        );
    }
    assert!(out.contains("HOST-OK"), "{out}");
    let off = run(
        &host,
        &[so.to_str().unwrap()],
        &[("ALTPATCH", "startup=off")],
    );
    assert!(
        off.contains("round 1: direct-at-load 0 implementation")
            && off.contains("calls-direct 0 count")
            && !off.contains("calls-direct 1")
            && off.contains("HOST-OK"),
        "{off}"
    );
}

#[test]
fn a_librarys_alternatives_are_applied_at_load_when_no_other_thread_exists() {
    let exe = built().join("altapp");
    let popcnt = Features::detect().has(Feature::Popcnt);
    let flag = if popcnt { "flag 1" } else { "flag 0" };
    let out = run(&exe, &[], &[]);
    let replaced = usize::from(popcnt);
    assert!(
        out.contains(&format!(
            "alt-startup Applied {{ sites: 1, replaced: {replaced}, took: "
        )),
        "{out}"
    );
    assert!(out.contains(flag) && out.contains("ALTAPP-OK"), "{out}");
    assert!(out.contains("double 42 direct true"), "{out}");
    // Opted out: the default, correct.
    let off = run(&exe, &[], &[("ALTPATCH", "startup=off")]);
    assert!(
        off.contains("alt-startup Off") && off.contains("flag 0") && off.contains("ALTAPP-OK"),
        "{off}"
    );
    // A thread started before any constructor (as another library's
    // constructor may): the alternative sites keep their defaults, and say
    // why; the ifunc is patched all the same, by page swap (in place only
    // while one thread exists), as the text-poke log shows.
    let log = std::env::temp_dir().join(format!("altapp-{}.log", std::process::id()));
    let log_s = log.to_str().unwrap();
    let threaded = run(
        &exe,
        &[],
        &[("ALTAPP_THREAD", "1"), ("ALTPATCH_POKE_LOG", log_s)],
    );
    assert!(
        threaded.contains("alt-startup OtherThreads")
            && threaded.contains("flag 0")
            && threaded.contains("double 42 direct true")
            && threaded.contains("ALTAPP-OK"),
        "{threaded}"
    );
    let lines = std::fs::read_to_string(&log).unwrap();
    assert!(lines.contains("page swap (at load)"), "{lines}");
    let single = run(&exe, &[], &[("ALTPATCH_POKE_LOG", log_s)]);
    assert!(single.contains("double 42 direct true"), "{single}");
    let lines = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert!(
        lines.contains("in place (at load, the only thread)"),
        "{lines}"
    );
}
