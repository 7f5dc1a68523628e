//! Plans against the test binary's own text: validation, apply, undo,
//! idempotence, fault injection and the dry-run listing.

mod common;

use altpatch::{
    DirectPoke, Edit, Expect, FaultInjectingPoke, FaultPoint, LinuxPoke, Plan, PlanError, Publish,
    SyncMethod, patch_point,
};
use common::*;

#[inline(never)]
fn returns_one() -> u32 {
    let r: u32;
    // SAFETY: only moves an immediate into `r`.
    unsafe { core::arch::asm!(patch_point!("plan_returns_one"), "mov {0:e}, 1", out(reg) r) };
    r
}

/// The `mov r32, imm32` at the patch point, and the same with another immediate.
fn mov_edit(image: &altpatch::Image<'_>, value: u32) -> Edit {
    let at = image
        .patch_point("plan_returns_one")
        .expect("patch point recorded");
    let old = read(at, 5);
    assert!(
        (0xb8..=0xbf).contains(&old[0]),
        "mov r32, imm32 expected, found {old:02x?}"
    );
    let mut new = old.clone();
    new[1..5].copy_from_slice(&value.to_le_bytes());
    Edit::replace(at, &old, &new)
        .site("returns_one")
        .reason("return another value")
}

#[test]
fn patch_own_function_call_it_and_undo() {
    let image = image();
    let f = std::hint::black_box(returns_one as fn() -> u32);
    assert_eq!(f(), 1);
    let mut plan = Plan::for_image(&image);
    plan.push(mov_edit(&image, 2));
    let mut poke = LinuxPoke::new().unwrap();
    // SAFETY: one mov replaced by one mov; no other thread runs the function.
    let report = unsafe { plan.apply(&mut poke) }.unwrap();
    assert_eq!((report.written, report.already, report.pages), (1, 0, 1));
    assert_eq!(f(), 2);
    let at = image.patch_point("plan_returns_one").unwrap();
    assert_eq!(read(at + 1, 4), 2u32.to_le_bytes());

    // Applying again is a no-op.
    // SAFETY: as above.
    let again = unsafe { plan.apply(&mut poke) }.unwrap();
    assert_eq!((again.written, again.already), (0, 1));
    assert_eq!(f(), 2);

    // SAFETY: as above.
    unsafe { plan.undo(&mut poke) }.unwrap();
    assert_eq!(f(), 1);
    assert_eq!(read(at + 1, 4), 1u32.to_le_bytes());
}

#[test]
fn wrong_expected_bytes_names_the_site_and_writes_nothing() {
    let image = image();
    let before = PAD_A.snapshot();
    let mut plan = Plan::for_image(&image);
    plan.push(Edit::replace(PAD_A.site(3), &NOP5, &JMP0).site("good"));
    plan.push(Edit::replace(PAD_A.site(700), &JMP0, &[0x90; 5]).site("stale-site"));
    let mut poke = LinuxPoke::new().unwrap();
    // SAFETY: NOP5 <-> jmp-to-next are equivalent; nothing runs the pad now.
    let err = unsafe { plan.apply(&mut poke) }.unwrap_err();
    match &err {
        PlanError::Unexpected {
            site, addr, found, ..
        } => {
            assert_eq!(site, "stale-site");
            assert_eq!(*addr, PAD_A.site(700));
            assert_eq!(&found[..], &NOP5);
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert!(err.to_string().contains("stale-site"), "{err}");
    assert_eq!(PAD_A.snapshot(), before);
    assert_eq!(poke.remaps(), 0);
}

#[test]
fn instruction_expectations_are_decoded() {
    let image = image();
    let mut plan = Plan::for_image(&image);
    // Any single NOP of the right length satisfies Expect::Nop.
    plan.push(Edit::new(PAD_B.site(1), Expect::Nop, JMP0).site("nop-site"));
    // The 3-byte NOP after it is not a 5-byte NOP: a 5-byte edit over two
    // instructions must be refused.
    plan.push(Edit::new(PAD_B.site(2) + 5, Expect::Nop, [0x90; 5]).site("two-insns"));
    let mut poke = LinuxPoke::new().unwrap();
    // SAFETY: nothing is written (validation fails).
    let err = unsafe { plan.apply(&mut poke) }.unwrap_err();
    assert!(
        matches!(&err, PlanError::Unexpected { site, .. } if site == "two-insns"),
        "{err}"
    );

    let mut plan = Plan::for_image(&image);
    plan.push(Edit::call(PAD_B.site(5), Expect::Nop, PAD_B.site(6)).site("call-site"));
    // SAFETY: a call to the next unit's NOP would push a return address; the
    // pad is not executed while patched this way, only inspected.
    unsafe { plan.apply(&mut poke) }.unwrap();
    let b = altpatch::x86::rel_branch(&read(PAD_B.site(5), 5), PAD_B.site(5) as u64).unwrap();
    assert_eq!(b.target as usize, PAD_B.site(6));
    // Expect::Call recognises it; undo goes back to the NOP seen before.
    let mut back = Plan::for_image(&image);
    back.push(Edit::new(PAD_B.site(5), Expect::Call(PAD_B.site(6)), NOP5));
    // SAFETY: restores the NOP.
    unsafe { back.apply(&mut poke) }.unwrap();
    assert_eq!(read(PAD_B.site(5), 5), NOP5);
    assert_eq!(PAD_B.call(), 42);
}

#[test]
fn overlapping_edits_are_refused() {
    let image = image();
    let before = PAD_C.snapshot();
    let mut plan = Plan::for_image(&image);
    plan.push(Edit::replace(PAD_C.site(10) + 2, &NOP5[2..4], &[0x90, 0x90]).site("inner"));
    plan.push(Edit::replace(PAD_C.site(10), &NOP5, &JMP0).site("outer"));
    let mut poke = LinuxPoke::new().unwrap();
    // SAFETY: refused before writing.
    let err = unsafe { plan.apply(&mut poke) }.unwrap_err();
    match &err {
        PlanError::Overlap { site, other, .. } => {
            assert_eq!((site.as_ref(), other.as_ref()), ("outer", "inner"));
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert_eq!(PAD_C.snapshot(), before);
}

#[test]
fn out_of_range_branch_is_refused() {
    let image = image();
    let before = PAD_C.snapshot();
    let mut plan = Plan::for_image(&image);
    plan.push(Edit::replace(PAD_C.site(20), &NOP5, &JMP0).site("fine"));
    let far = PAD_C.site(21).wrapping_add(1 << 40);
    plan.push(Edit::call(PAD_C.site(21), Expect::Nop, far).site("too-far"));
    let mut poke = LinuxPoke::new().unwrap();
    // SAFETY: refused before writing.
    let err = unsafe { plan.apply(&mut poke) }.unwrap_err();
    match &err {
        PlanError::OutOfRange { site, error } => {
            assert_eq!(site, "too-far");
            assert_eq!(error.to, far);
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert_eq!(PAD_C.snapshot(), before);
}

#[test]
fn edits_outside_text_are_refused_before_reading() {
    let image = image();
    let data = [0u8; 64];
    let mut plan = Plan::for_image(&image);
    plan.push(Edit::replace(data.as_ptr() as usize, &[0; 5], &JMP0).site("heap"));
    plan.push(Edit::replace(usize::MAX - 2, &[0; 5], &JMP0).site("wraps"));
    let mut poke = LinuxPoke::new().unwrap();
    // SAFETY: refused before reading or writing.
    let err = unsafe { plan.apply(&mut poke) }.unwrap_err();
    assert!(
        matches!(&err, PlanError::OutsideText { site, .. } if site == "heap"),
        "{err}"
    );
}

#[test]
fn malformed_edits_are_refused() {
    let image = image();
    let mut poke = LinuxPoke::new().unwrap();
    let mut plan = Plan::for_image(&image);
    plan.push(Edit::replace(PAD_C.site(30), &NOP5, &[0x90; 3]).site("short"));
    // SAFETY: refused before writing.
    let err = unsafe { plan.apply(&mut poke) }.unwrap_err();
    assert!(
        matches!(&err, PlanError::BadEdit { site, .. } if site == "short"),
        "{err}"
    );
    let mut plan = Plan::for_image(&image);
    plan.push(Edit::replace(PAD_C.site(31), &[], &[]).site("empty"));
    // SAFETY: refused before writing.
    let err = unsafe { plan.apply(&mut poke) }.unwrap_err();
    assert!(
        matches!(&err, PlanError::BadEdit { site, .. } if site == "empty"),
        "{err}"
    );
}

/// A plan of `n` NOP5 -> jmp edits spread evenly over a pad's four pages.
fn spread_plan(image: &altpatch::Image<'_>, pad: Pad, n: usize) -> Plan {
    let mut plan = Plan::for_image(image);
    for k in 0..n {
        let i = k * (UNITS / n);
        plan.push(Edit::replace(pad.site(i), &NOP5, &JMP0).site(format!("site{k}")));
    }
    plan
}

fn failing_writes_leave_text_identical(pad: Pad, publish: Publish) {
    for s in usable_strategies() {
        failing_writes_leave_text_identical_with(pad, publish, s);
    }
}

fn failing_writes_leave_text_identical_with(pad: Pad, publish: Publish, s: altpatch::Strategy) {
    let image = image();
    let before = pad.snapshot();
    let n = 64;
    let mut plan = spread_plan(&image, pad, n);
    // A write that reports success but never lands is caught when the plan
    // reads the sites back, names the site, and the batch is rolled back.
    for k in [0, 17, n - 1] {
        let inner = LinuxPoke::with_strategy(publish, s).unwrap();
        let mut poke = FaultInjectingPoke::new(inner, FaultPoint::Lose(k));
        // SAFETY: NOP5 <-> jmp-next; nothing runs the pad during the test.
        let err = unsafe { plan.apply(&mut poke) }.unwrap_err();
        let expected_site = format!("site{k}");
        assert!(
            matches!(&err, PlanError::NotLanded { site, .. } if *site == expected_site),
            "{s:?} lose {k}: {err}"
        );
        assert!(
            pad.snapshot() == before,
            "text changed after losing write {k}"
        );
    }
    for k in 0..n {
        let inner = LinuxPoke::with_strategy(publish, s).unwrap();
        let mut poke = FaultInjectingPoke::new(inner, FaultPoint::Write(k));
        // SAFETY: NOP5 <-> jmp-next; nothing runs the pad during the test.
        let err = unsafe { plan.apply(&mut poke) }.unwrap_err();
        assert!(poke.fired());
        let expected_site = format!("site{k}");
        assert!(
            matches!(&err, PlanError::Poke { site: Some(s), .. } if *s == expected_site),
            "k={k}: {err}"
        );
        assert!(
            pad.snapshot() == before,
            "text changed after failing write {k}"
        );
    }
    for fault in [FaultPoint::Begin(0), FaultPoint::Commit(0)] {
        let inner = LinuxPoke::with_strategy(publish, s).unwrap();
        let mut poke = FaultInjectingPoke::new(inner, fault);
        // SAFETY: as above.
        let err = unsafe { plan.apply(&mut poke) }.unwrap_err();
        assert!(matches!(err, PlanError::Poke { .. }), "{fault:?}: {err}");
        assert!(pad.snapshot() == before, "text changed after {fault:?}");
    }
    // And with no fault, every site is written; publication costs at most
    // one mmap per page, not per edit.
    let mut poke = LinuxPoke::with_strategy(publish, s).unwrap();
    // SAFETY: as above.
    let report = unsafe { plan.apply(&mut poke) }.unwrap();
    assert_eq!((report.written, report.pages), (n, 4));
    assert!(poke.remaps() <= 4, "remaps {} for 4 pages", poke.remaps());
    for k in 0..n {
        assert_eq!(read(pad.site(k * (UNITS / n)), 5), JMP0);
    }
    assert_eq!(pad.call(), 42, "patched pad runs");
    // SAFETY: as above.
    unsafe { plan.undo(&mut poke) }.unwrap();
    assert!(pad.snapshot() == before);
}

#[test]
fn every_failing_write_leaves_text_identical_linux_in_place() {
    failing_writes_leave_text_identical(PAD_D, Publish::InPlace);
}

#[test]
fn every_failing_write_leaves_text_identical_linux_remap() {
    failing_writes_leave_text_identical(PAD_F, Publish::Remap);
}

#[test]
fn every_failing_write_leaves_text_identical_in_place() {
    // Same with a poke that writes in place, where rollback writes matter:
    // "text" here is a heap buffer laid out like a pad.
    let mut text = vec![0u8; 4 * 4096];
    for unit in text.chunks_mut(UNIT) {
        unit[..5].copy_from_slice(&NOP5);
        unit[5..].copy_from_slice(&[0x0f, 0x1f, 0x00]);
    }
    let before = text.clone();
    let base = text.as_mut_ptr() as usize;
    let n = 60;
    // SAFETY: the buffer outlives the plan.
    let mut plan = unsafe { Plan::with_text(base..base + text.len()) };
    for k in 0..n {
        plan.push(Edit::replace(base + k * 272, &NOP5, &JMP0).site(format!("site{k}")));
    }
    for k in 0..n {
        // SAFETY: the buffer is writable data nothing executes.
        let inner = unsafe { DirectPoke::new(SyncMethod::Cpuid) };
        let mut poke = FaultInjectingPoke::new(inner, FaultPoint::Write(k));
        // SAFETY: as above.
        let err = unsafe { plan.apply(&mut poke) }.unwrap_err();
        assert!(matches!(err, PlanError::Poke { .. }), "k={k}: {err}");
        assert!(text == before, "buffer changed after failing write {k}");
    }
    // A commit failure after in-place writes is repaired by a second batch.
    // SAFETY: as above.
    let inner = unsafe { DirectPoke::new(SyncMethod::Cpuid) };
    let mut poke = FaultInjectingPoke::new(inner, FaultPoint::Commit(0));
    // SAFETY: as above.
    let err = unsafe { plan.apply(&mut poke) }.unwrap_err();
    assert!(matches!(err, PlanError::Poke { site: None, .. }), "{err}");
    assert!(text == before);
}

#[test]
fn dry_run_lists_sites_bytes_and_reasons() {
    let image = image();
    let mut plan = Plan::for_image(&image);
    plan.push(mov_edit(&image, 5));
    let listing = plan.to_string();
    assert!(listing.contains("altpatch plan: 1 edit"), "{listing}");
    assert!(listing.contains("returns_one"), "{listing}");
    assert!(listing.contains("05 00 00 00"), "{listing}");
    assert!(listing.contains("return another value"), "{listing}");
    assert!(listing.contains("[check]"), "{listing}");
    // After validation the found bytes and disassembly are shown.
    let poke = LinuxPoke::new().unwrap();
    plan.validate(&poke).unwrap();
    let listing = plan.to_string();
    assert!(listing.contains("[write]"), "{listing}");
    assert!(listing.contains("mov $1,%eax -> mov $5,%eax"), "{listing}");
    assert_eq!(returns_one(), 1, "validation wrote nothing");
}

#[test]
fn undo_of_an_unapplied_plan_is_a_no_op() {
    let image = image();
    let before = PAD_E.snapshot();
    let mut plan = spread_plan(&image, PAD_E, 8);
    let mut poke = LinuxPoke::new().unwrap();
    // SAFETY: the pad is in its original state; undo must find it so.
    let r = unsafe { plan.undo(&mut poke) }.unwrap();
    assert_eq!((r.written, r.already), (0, 8));
    assert!(PAD_E.snapshot() == before);
}

/// A read-back that fails (the poke cannot read a site after writing it)
/// is not a success and leaves no unproven write behind: the batch is
/// restored and the error names the site. Both plan representations.
#[test]
fn a_failed_read_back_restores_the_batch() {
    use altpatch::{CompactPlan, SyncMethod};
    let mut text = vec![0x90u8; 64];
    let base = text.as_mut_ptr() as usize;
    let poke = || {
        // SAFETY: `text` is writable data that nothing executes.
        let inner = unsafe { DirectPoke::new(SyncMethod::Cpuid) };
        // Reads 0..4 validate the four edits; read 5 reads the second back.
        FaultInjectingPoke::new(inner, FaultPoint::Read(5))
    };
    // SAFETY: `text` outlives both plans.
    let mut plan = unsafe { Plan::with_text(base..base + 64) };
    for i in 0..4 {
        plan.push(Edit::replace(base + 8 * i, &[0x90; 2], &[0xcc; 2]).site(format!("e{i}")));
    }
    let mut p = poke();
    // SAFETY: plain data.
    let err = unsafe { plan.apply(&mut p) }.unwrap_err();
    assert!(p.fired());
    assert!(
        matches!(&err, PlanError::Poke { site: Some(s), .. } if s == "e1"),
        "{err}"
    );
    assert!(text.iter().all(|&b| b == 0x90), "{text:x?}");

    // SAFETY: as above.
    let mut compact = unsafe { CompactPlan::with_text(base..base + 64, "") };
    for i in 0..4 {
        compact.push(base + 8 * i, &[0x90; 2], &[0xcc; 2]);
    }
    let mut p = poke();
    // SAFETY: plain data.
    let err = unsafe { compact.apply(&mut p) }.unwrap_err();
    assert!(p.fired());
    assert!(
        matches!(&err, PlanError::Poke { site: Some(_), .. }),
        "{err}"
    );
    assert!(text.iter().all(|&b| b == 0x90), "{text:x?}");
}
