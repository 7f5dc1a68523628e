//! Live patching under what real programs do: foreign `SIGTRAP`s, threads
//! that block every signal, signal storms whose handlers call patched code,
//! alternate signal stacks, `fork` mid-update, `dlclose` + `dlopen`,
//! debuggers, hardened kernels, and no writable view of code left behind.
//!
//! Every scenario runs in a child process of its own (the `child` test,
//! `HOSTILE=<scenario>`), because each changes process-wide state (signal
//! dispositions, the live publication, the strategy) or is meant to kill
//! the process. The parent test checks how the child ended.

mod common;

/// Ten copies of a statement.
macro_rules! rep10 {
    ($($t:tt)*) => {
        $($t)*; $($t)*; $($t)*; $($t)*; $($t)*; $($t)*; $($t)*; $($t)*; $($t)*; $($t)*;
    };
}

#[path = "hostile/probes.rs"]
mod probes;
#[path = "hostile/process.rs"]
mod process;
#[path = "hostile/support.rs"]
mod support;
#[path = "hostile/threads.rs"]
mod threads;
#[path = "hostile/traps.rs"]
mod traps;
#[path = "tools/uprobe.rs"]
mod uprobe;

use support::{Outcome, run};

/// The one child entry point: runs the scenario named by `HOSTILE`.
#[test]
#[ignore = "run in a child process by the other tests"]
fn child() {
    let scenario = std::env::var("HOSTILE").expect("HOSTILE names the scenario");
    match scenario.as_str() {
        s if s.starts_with("trap_") => traps::scenario(s),
        s if s.starts_with("threads_") => threads::scenario(s),
        s if s.starts_with("probes_") => probes::scenario(s),
        s => process::scenario(s),
    }
    println!("HOSTILE-OK {scenario}");
}

fn ok(scenario: &str, env: &[(&str, &str)]) -> Outcome {
    let o = run(scenario, env);
    assert!(o.ok(scenario), "scenario {scenario} failed:\n{}", o.out);
    o
}

fn killed_by_sigtrap(scenario: &str) {
    let o = run(scenario, &[]);
    assert_eq!(
        o.signal,
        Some(libc::SIGTRAP),
        "scenario {scenario} should die of SIGTRAP, as without altpatch; it ended {:?}:\n{}",
        o.status,
        o.out
    );
}

// Foreign SIGTRAPs, with the program's own handler installed before ours:
// it runs exactly once, with the original siginfo, and nothing is rewound.

#[test]
fn raise_reaches_the_programs_handler() {
    ok("trap_raise_handler", &[]);
}

#[test]
fn tgkill_to_a_thread_in_join_reaches_the_programs_handler() {
    ok("trap_tgkill_handler", &[]);
}

#[test]
fn single_step_reaches_the_programs_handler() {
    ok("trap_step_handler", &[]);
}

#[test]
fn the_programs_own_int3_reaches_its_handler() {
    ok("trap_int3_handler", &[]);
}

#[test]
fn ignored_raise_stays_ignored() {
    ok("trap_raise_ignored", &[]);
}

// Without a handler of the program's: the default action, as without us.

#[test]
fn raise_without_a_handler_kills() {
    killed_by_sigtrap("trap_raise_default");
}

#[test]
fn tgkill_without_a_handler_kills() {
    killed_by_sigtrap("trap_tgkill_default");
}

#[test]
fn single_step_without_a_handler_kills() {
    killed_by_sigtrap("trap_step_default");
}

#[test]
fn own_int3_without_a_handler_kills() {
    killed_by_sigtrap("trap_int3_default");
}

#[test]
fn ignored_int3_still_kills_as_the_kernel_does() {
    killed_by_sigtrap("trap_int3_ignored");
}

#[test]
fn a_replaced_handler_is_an_error_not_a_crash() {
    ok("trap_replaced", &[]);
}

// Threads and signals.

#[test]
fn callers_with_every_signal_blocked_survive_updates() {
    ok("threads_blocked", &[]);
}

#[test]
fn signal_storm_whose_handler_calls_sites_page_swap() {
    ok("threads_storm_swap", &[]);
}

#[test]
fn signal_storm_whose_handler_calls_sites_int3() {
    ok("threads_storm_int3", &[]);
}

#[test]
fn handlers_on_an_alternate_stack_page_swap() {
    ok("threads_altstack_swap", &[]);
}

#[test]
fn handlers_on_an_alternate_stack_int3() {
    ok("threads_altstack_int3", &[]);
}

// A tracer attaching and detaching a uprobe in the pages of 1000 sites
// while four threads call through them and the sites are updated.

fn uprobes_usable() -> bool {
    match uprobe::unavailable() {
        None => true,
        Some(why) => {
            assert!(!support::required(), "uprobes are required: {why}");
            eprintln!("SKIPPED: {why}");
            false
        }
    }
}

#[test]
fn storm_with_a_uprobe_attached_and_detached_page_swap() {
    if uprobes_usable() {
        ok("probes_storm_swap", &[]);
    }
}

#[test]
fn storm_with_a_uprobe_attached_and_detached_int3() {
    if uprobes_usable() {
        ok("probes_storm_int3", &[]);
    }
}

// The process: fork, reloaded objects, debuggers, hardened kernels.

#[test]
fn fork_during_updates_page_swap() {
    ok("fork_swap", &[]);
}

#[test]
fn fork_during_updates_int3() {
    ok("fork_int3", &[]);
}

#[test]
fn reloaded_object_is_patched_again() {
    let so = process::altso();
    for poke in support::usable_strategies() {
        ok(
            "dl_reload",
            &[("ALTPATCH_POKE", poke), ("ALTSO", so.to_str().unwrap())],
        );
    }
}

#[test]
fn no_writable_view_of_code_after_any_call() {
    for poke in support::usable_strategies() {
        ok("no_writable_view", &[("ALTPATCH_POKE", poke)]);
    }
}

#[test]
fn descriptors_closed_and_reused_by_the_program_are_not_written() {
    ok("closefrom", &[]);
}

#[test]
fn long_altpatch_value_agrees_everywhere() {
    let long = format!("{}nomovbe", "+sse3, ".repeat(120));
    assert!(long.len() > 512);
    ok("long_env", &[("ALTPATCH", &long)]);
}

#[test]
fn a_refused_executable_memfd_falls_back_to_a_refusal_not_hidden_text() {
    if support::usable("file") {
        ok("fallback", &[("ALTPATCH_POKE", "memfd,file")]);
    }
}

#[test]
fn updates_land_under_gdb_with_a_breakpoint_in_the_patched_page() {
    process::under_gdb();
}

#[test]
fn memfd_noexec_2_in_a_child_pid_namespace() {
    process::in_hardened_namespace();
}
