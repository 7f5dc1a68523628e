//! Alternatives in the test binary and in a shared object loaded at run
//! time: choice by feature, relocation of replacement code, padding, undo,
//! corrupt records.
//!
//! Each test applies alternatives only to an image holding its own
//! function's sites (tables are values), so tests running in parallel never
//! patch code another test is running.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use altpatch::alternative::{Condition, Error as AltError};
use altpatch::cpu::{Feature, Features};
use altpatch::{Image, LinuxPoke, PlanError, alternative, alternative_call};
use common::read;

/// An image with this binary's text and only the alternative records whose
/// site is the named one (records of one `asm!` are contiguous in the table).
fn image_for(name: &str) -> (Image<'static>, usize) {
    let all = Image::current();
    let site = all
        .patch_point(name)
        .unwrap_or_else(|| panic!("site {name} not named"));
    let recs = all.alternatives();
    let idx: Vec<usize> = (0..recs.len())
        .filter(|&i| recs[i].site() == site)
        .collect();
    assert!(!idx.is_empty(), "no records for {name}");
    let (lo, hi) = (idx[0], *idx.last().unwrap());
    assert_eq!(hi - lo + 1, idx.len());
    let mut b = Image::builder(name.to_string());
    for r in all.text() {
        // SAFETY: the current binary's text stays mapped.
        b = unsafe { b.text(r.clone()) };
    }
    // SAFETY: a sub-slice of the current binary's own table, in place.
    let image = unsafe {
        b.alternatives(&recs[lo..=hi])
            .patch_points(all.patch_points())
    }
    .build();
    (image, site)
}

fn apply(image: &Image<'_>, features: &Features) -> alternative::Report {
    let mut poke = LinuxPoke::new().unwrap();
    // SAFETY: the image holds only the calling test's own sites, which no
    // other thread runs.
    unsafe { alternative::apply(image, features, &mut poke) }.unwrap()
}

fn undo(image: &Image<'_>, features: &Features) {
    let (mut plan, _) = alternative::plan(image, features).unwrap();
    let mut poke = LinuxPoke::new().unwrap();
    plan.validate(&poke).unwrap();
    // SAFETY: as in `apply`.
    unsafe { plan.undo(&mut poke) }.unwrap();
}

#[inline(never)]
fn load_be(p: &u32) -> u32 {
    let v: u32;
    // SAFETY: reads the u32 behind a valid reference.
    unsafe {
        alternative!(
            name: "t_load_be",
            "mov {v:e}, [{p}]\nbswap {v:e}",
            [Movbe => "movbe {v:e}, [{p}]"],
            p = in(reg) p, v = out(reg) v,
            options(nostack, readonly, preserves_flags)
        )
    };
    v
}

#[test]
fn movbe_or_mov_bswap_same_value_expected_bytes() {
    let host = Features::detect();
    let (image, site) = image_for("t_load_be");
    let f = std::hint::black_box(load_be as fn(&u32) -> u32);
    let x = 0x1122_3344u32;
    let original = read(site, 5);
    let default_len = image.alternatives()[0].default_len();
    assert_eq!(image.alternatives()[0].site_len(), default_len.max(4));

    // Without movbe: the default, its padding merged.
    let report = apply(&image, &Features::none());
    assert_eq!(report.sites[0].chosen, None);
    assert_eq!(f(&x), 0x4433_2211);
    assert_eq!(read(site, default_len), original[..default_len]);
    // mov + bswap: 8b /r then 0f c8+r.
    assert_eq!(read(site + default_len - 2, 1), [0x0f]);

    if !host.has(Feature::Movbe) {
        eprintln!("host lacks movbe: the replacement is not executed here");
        return;
    }
    // With movbe: movbe r32, m32 is 0f 38 f0 /r.
    let report = apply(&image, &Features::none().with(Feature::Movbe));
    assert_eq!(report.sites[0].chosen, Some(0));
    assert_eq!(
        report.applied.written, 1,
        "moved from one alternative to the other"
    );
    assert_eq!(read(site, 3), [0x0f, 0x38, 0xf0]);
    assert_eq!(f(&x), 0x4433_2211);
    // Idempotent.
    assert_eq!(
        apply(&image, &Features::none().with(Feature::Movbe))
            .applied
            .written,
        0
    );
    // Undo restores the original bytes (default plus one-byte NOPs).
    undo(&image, &Features::none().with(Feature::Movbe));
    assert_eq!(read(site, 5), original);
    assert_eq!(f(&x), 0x4433_2211);
}

static TARGET: [u64; 4] = [1, 2, 3, 4];

extern "C" fn callee() -> u64 {
    0x5eed
}

#[inline(never)]
fn call_and_lea() -> (u64, usize) {
    let r: u64;
    let a: usize;
    // SAFETY: the replacement calls a safe extern "C" function (caller-saved
    // registers declared clobbered, stack aligned: no `nostack`) and takes
    // an address; the default only moves immediates.
    unsafe {
        alternative!(
            name: "t_call_lea",
            "mov eax, 1\nxor edx, edx",
            [always => "nop\ncall {f}\nlea rdx, [rip + {d}]"],
            f = sym callee, d = sym TARGET, out("rdx") a, out("rax") r,
            clobber_abi("C")
        )
    };
    (r, a)
}

#[test]
fn call_and_rip_relative_lea_are_rebased() {
    let (image, _) = image_for("t_call_lea");
    let f = std::hint::black_box(call_and_lea as fn() -> (u64, usize));
    assert_eq!(f(), (1, 0));
    let report = apply(&image, &Features::none());
    assert_eq!(report.sites[0].conditions, [Condition::ALWAYS]);
    assert_eq!(report.sites[0].chosen, Some(0));
    assert_eq!(f(), (0x5eed, TARGET.as_ptr() as usize));
    undo(&image, &Features::none());
    assert_eq!(f(), (1, 0));
}

#[inline(never)]
fn negated() -> u32 {
    let r: u32;
    // SAFETY: moves immediates only.
    unsafe {
        alternative!(name: "t_negated", "mov {r:e}, 1", [!Movbe => "mov {r:e}, 5"],
            r = out(reg) r, options(nomem, nostack, preserves_flags))
    };
    r
}

#[test]
fn negated_condition() {
    let (image, _) = image_for("t_negated");
    let f = std::hint::black_box(negated as fn() -> u32);
    apply(&image, &Features::none());
    assert_eq!(f(), 5);
    apply(&image, &Features::none().with(Feature::Movbe));
    assert_eq!(f(), 1);
}

#[inline(never)]
fn two_alternatives() -> u32 {
    let r: u32;
    // SAFETY: moves immediates only.
    unsafe {
        alternative!(name: "t_two", "mov {r:e}, 1",
            [Sse4_2 => "mov {r:e}, 2", Avx2 => "mov {r:e}, 3", never => "mov {r:e}, 4"],
            r = out(reg) r, options(nomem, nostack, preserves_flags))
    };
    r
}

#[test]
fn last_alternative_that_holds_wins() {
    let (image, _) = image_for("t_two");
    let f = std::hint::black_box(two_alternatives as fn() -> u32);
    let both = Features::none().with(Feature::Sse4_2).with(Feature::Avx2);
    let r = apply(&image, &both);
    assert_eq!(r.sites[0].chosen, Some(1));
    assert_eq!(f(), 3);
    apply(&image, &Features::none().with(Feature::Sse4_2));
    assert_eq!(f(), 2);
    apply(&image, &Features::none().with(Feature::Avx2));
    assert_eq!(f(), 3);
    apply(&image, &Features::none());
    assert_eq!(f(), 1);
    let text = r.to_string();
    assert!(
        text.contains("t_two") && text.contains("[sse4_2, avx2, never] -> `avx2`"),
        "{text}"
    );
}

#[inline(never)]
fn longer_replacement() -> u32 {
    let r: u32;
    // SAFETY: arithmetic on `r` only; flags declared clobbered (no
    // preserves_flags).
    unsafe {
        alternative!(name: "t_longer", "mov {r:e}, 1",
            [always => "mov {r:e}, 2\nadd {r:e}, 0x1000\nsub {r:e}, 0x1000\nadd {r:e}, 0x2000\nsub {r:e}, 0x2000"],
            r = out(reg) r, options(nomem, nostack))
    };
    r
}

#[test]
fn replacement_longer_than_default_pads_the_site() {
    let (image, site) = image_for("t_longer");
    let rec = &image.alternatives()[0];
    let (dlen, slen) = (rec.default_len(), rec.site_len());
    assert!(slen > dlen + 11, "site {slen} bytes, default {dlen}");
    // Before patching, the default is followed by one-byte NOPs.
    assert!(read(site + dlen, slen - dlen).iter().all(|&b| b == 0x90));
    let f = std::hint::black_box(longer_replacement as fn() -> u32);
    assert_eq!(f(), 1);
    apply(&image, &Features::none());
    assert_eq!(f(), 2);
    assert_eq!(
        rec.replacement_len(),
        slen,
        "the replacement fills the site"
    );
    undo(&image, &Features::none());
    assert_eq!(f(), 1);
    assert!(read(site + dlen, slen - dlen).iter().all(|&b| b == 0x90));
}

#[inline(never)]
fn default_only_padding() -> u32 {
    let r: u32;
    // SAFETY: moves immediates only.
    unsafe {
        alternative!(name: "t_merge", "mov {r:e}, 1",
            [never => "mov {r:e}, 2\nadd {r:e}, 0x1000\nsub {r:e}, 0x1000\nadd {r:e}, 0x2000\nsub {r:e}, 0x2000"],
            r = out(reg) r, options(nomem, nostack))
    };
    r
}

#[test]
fn kept_default_gets_its_padding_merged() {
    let (image, site) = image_for("t_merge");
    let rec = &image.alternatives()[0];
    let (dlen, slen) = (rec.default_len(), rec.site_len());
    let pad = slen - dlen;
    assert!(pad > 11);
    apply(&image, &Features::none());
    let bytes = read(site + dlen, pad);
    assert_eq!(bytes[0], 0xeb, "a short jump over the filler: {bytes:02x?}");
    assert_eq!(bytes[1] as usize, pad - 2);
    assert!(bytes[2..].iter().all(|&b| b == 0xcc));
    assert_eq!(
        std::hint::black_box(default_only_padding as fn() -> u32)(),
        1
    );
}

#[inline(never)]
fn insertion(x: u64) -> u64 {
    let mut v = x;
    // SAFETY: adds to `v` only; flags declared clobbered.
    unsafe {
        alternative!(name: "t_insert", "", [Bmi2 => "add {v}, 7"], v = inout(reg) v,
            options(nomem, nostack))
    };
    v
}

#[test]
fn empty_default_is_a_pure_insertion() {
    let (image, site) = image_for("t_insert");
    let rec = &image.alternatives()[0];
    assert_eq!(rec.default_len(), 0);
    assert!(rec.site_len() >= 4);
    let f = std::hint::black_box(insertion as fn(u64) -> u64);
    assert_eq!(f(10), 10);
    apply(&image, &Features::none().with(Feature::Bmi2));
    assert_eq!(f(10), 17);
    apply(&image, &Features::none());
    assert_eq!(f(10), 10);
    // With the default kept, the site is one NOP.
    assert!(altpatch::x86::is_single_nop(&read(site, rec.site_len())));
}

extern "C" fn add_portable(a: u64, b: u64) -> u64 {
    a + b
}

extern "C" fn add_fast(a: u64, b: u64) -> u64 {
    a + b + 1_000_000
}

extern "C" fn add_negated(a: u64, b: u64) -> u64 {
    a + b + 2_000_000
}

#[inline(never)]
fn call_site(a: u64, b: u64) -> u64 {
    alternative_call!(fn(u64, u64) -> u64; add_portable, [Avx2 => add_fast, !Sse3 => add_negated]; a, b)
}

#[test]
fn alternative_call_becomes_a_direct_call() {
    // The site is the `call` itself: find it through the records whose
    // replacement is a call to `add_fast`.
    let all = Image::current();
    let recs = all.alternatives();
    let idx: Vec<usize> = (0..recs.len())
        .filter(|&i| {
            let r = &recs[i];
            let code = read(r.replacement(), r.replacement_len());
            altpatch::x86::rel_branch(&code, r.replacement() as u64)
                .is_some_and(|b| b.target as usize == add_fast as *const () as usize)
        })
        .collect();
    assert_eq!(idx.len(), 1);
    let site = recs[idx[0]].site();
    let group: Vec<usize> = (0..recs.len())
        .filter(|&i| recs[i].site() == site)
        .collect();
    let mut b = Image::builder("call_site");
    for r in all.text() {
        // SAFETY: the current binary's text stays mapped.
        b = unsafe { b.text(r.clone()) };
    }
    // SAFETY: a sub-slice of the current binary's own table.
    let image = unsafe { b.alternatives(&recs[group[0]..=*group.last().unwrap()]) }.build();

    let f = std::hint::black_box(call_site as fn(u64, u64) -> u64);
    assert_eq!(f(2, 3), 5);
    let sse3 = Features::none().with(Feature::Sse3);
    apply(&image, &sse3.with(Feature::Avx2));
    assert_eq!(f(2, 3), 1_000_005);
    let target = |t: usize| {
        let b = altpatch::x86::rel_branch(&read(site, 5), site as u64).unwrap();
        assert_eq!(b.kind, altpatch::x86::BranchKind::Call);
        assert_eq!(b.target as usize, t);
    };
    target(add_fast as *const () as usize);
    apply(&image, &Features::none());
    assert_eq!(f(2, 3), 2_000_005);
    target(add_negated as *const () as usize);
    apply(&image, &sse3);
    assert_eq!(f(2, 3), 5);
    target(add_portable as *const () as usize);
}

/// Builds the shared-object fixture once.
fn altso() -> &'static Path {
    static SO: OnceLock<PathBuf> = OnceLock::new();
    SO.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let target = root.join("target/fixtures");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = std::process::Command::new(cargo)
            .args(["build", "--release", "--quiet"])
            .current_dir(root.join("tests/fixtures/altso"))
            .env("CARGO_TARGET_DIR", &target)
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .output()
            .expect("run cargo");
        assert!(
            out.status.success(),
            "building tests/fixtures/altso failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        target.join("release/libaltso.so")
    })
}

#[test]
fn shared_object_alternatives_apply_to_its_own_image() {
    let so = altso();
    let main_image = Image::current();
    let main_sites: Vec<(usize, Vec<u8>)> = main_image
        .alternatives()
        .iter()
        .map(|r| (r.site(), read(r.site(), r.site_len())))
        .collect();

    let path = std::ffi::CString::new(so.to_str().unwrap()).unwrap();
    // SAFETY: loading our own fixture library, which has no constructors.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!handle.is_null(), "dlopen {so:?} failed");
    // SAFETY: the symbols exist in the fixture with these C signatures.
    let (level, load_be): (
        extern "C" fn() -> u32,
        unsafe extern "C" fn(*const u32) -> u32,
    ) = unsafe {
        let l = libc::dlsym(handle, c"altso_level".as_ptr());
        let b = libc::dlsym(handle, c"altso_load_be".as_ptr());
        assert!(!l.is_null() && !b.is_null());
        (
            std::mem::transmute::<*mut libc::c_void, extern "C" fn() -> u32>(l),
            std::mem::transmute::<*mut libc::c_void, unsafe extern "C" fn(*const u32) -> u32>(b),
        )
    };
    assert_eq!(level(), 1);

    // SAFETY: the library stays loaded for the rest of the process.
    let image = unsafe { Image::from_loaded(level as *const () as usize) }.unwrap();
    assert!(image.name().ends_with("libaltso.so"), "{}", image.name());
    assert_eq!(image.alternatives().len(), 3);
    let lvl_site = image.patch_point("altso_level").unwrap();
    assert!(image.alternatives().iter().any(|r| r.site() == lvl_site));

    let mut poke = LinuxPoke::new().unwrap();
    let features = Features::none().with(Feature::Sse4_2);
    // SAFETY: no thread runs the library's sites now.
    let report = unsafe { alternative::apply(&image, &features, &mut poke) }.unwrap();
    assert_eq!(report.sites.len(), 2);
    assert!(report.to_string().contains("altso_level"), "{report}");
    assert_eq!(level(), 2);
    let x = 0xaabb_ccddu32;
    // SAFETY: `x` is a readable u32.
    assert_eq!(unsafe { load_be(&x) }, 0xddcc_bbaa);

    let host = Features::detect();
    // SAFETY: as above.
    unsafe { alternative::apply(&image, &host, &mut poke) }.unwrap();
    let expect = if host.has(Feature::Avx2) {
        3
    } else if host.has(Feature::Sse4_2) {
        2
    } else {
        1
    };
    assert_eq!(level(), expect);
    // SAFETY: as above.
    assert_eq!(unsafe { load_be(&x) }, 0xddcc_bbaa);

    // The main binary's sites were not touched.
    for (site, bytes) in &main_sites {
        let rec = main_image
            .alternatives()
            .iter()
            .find(|r| r.site() == *site)
            .unwrap();
        assert_eq!(
            &read(*site, rec.site_len()),
            bytes,
            "main binary site {site:#x} changed"
        );
    }
}

/// Room for one record in this binary's data, within the ±2 GiB that
/// self-relative offsets reach (a heap buffer may be farther from text).
struct RecordSlot(std::cell::UnsafeCell<[u32; 5]>);
// SAFETY: only the corrupt-record test touches it, sequentially.
unsafe impl Sync for RecordSlot {}
static SLOT: RecordSlot = RecordSlot(std::cell::UnsafeCell::new([0; 5]));

/// A copy of a valid record, rewritten in `SLOT` so its offsets still point
/// where the original's do, then damaged by `damage`.
fn corrupt(name: &str, damage: impl Fn(&mut [u8; 20], usize)) -> Result<(), AltError> {
    let (image, site) = image_for(name);
    let rec = &image.alternatives()[0];
    let src = rec as *const altpatch::records::AlternativeRecord as usize;
    // SAFETY: a record is 20 readable bytes.
    let raw: [u8; 20] = unsafe { *(src as *const [u8; 20]) };
    let dst = SLOT.0.get() as usize;
    let mut bytes = raw;
    for field in [0usize, 4, 8] {
        let old = i32::from_le_bytes(raw[field..field + 4].try_into().unwrap());
        let target = (src + field) as i64 + old as i64;
        let new = (target - (dst + field) as i64) as i32;
        bytes[field..field + 4].copy_from_slice(&new.to_le_bytes());
    }
    damage(&mut bytes, dst);
    // SAFETY: writing 20 bytes into the 20-byte, 4-aligned slot, which
    // nothing else references now.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst as *mut u8, 20) };
    // SAFETY: the slot holds one record, laid out as the section would.
    let recs = unsafe {
        std::slice::from_raw_parts(dst as *const altpatch::records::AlternativeRecord, 1)
    };
    let mut b = Image::builder("corrupt");
    for r in Image::current().text() {
        // SAFETY: the current binary's text stays mapped.
        b = unsafe { b.text(r.clone()) };
    }
    // SAFETY: the slot is static.
    let image = unsafe { b.alternatives(recs) }.build();
    let before = read(site, rec.site_len());
    let mut poke = LinuxPoke::new().unwrap();
    // SAFETY: only the named test site could be written, and the record is
    // refused before that.
    let r = unsafe { alternative::apply(&image, &Features::none(), &mut poke) };
    if r.is_err() {
        assert_eq!(
            read(site, rec.site_len()),
            before,
            "a refused record changed text"
        );
    }
    r.map(|_| ())
}

#[inline(never)]
fn victim() -> u32 {
    let r: u32;
    // SAFETY: moves an immediate only.
    unsafe {
        alternative!(name: "t_victim", "mov {r:e}, 1", [always => "mov {r:e}, 2"],
            r = out(reg) r, options(nomem, nostack, preserves_flags))
    };
    r
}

#[test]
fn corrupt_records_are_refused_and_nothing_is_written() {
    assert_eq!(std::hint::black_box(victim as fn() -> u32)(), 1);
    // The undamaged copy works: the copying itself is sound.
    let ok = corrupt("t_victim", |_, _| {});
    assert!(ok.is_ok(), "{ok:?}");
    let (image, _) = image_for("t_victim");
    undo(&image, &Features::none());
    assert_eq!(victim(), 1);

    // Site offset pointing outside any text (at the record itself, in data).
    let e = corrupt("t_victim", |b, _| {
        b[0..4].copy_from_slice(&0i32.to_le_bytes())
    })
    .unwrap_err();
    assert!(
        matches!(&e, AltError::BadRecord { why, .. } if why.contains("outside")),
        "{e}"
    );

    // Replacement longer than the site.
    let e = corrupt("t_victim", |b, _| b[16] = b[14] + 3).unwrap_err();
    assert!(
        matches!(&e, AltError::BadRecord { why, .. } if why.contains("longer than")),
        "{e}"
    );

    // Unknown feature number.
    let e = corrupt("t_victim", |b, _| {
        b[12..14].copy_from_slice(&0x00eeu16.to_le_bytes())
    })
    .unwrap_err();
    assert!(
        matches!(&e, AltError::BadRecord { why, .. } if why.contains("unknown condition")),
        "{e}"
    );
    assert!(e.to_string().contains("nothing written"), "{e}");

    // A site whose bytes are none of its own states (someone else patched
    // it): refused, naming the site, nothing written.
    let (image, site) = image_for("t_victim");
    let len = image.alternatives()[0].site_len();
    let before = read(site, len);
    let mut foreign = before.clone();
    foreign[1] = 9; // mov r32, 9
    let mut other = altpatch::Plan::for_image(&image);
    other.push(altpatch::Edit::replace(site, &before, &foreign).site("foreign"));
    let mut poke = LinuxPoke::new().unwrap();
    // SAFETY: one mov by another in this test's own function.
    unsafe { other.apply(&mut poke) }.unwrap();
    assert_eq!(victim(), 9);
    // SAFETY: refused before writing.
    let e = unsafe { alternative::apply(&image, &Features::none(), &mut poke) }.unwrap_err();
    assert!(
        matches!(&e, AltError::Plan(PlanError::Unexpected { site: s, .. }) if s.contains("t_victim")),
        "{e}"
    );
    assert_eq!(read(site, len), foreign);
    // SAFETY: as above.
    unsafe { other.undo(&mut poke) }.unwrap();
    assert_eq!(victim(), 1);
}
