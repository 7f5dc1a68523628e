//! Static keys: the branch forms, site bytes in each state, enable /
//! disable / toggle / inc / dec, every site of a key in one batch, and
//! refusal of unexpected bytes. Each test has its own keys.

mod common;

use altpatch::static_key::{self, KeyIndex, StaticFalseKey, StaticTrueKey};
use altpatch::x86;
use altpatch::{Edit, Expect, Image, LinuxPoke, Plan, PlanError};
use altpatch::{static_branch_likely, static_branch_unlikely};
use common::read;

static K_UNLIKELY: StaticFalseKey = StaticFalseKey::new();
static K_LIKELY: StaticTrueKey = StaticTrueKey::new();
static K_TRUE_UNLIKELY: StaticTrueKey = StaticTrueKey::new();
static K_COUNTED: StaticFalseKey = StaticFalseKey::new();
static K_MANY: StaticFalseKey = StaticFalseKey::new();
static K_BAD: StaticFalseKey = StaticFalseKey::new();
static K_WITH: StaticFalseKey = StaticFalseKey::new();
static K_MIXED: StaticFalseKey = StaticFalseKey::new();
static K_LATE: StaticFalseKey = StaticFalseKey::new();

#[inline(never)]
fn unlikely() -> bool {
    static_branch_unlikely!(K_UNLIKELY)
}

#[inline(never)]
fn likely() -> bool {
    static_branch_likely!(K_LIKELY)
}

#[inline(never)]
fn true_unlikely() -> bool {
    static_branch_unlikely!(K_TRUE_UNLIKELY)
}

#[inline(never)]
fn counted() -> bool {
    static_branch_unlikely!(K_COUNTED)
}

#[inline(never)]
fn many() -> (bool, bool, bool) {
    (
        static_branch_unlikely!(K_MANY),
        static_branch_likely!(K_MANY),
        static_branch_unlikely!(K_MANY),
    )
}

#[inline(never)]
fn bad() -> bool {
    static_branch_unlikely!(K_BAD)
}

#[inline(never)]
fn with() -> bool {
    static_branch_unlikely!(K_WITH)
}

#[inline(never)]
fn mixed() -> bool {
    static_branch_unlikely!(K_MIXED)
}

#[inline(never)]
fn late() -> bool {
    static_branch_unlikely!(K_LATE)
}

/// (site, target, likely) of every site of `key`.
fn sites(key: usize) -> Vec<(usize, usize, bool)> {
    let image = Image::current();
    let index = KeyIndex::new(&image);
    index
        .records_of(&image, key)
        .map(|r| (r.site(), r.target(), r.likely()))
        .collect()
}

/// Each site is a jmp to its target exactly when the key's state differs
/// from what falling through means.
fn assert_sites(key: usize, enabled: bool) {
    let s = sites(key);
    assert!(!s.is_empty());
    for (site, target, likely) in s {
        let b = read(site, 5);
        if enabled != likely {
            assert_eq!(b, *x86::jmp_rel32(site, target).unwrap(), "site {site:#x}");
        } else {
            assert_eq!(b, x86::NOP5, "site {site:#x}");
        }
    }
}

#[test]
fn unlikely_false_key() {
    let f = std::hint::black_box(unlikely as fn() -> bool);
    assert!(!f() && !K_UNLIKELY.is_enabled());
    assert_sites(K_UNLIKELY.addr(), false);
    let r = K_UNLIKELY.enable().unwrap();
    assert_eq!(r.written, 1);
    assert!(f() && K_UNLIKELY.is_enabled());
    assert_sites(K_UNLIKELY.addr(), true);
    // Enabling again changes nothing.
    assert_eq!(K_UNLIKELY.enable().unwrap().written, 0);
    K_UNLIKELY.disable().unwrap();
    assert!(!f());
    assert_sites(K_UNLIKELY.addr(), false);
}

#[test]
fn likely_true_key() {
    let f = std::hint::black_box(likely as fn() -> bool);
    assert!(f());
    assert_sites(K_LIKELY.addr(), true);
    K_LIKELY.disable().unwrap();
    assert!(!f());
    assert_sites(K_LIKELY.addr(), false);
    K_LIKELY.toggle().unwrap();
    assert!(f() && K_LIKELY.is_enabled());
}

#[test]
fn unlikely_branch_on_a_true_key_starts_as_a_jump() {
    let f = std::hint::black_box(true_unlikely as fn() -> bool);
    assert!(f());
    assert_sites(K_TRUE_UNLIKELY.addr(), true);
    K_TRUE_UNLIKELY.disable().unwrap();
    assert!(!f());
    assert_sites(K_TRUE_UNLIKELY.addr(), false);
}

#[test]
fn reference_counted_inc_and_dec() {
    let f = std::hint::black_box(counted as fn() -> bool);
    K_COUNTED.inc().unwrap();
    K_COUNTED.inc().unwrap();
    assert!(f() && K_COUNTED.count() == 2);
    K_COUNTED.dec().unwrap();
    assert!(f(), "still one user");
    K_COUNTED.dec().unwrap();
    assert!(!f() && K_COUNTED.count() == 0);
    assert!(matches!(K_COUNTED.dec(), Err(static_key::Error::NotHeld)));
}

#[test]
fn every_site_of_a_key_flips_in_one_batch() {
    let f = std::hint::black_box(many as fn() -> (bool, bool, bool));
    assert_eq!(K_MANY.site_count(), 3);
    assert_eq!(f(), (false, false, false));
    let r = K_MANY.enable().unwrap();
    assert_eq!((r.written, r.edits), (3, 3));
    assert_eq!(f(), (true, true, true));
    assert_sites(K_MANY.addr(), true);
    K_MANY.disable().unwrap();
    assert_eq!(f(), (false, false, false));
}

#[test]
fn unexpected_bytes_at_a_site_are_refused() {
    let f = std::hint::black_box(bad as fn() -> bool);
    let (site, _, _) = sites(K_BAD.addr())[0];
    let image = Image::current();
    // Someone else replaced the NOP by another 5-byte NOP form.
    let mut other = Plan::for_image(&image);
    other.push(Edit::new(site, Expect::Nop, [0x66, 0x0f, 0x1f, 0x40, 0x00]));
    let mut poke = LinuxPoke::new().unwrap();
    // SAFETY: a NOP replaced by a NOP.
    unsafe { other.apply(&mut poke) }.unwrap();
    // Still a NOP: the key can flip (expectations are decoded).
    K_BAD.enable().unwrap();
    assert!(f());
    K_BAD.disable().unwrap();
    // Now put something that is not a NOP there.
    let mut other = Plan::for_image(&image);
    other.push(Edit::new(site, Expect::Nop, [0xb8, 0, 0, 0, 0]));
    // SAFETY: `bad` is not called while the site is broken.
    unsafe { other.apply(&mut poke) }.unwrap();
    let e = K_BAD.enable().unwrap_err();
    assert!(
        matches!(&e, static_key::Error::Plan(PlanError::Unexpected { addr, .. }) if *addr == site),
        "{e}"
    );
    assert!(!K_BAD.is_enabled());
    assert_eq!(read(site, 5), [0xb8, 0, 0, 0, 0], "nothing written");
    // SAFETY: as above.
    unsafe { other.undo(&mut poke) }.unwrap();
    assert!(!f());
}

#[test]
fn set_with_any_poke_and_image() {
    let f = std::hint::black_box(with as fn() -> bool);
    let image = Image::current();
    let index = KeyIndex::new(&image);
    let mut poke = LinuxPoke::new().unwrap();
    // SAFETY: no other thread runs `with` now.
    unsafe { K_WITH.set_with(true, &image, &index, &mut poke) }.unwrap();
    assert!(f());
    // SAFETY: as above.
    unsafe { K_WITH.set_with(false, &image, &index, &mut poke) }.unwrap();
    assert!(!f());
}

#[test]
fn enable_disable_inc_and_dec_share_one_count() {
    let f = std::hint::black_box(mixed as fn() -> bool);
    // enable counts as one: a dec undoes it.
    K_MIXED.enable().unwrap();
    assert_eq!((f(), K_MIXED.count()), (true, 1));
    K_MIXED.dec().unwrap();
    assert_eq!((f(), K_MIXED.count()), (false, 0));
    assert_sites(K_MIXED.addr(), false);
    // inc; disable; inc; dec ends disabled with nothing held.
    K_MIXED.inc().unwrap();
    K_MIXED.disable().unwrap();
    K_MIXED.inc().unwrap();
    K_MIXED.dec().unwrap();
    assert_eq!(
        (f(), K_MIXED.count(), K_MIXED.is_enabled()),
        (false, 0, false)
    );
    // Enabling an enabled key keeps its count; disabling one two incs hold
    // is refused, nothing written.
    K_MIXED.inc().unwrap();
    K_MIXED.enable().unwrap();
    K_MIXED.inc().unwrap();
    assert_eq!(K_MIXED.count(), 2);
    assert!(matches!(
        K_MIXED.disable(),
        Err(static_key::Error::Held { count: 2 })
    ));
    assert!(f() && K_MIXED.is_enabled());
    assert_sites(K_MIXED.addr(), true);
    K_MIXED.dec().unwrap();
    K_MIXED.dec().unwrap();
    assert_eq!((f(), K_MIXED.count()), (false, 0));
}

#[test]
fn an_image_whose_sites_lag_the_key_is_brought_up_to_date() {
    // A module loaded after the key was enabled has its sites as compiled:
    // here one site of this image is put back to its compiled NOP, and
    // `set_with` / `sync_with` for the enabled key rewrite it.
    let f = std::hint::black_box(late as fn() -> bool);
    let image = Image::current();
    let index = KeyIndex::new(&image);
    let mut poke = LinuxPoke::new().unwrap();
    K_LATE.enable().unwrap();
    assert!(f());
    let (site, target, _) = sites(K_LATE.addr())[0];
    let back = || {
        let mut p = Plan::for_image(&image);
        p.push(Edit::new(site, Expect::Jmp(target), x86::NOP5));
        // SAFETY: `late` is not running; a jmp replaced by a NOP.
        unsafe { p.apply(&mut LinuxPoke::new().unwrap()) }.unwrap();
    };
    back();
    assert!(!f(), "the site lags the key");
    // SAFETY: no other thread runs `late` now.
    let r = unsafe { K_LATE.set_with(true, &image, &index, &mut poke) }.unwrap();
    assert_eq!(r.written, 1);
    assert!(f());
    back();
    // SAFETY: as above.
    let r = unsafe { K_LATE.sync_with(&image, &index, &mut poke) }.unwrap();
    assert_eq!(r.written, 1);
    assert!(f() && K_LATE.count() == 1);
    // In step: nothing to write.
    // SAFETY: as above.
    let r = unsafe { K_LATE.sync_with(&image, &index, &mut poke) }.unwrap();
    assert_eq!((r.written, r.already), (0, 1));
    K_LATE.disable().unwrap();
    assert!(!f());
}
