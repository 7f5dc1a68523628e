//! One patcher: retpolines, alternatives, a static key, a static call and
//! ifuncs planned over the running test binary and applied as one
//! validated batch; any failing write leaves every byte as it was; one
//! object added twice is refused.
//!
//! One test function: the retpoline thunks are the process's own, so the
//! failing and the succeeding patches run in sequence.

mod common;

use altpatch::cpu::{Feature, Features};
use altpatch::retpoline::{self, Mode, Policy};
use altpatch::static_key::{KeyIndex, StaticFalseKey};
use altpatch::x86::Reg;
use altpatch::{
    Error, FaultInjectingPoke, FaultPoint, Image, LinuxPoke, Patcher, alternative, ifunc,
    static_branch_unlikely, static_call,
};
use common::read;

extern "C" fn one() -> u64 {
    1
}
extern "C" fn two() -> u64 {
    2
}
static_call! {
    fn pc_call() -> u64 = one;
}

extern "C" fn imp_portable() -> u64 {
    10
}
extern "C" fn imp_other() -> u64 {
    20
}
/// The other one on any CPU with SSE3 (every x86-64 CPU of this century).
fn pick(f: &Features) -> extern "C" fn() -> u64 {
    if f.has(Feature::Sse3) {
        imp_other
    } else {
        imp_portable
    }
}
ifunc! {
    fn pc_ifunc() -> u64 = pick;
}

static PC_KEY: StaticFalseKey = StaticFalseKey::new();

// Declared, never called: its record is still in the image.
fn pick_unused(_: &Features) -> extern "C" fn() -> u64 {
    imp_portable
}
ifunc! {
    fn never_called() -> u64 = pick_unused;
}

// User types named like the macros' own generic parameters.
#[allow(dead_code)]
struct G(u32);
#[allow(dead_code)]
struct P(u32);
fn g_value(g: &G, p: &P) -> u32 {
    g.0 + p.0
}
static_call! {
    fn with_g(g: &G, p: &P) -> u32 = g_value;
}

#[inline(never)]
fn keyed() -> bool {
    static_branch_unlikely!(PC_KEY)
}

#[inline(never)]
fn alt_value() -> u32 {
    let r: u32;
    // SAFETY: moves an immediate only.
    unsafe {
        alternative!(name: "pc_always", "mov {r:e}, 1", [always => "mov {r:e}, 7"],
            r = out(reg) r, options(nomem, nostack, preserves_flags))
    };
    r
}

#[inline(never)]
fn call_pc() -> u64 {
    pc_call()
}

#[inline(never)]
fn call_ifunc() -> u64 {
    pc_ifunc()
}

/// The bytes every mechanism of the test rewrites.
fn snapshot() -> Vec<Vec<u8>> {
    let r11 = retpoline::thunk(Reg::R11).expect("the crate's thunks are linked in");
    // The alternative's site is inside this function.
    let alt = read(alt_value as fn() -> u32 as usize, 32);
    vec![
        read(r11, 8),
        read(pc_call::static_call().trampoline(), 16),
        read(pc_ifunc::ifunc().stub(), 16),
        alt,
    ]
}

fn patcher<'a>(image: &'a Image<'a>, features: &Features, index: &KeyIndex) -> Patcher<'a> {
    let mut p = Patcher::new(image, features, &[]);
    p.retpolines(&Policy::new(Mode::Plain, "patcher test"))
        .unwrap();
    p.alternatives().unwrap();
    p.static_key(&PC_KEY, index).unwrap();
    p.static_call(pc_call::static_call(), two).unwrap();
    p.ifuncs().unwrap();
    p
}

#[test]
fn every_mechanism_in_one_validated_batch() {
    let image = Image::current();
    let features = Features::detect();
    let index = KeyIndex::new(&image);
    let before = snapshot();
    assert_eq!((call_pc(), alt_value(), keyed()), (1, 1, false));

    // The dry run lists the batches before anything is written.
    let dry = patcher(&image, &features, &index).to_string();
    assert!(
        dry.contains("1. retpolines") && dry.contains("2. one plan"),
        "{dry}"
    );
    assert!(
        dry.contains("pc_call"),
        "the static call's edit is listed: {dry}"
    );
    assert_eq!(snapshot(), before, "planning writes nothing");

    // A failure at every write, in turn: text is as it was each time.
    // (Patched at load already, unless start-up is off, as with
    // `--all-features`: see `ifunc::startup`.)
    let applied_at_load = pc_ifunc::ifunc().is_applied();
    let mut k = 0;
    let report = loop {
        let p = patcher(&image, &features, &index);
        let mut poke = FaultInjectingPoke::new(LinuxPoke::new().unwrap(), FaultPoint::Write(k));
        // SAFETY: no other thread runs the patched code in this test.
        match unsafe { p.apply(&mut poke) } {
            Err(e) => {
                assert!(poke.fired(), "write {k}: {e}");
                assert!(
                    matches!(e, Error::Plan(_) | Error::Retpoline(_)),
                    "write {k}: {e:?}"
                );
                assert_eq!(
                    snapshot(),
                    before,
                    "write {k} failed: text must be as it was"
                );
                assert_eq!((call_pc(), alt_value()), (1, 1));
                assert_eq!(pc_ifunc::ifunc().is_applied(), applied_at_load);
                k += 1;
                assert!(k < 64, "the batch never succeeded");
            }
            Ok(r) => {
                assert!(!poke.fired());
                break r;
            }
        }
    };
    assert!(
        k >= 3,
        "retpolines, the static call and the ifunc each wrote ({k})"
    );

    // Applied: bytes, results and state.
    let r11 = retpoline::thunk(Reg::R11).unwrap();
    assert_eq!(
        read(r11, 6),
        [0x0f, 0x1f, 0x00, 0x41, 0xff, 0xe3],
        "nop; jmp *%r11"
    );
    assert_eq!(call_pc(), 2);
    assert_eq!(pc_call::target().map(|f| f()), Some(2));
    assert_eq!(alt_value(), 7);
    assert_eq!(call_ifunc(), 20);
    assert!(pc_ifunc::ifunc().is_applied());
    assert!(!keyed(), "the key's sites stay in its (disabled) state");
    assert_eq!((report.static_calls, report.static_keys), (1, 1));
    assert!(report.retpolines.as_ref().is_some_and(|r| r.thunks == 15));
    // The ifunc's stub, if start-up did not rewrite it already.
    let stub = usize::from(!applied_at_load);
    assert!(report.applied.written >= 2 + stub, "{report}");
    assert!(report.to_string().contains("one batch"), "{report}");
    let alts = report.alternatives.as_ref().unwrap();
    let here = alt_value as fn() -> u32 as usize;
    assert!(
        alts.sites
            .iter()
            .any(|s| (here..here + 32).contains(&s.site)),
        "the test's alternative is in the report"
    );
    assert!(report.ifuncs.as_ref().is_some_and(|r| !r.ifuncs.is_empty()));

    // Applying again writes nothing new.
    let again = patcher(&image, &features, &index);
    let mut poke = LinuxPoke::new().unwrap();
    // SAFETY: as above.
    let r = unsafe { again.apply(&mut poke) }.unwrap();
    assert_eq!(r.applied.written, 0, "{r}");

    // A later patch that fails undoes only what it wrote: the retpolines
    // already in place (from the patch above) stay.
    let after = snapshot();
    let mut p = Patcher::new(&image, &features, &[]);
    p.retpolines(&Policy::new(Mode::Plain, "again")).unwrap();
    p.static_call(pc_call::static_call(), one).unwrap();
    let mut poke = FaultInjectingPoke::new(LinuxPoke::new().unwrap(), FaultPoint::Write(0));
    // SAFETY: as above.
    let e = unsafe { p.apply(&mut poke) }.unwrap_err();
    assert!(poke.fired() && matches!(e, Error::Plan(_)), "{e:?}");
    assert_eq!(
        snapshot(),
        after,
        "nothing this patch did not write was undone"
    );
    assert_eq!(call_pc(), 2);

    // A key changed on the patching thread after planning: refused.
    let mut p = Patcher::new(&image, &features, &[]);
    p.static_key(&PC_KEY, &index).unwrap();
    PC_KEY.enable().unwrap();
    assert!(keyed());
    // SAFETY: as above.
    let e = unsafe { p.apply(&mut LinuxPoke::new().unwrap()) }.unwrap_err();
    assert!(matches!(e, Error::ChangedSincePlanned(_)), "{e:?}");
    assert!(keyed(), "the refused patch wrote nothing");
    PC_KEY.disable().unwrap();
    assert!(!keyed());
}

#[test]
fn unused_ifuncs_keep_their_record_and_user_type_names_do_not_clash() {
    let names: Vec<&str> = Image::current()
        .ifuncs()
        .iter()
        .map(|r| altpatch::ifunc::Ifunc::of_record(r).name())
        .collect();
    assert!(names.contains(&"never_called"), "{names:?}");
    assert_eq!(with_g(&G(1), &P(2)), 3);
}

#[test]
fn one_object_added_twice_is_refused() {
    let image = Image::current();
    let features = Features::detect();
    let mut p = Patcher::new(&image, &features, &[]);
    p.static_call(pc_call::static_call(), one).unwrap();
    let e = p
        .static_call(pc_call::static_call(), two)
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(e, Error::AddedTwice(_)), "{e:?}");
    assert!(e.to_string().contains("twice"), "{e}");
    let e = p
        .alternatives()
        .and_then(|p| p.alternatives())
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(e, Error::AddedTwice("alternatives")), "{e:?}");
    // Dropped unapplied: nothing is written, and the locks are released.
    drop(p);
}
