//! The compact plan's own checks: refusals, prefixes, observed edits,
//! sorting, undo.

use super::*;
use crate::poke::{DirectPoke, SyncMethod};

fn poke() -> DirectPoke {
    // SAFETY: the tests write only their own data buffers.
    unsafe { DirectPoke::new(SyncMethod::Cpuid) }
}

#[test]
fn edit_is_32_bytes() {
    assert_eq!(core::mem::size_of::<CompactEdit>(), 32);
}

#[test]
fn refuses_unexpected_bytes_and_writes_nothing() {
    let mut text = alloc::vec![0x90u8; 32];
    let base = text.as_mut_ptr() as usize;
    // SAFETY: `text` outlives the plan.
    let mut plan = unsafe { CompactPlan::with_text(base..base + 32, "") };
    plan.push(base, &[0x90; 5], &[0xcc; 5]);
    plan.push(base + 16, &[0x0f, 0x0b], &[0xcc; 2]); // not what is there
    // SAFETY: plain data.
    let err = unsafe { plan.apply(&mut poke()) }.unwrap_err();
    assert!(matches!(err, PlanError::Unexpected { addr, .. } if addr == base + 16));
    assert_eq!(text, [0x90; 32]);
}

#[test]
fn refuses_malformed_overlapping_and_outside_edits() {
    let mut text = alloc::vec![0x90u8; 32];
    let base = text.as_mut_ptr() as usize;
    let cases: [&dyn Fn(&mut CompactPlan); 3] = [
        &|p| p.push(base, &[0x90; 9], &[0xcc; 9]),
        &|p| {
            p.push(base, &[0x90; 5], &[0xcc; 5]);
            p.push(base + 4, &[0x90; 2], &[0xcc; 2]);
        },
        &|p| p.push(base + 30, &[0x90; 5], &[0xcc; 5]),
    ];
    for case in cases {
        // SAFETY: `text` outlives the plan.
        let mut plan = unsafe { CompactPlan::with_text(base..base + 32, "") };
        case(&mut plan);
        // SAFETY: plain data.
        assert!(unsafe { plan.apply(&mut poke()) }.is_err());
        assert_eq!(text, [0x90; 32]);
    }
}

#[test]
fn a_prefix_edit_of_two_encodings_checks_only_the_prefix() {
    // lfence; call *%r11 -> nopl (%rax); call *%r11: only the filler.
    let mut text = alloc::vec![0x0f, 0xae, 0xe8, 0x41, 0xff, 0xd3, 0xc3];
    let base = text.as_mut_ptr() as usize;
    let lfence = Encoded::from_slice(&text[..6]);
    let nop = Encoded::from_slice(&[0x0f, 0x1f, 0x00, 0x41, 0xff, 0xd3]);
    // SAFETY: `text` outlives the plan.
    let mut plan = unsafe { CompactPlan::with_text(base..base + 7, "") };
    plan.push_encoded(base, &lfence, &nop, 3);
    // SAFETY: plain data.
    let r = unsafe { plan.apply(&mut poke()) }.unwrap();
    assert_eq!(r.written, 1);
    assert_eq!(text, [0x0f, 0x1f, 0x00, 0x41, 0xff, 0xd3, 0xc3]);
}

#[test]
fn observed_edits_are_written_checked_for_overlap_and_read_next_time() {
    let mut text = alloc::vec![0x90u8; 64];
    let base = text.as_mut_ptr() as usize;
    // Five NOPs and five int3s, as zero-padded little-endian integers.
    let (nop5, int3): (u64, u64) = (0x90_9090_9090, 0xcc_cccc_cccc);
    let mut p = poke();
    // Overlapping observed edits: refused by name, nothing written.
    // SAFETY: `text` outlives the plan; the bytes were read just above
    // (all NOPs) and nothing else writes them.
    let mut plan = unsafe { CompactPlan::with_text(base..base + 64, "") };
    // SAFETY: as above.
    unsafe {
        plan.push_observed(base, nop5, int3, 5);
        plan.push_observed(base + 3, nop5, int3, 5);
    }
    // SAFETY: plain data.
    let err = unsafe { plan.apply(&mut p) }.unwrap_err();
    assert!(
        matches!(err, PlanError::Overlap { addr, .. } if addr == base + 3),
        "{err}"
    );
    assert_eq!(text, [0x90; 64]);
    // An observed edit next to one whose bytes are not there: nothing
    // written, and the observation is not trusted a second time.
    // SAFETY: as above.
    let mut plan = unsafe { CompactPlan::with_text(base..base + 64, "") };
    // SAFETY: as above.
    unsafe { plan.push_observed(base, nop5, int3, 5) };
    plan.push(base + 16, &[0x0f, 0x0b], &[0xcc; 2]);
    // SAFETY: plain data.
    assert!(unsafe { plan.apply(&mut p) }.is_err());
    assert_eq!(text, [0x90; 64]);
    assert_eq!(plan.edits[0].state, State::Pending);
    text[2] = 0x0f; // no longer what was observed
    // SAFETY: plain data.
    let err = unsafe { plan.apply(&mut p) }.unwrap_err();
    assert!(
        matches!(err, PlanError::Unexpected { addr, .. } if addr == base),
        "{err}"
    );
    text[2] = 0x90;
    // Written, read back, undone.
    // SAFETY: as above.
    let mut plan = unsafe { CompactPlan::with_text(base..base + 64, "") };
    // SAFETY: as above.
    unsafe {
        plan.push_observed(base, nop5, int3, 5);
        plan.push_observed(base + 40, nop5, int3, 5);
    }
    assert!(alloc::format!("{}", plan.to_plan()).contains("[check]"));
    // SAFETY: plain data.
    let r = unsafe { plan.apply(&mut p) }.unwrap();
    assert_eq!((r.written, r.already), (2, 0));
    assert_eq!(
        (&text[..5], &text[40..45]),
        (&[0xcc; 5][..], &[0xcc; 5][..])
    );
    // SAFETY: plain data.
    unsafe { plan.undo(&mut p) }.unwrap();
    assert_eq!(text, [0x90; 64]);
}

#[test]
fn sorts_applies_once_and_undoes() {
    let mut text = alloc::vec![0x90u8; 32];
    let base = text.as_mut_ptr() as usize;
    // SAFETY: `text` outlives the plan.
    let mut plan = unsafe { CompactPlan::with_text(base..base + 32, "test") };
    plan.push(base + 20, &[0x90; 3], &[1, 2, 3]);
    plan.push(base, &[0x90; 2], &[4, 5]);
    let mut p = poke();
    // SAFETY: plain data.
    let r = unsafe { plan.apply(&mut p) }.unwrap();
    assert_eq!((r.written, r.already), (2, 0));
    assert_eq!((&text[..2], &text[20..23]), (&[4, 5][..], &[1, 2, 3][..]));
    // SAFETY: plain data.
    assert_eq!(unsafe { plan.apply(&mut p) }.unwrap().already, 2);
    assert!(alloc::format!("{}", plan.to_plan()).contains("test"));
    // SAFETY: plain data.
    unsafe { plan.undo(&mut p) }.unwrap();
    assert_eq!(text, [0x90; 32]);
}
