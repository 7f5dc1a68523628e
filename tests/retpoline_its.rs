//! Indirect Target Selection, live: the retpoline fixture replays a
//! recorded Cascade Lake (tests/fixtures/cpuid/qemu-tcg-cascadelake.txt,
//! an affected CPU) and applies `plain` to its ~1 400 sites while a second
//! thread calls through them. Every site whose `call/jmp *%reg` would end
//! in the lower half of a cache line must branch to the ITS thunk for its
//! register (whose own jump ends in an upper half); every other thunk site
//! is inlined as on any CPU; the results do not change. Then back to
//! `generic` and to `plain` again, from the ITS forms.

mod common;
#[path = "common/retpoline_fixture.rs"]
mod fixture;

use fixture::*;

const DUMP: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/cpuid/qemu-tcg-cascadelake.txt"
);

/// Where a `call/jmp *%reg` in `bytes` (at `addr`) ends: after its `ff`.
fn branch_last_byte(addr: usize, bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b == 0xff).map(|k| addr + k + 1)
}

/// Checks one `plain` step on the affected CPU; returns (inlined, routed)
/// thunk sites.
fn check_its_step(step: &StepOut) -> (usize, usize) {
    assert!(step.error.is_none(), "{}: {:?}", step.name, step.error);
    assert_eq!(step.results, RESULTS, "{}", step.name);
    assert!(
        step.report.contains("Indirect Target Selection"),
        "{}",
        step.report
    );
    assert_eq!(step.its_thunks.len(), 15, "every register but rsp");
    for (&r, &entry) in &step.its_thunks {
        let len = if r < 8 { 2 } else { 3 };
        assert_ne!(
            (entry + len - 1) & 0x20,
            0,
            "ITS thunk r{r} in a lower half"
        );
    }
    let (mut inlined, mut routed) = (0, 0);
    for s in step.sites.iter().filter(|s| s.kind == "thunk") {
        let r = s.reg.unwrap();
        if s.outcome.starts_with("inlined") {
            let last = branch_last_byte(s.addr, &s.bytes).expect("an inline branch");
            assert_ne!(last & 0x20, 0, "{s:x?}: inlined into a lower half");
            inlined += 1;
        } else {
            assert!(s.outcome.starts_with("via-thunk"), "{s:x?}");
            assert_eq!(s.bytes, rel32_form(s, step.its_thunks[&r]), "{s:x?}");
            routed += 1;
        }
    }
    (inlined, routed)
}

#[test]
fn plain_on_an_its_affected_cpu_routes_every_lower_half_branch_live() {
    let r = run_with(
        &["plain", "generic@inplace", "plain"],
        &[("ALTPATCH_TEST_CPU_DUMP", DUMP)],
    );
    assert_eq!(r.before, RESULTS);
    assert_eq!(r.steps.len(), 3);
    let (inlined, routed) = check_its_step(&r.steps[0]);
    // Addresses spread over every offset: both kinds, in numbers.
    assert!(
        inlined > 100 && routed > 100,
        "{inlined} inlined, {routed} routed"
    );

    // Back to the retpoline from the ITS forms (in place), then plain again.
    let generic = &r.steps[1];
    assert!(generic.error.is_none(), "{:?}", generic.error);
    for s in generic.sites.iter().filter(|s| s.kind == "thunk") {
        let thunk = generic.thunks[&s.reg.unwrap()].0;
        assert_eq!(s.bytes, rel32_form(s, thunk), "{s:x?}");
    }
    assert_eq!(check_its_step(&r.steps[2]), (inlined, routed));
    assert_eq!(r.wrong, 0, "a concurrent caller saw a wrong result");
}
