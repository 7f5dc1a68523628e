//! The running program as one context (`altpatch::process`): its patcher
//! and the alternatives' one-liner through it.
//!
//! One test function touches the alternatives: the one-liner rewrites
//! every alternative site of this binary, which no other thread may run
//! meanwhile (its contract).

use altpatch::cpu::{Feature, Features};
use altpatch::{Image, LinuxPoke, alternative};

#[inline(never)]
fn level() -> u64 {
    let r: u64;
    // SAFETY: both sequences only set `r`.
    unsafe {
        altpatch::alternative!(
            "mov {r}, 1",
            [Popcnt => "mov {r}, 2"],
            r = out(reg) r,
        )
    };
    r
}

#[test]
fn the_alternatives_one_liner_applies_the_published_choice_through_the_patcher() {
    let want = if altpatch::cpu::published().has(Feature::Popcnt) {
        2
    } else {
        1
    };
    // Back to every default first (patching at load may have applied the
    // choice already), so that the one-liner has something to write.
    let image = Image::current();
    let mut poke = LinuxPoke::new().unwrap();
    // SAFETY: this test is the only code of the binary that runs an
    // alternative site; in place, on this thread.
    unsafe { alternative::apply(&image, &Features::none(), &mut poke) }.unwrap();
    assert_eq!(level(), 1);

    // The running program's patcher lists the site in its dry run.
    let mut patcher = altpatch::process::patcher();
    patcher.alternatives().unwrap();
    let dry = patcher.to_string();
    drop(patcher);
    assert!(dry.contains("alternatives"), "{dry}");

    // SAFETY: as above.
    let report = unsafe { altpatch::process::apply_alternatives() }.unwrap();
    assert_eq!(level(), want, "{report}");
    let alts = report.alternatives.as_ref().expect("alternatives planned");
    assert!(!alts.sites.is_empty(), "{report}");
    if want == 2 {
        assert!(report.applied.written >= 1, "{report}");
    }
    // Again: nothing left to write.
    // SAFETY: as above.
    let again = unsafe { altpatch::process::apply_alternatives() }.unwrap();
    assert_eq!(again.applied.written, 0, "{again}");
    assert_eq!(level(), want);
}
