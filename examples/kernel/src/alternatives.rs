//! The kernel's alternatives and its hand-made plan: a site rewritten by
//! an explicit `Plan` (and one refused for expecting the wrong bytes),
//! `alternative!` sites chosen per CPU model, and an `alternative_call!`.

use altpatch::cpu::Features;
use altpatch::{DirectPoke, Edit, Image, Plan, alternative, alternative_call, patch_point};

use crate::{print, support};

/// The function the kernel patches: returns 1 until its `mov` is rewritten.
#[inline(never)]
pub(crate) fn answer() -> u32 {
    let r: u32;
    // SAFETY: only moves an immediate into `r`.
    unsafe { core::arch::asm!(patch_point!("kernel_answer"), "mov {0:e}, 1", out(reg) r) };
    r
}

/// A big-endian load and a marker saying which sequence ran: 1 for
/// `mov`+`bswap`, 2 for `movbe`.
#[inline(never)]
pub(crate) fn load_be_marked(p: &u32) -> (u32, u32) {
    let (v, m): (u32, u32);
    // SAFETY: reads the u32 behind a valid reference; moves an immediate.
    unsafe {
        alternative!(
            name: "kernel_load_be",
            "mov {v:e}, [{p}]\nbswap {v:e}\nmov {m:e}, 1",
            [Movbe => "movbe {v:e}, [{p}]\nmov {m:e}, 2"],
            p = in(reg) p, v = out(reg) v, m = out(reg) m,
            options(nostack, readonly, preserves_flags)
        )
    };
    (v, m)
}

/// 0 by default, then 1 with SSE4.2, 2 with AVX2, 3 with ERMS: the last
/// that holds wins, so the result tells CPU models apart.
#[inline(never)]
pub(crate) fn level() -> u32 {
    let r: u32;
    // SAFETY: moves an immediate only.
    unsafe {
        alternative!(
            name: "kernel_level",
            "xor {r:e}, {r:e}",
            [Sse4_2 => "mov {r:e}, 1", Avx2 => "mov {r:e}, 2", Erms => "mov {r:e}, 3"],
            r = out(reg) r,
            options(nomem, nostack)
        )
    };
    r
}

pub(crate) extern "C" fn ones_portable(x: u64) -> u64 {
    let (mut x, mut n) = (x, 0);
    while x != 0 {
        x &= x - 1;
        n += 1;
    }
    n
}

extern "C" fn ones_bmi2(x: u64) -> u64 {
    // Tagged so the test can see which function the call site reached.
    1000 + x.count_ones() as u64
}

/// A direct call patched to the function the CPU selects.
#[inline(never)]
pub(crate) fn ones(x: u64) -> u64 {
    alternative_call!(fn(u64) -> u64; ones_portable, [Bmi2 => ones_bmi2]; x)
}

pub(crate) fn patch_answer(
    image: &Image<'_>,
    features: &Features,
) -> Result<(), altpatch::PlanError> {
    let at = image
        .patch_point("kernel_answer")
        .expect("the kernel_answer patch point is recorded");
    let mut old = [0u8; 5];
    // SAFETY: the point lies in the kernel's text, which is mapped.
    unsafe { core::ptr::copy_nonoverlapping(at as *const u8, old.as_mut_ptr(), 5) };
    let mut new = old;
    new[1..5].copy_from_slice(&2u32.to_le_bytes());

    // SAFETY: the boot page tables map text writable, and this CPU is the
    // only one running.
    let mut poke = unsafe { DirectPoke::for_features(features) };
    println!("poke: direct, sync by {:?}", poke.sync_method());

    // A plan that expects the wrong bytes is refused and writes nothing.
    let mut bad = Plan::for_image(image);
    let mut wrong = old;
    wrong[1] = 9;
    bad.push(Edit::replace(at, &wrong, &new).site("answer"));
    // SAFETY: refused during validation, before any write.
    match unsafe { bad.apply(&mut poke) } {
        Err(e) => println!("refused: {e}"),
        Ok(_) => panic!("a plan with wrong expected bytes was applied"),
    }

    let before = answer();
    let mut plan = Plan::for_image(image);
    plan.push(
        Edit::replace(at, &old, &new)
            .site("answer")
            .reason("return 2 instead of 1"),
    );
    // SAFETY: one `mov` replaced by one `mov`; nothing else runs.
    let report = unsafe { plan.apply(&mut poke) }?;
    print!("{plan}");
    println!("applied: {report}");
    let after = answer();
    // SAFETY: as above.
    unsafe { plan.undo(&mut poke) }?;
    let undone = answer();
    println!("answer: before={before} after={after} undone={undone}");
    if (before, after, undone) != (1, 2, 1) {
        panic!("patching answer() did not take effect");
    }
    Ok(())
}

pub(crate) fn apply_alternatives(
    image: &Image<'_>,
    features: &Features,
) -> Result<(), altpatch::alternative::Error> {
    let x = 0x1122_3344u32;
    let before = (load_be_marked(&x), level(), ones(0b1011));
    // SAFETY: text is writable, this CPU is the only one, and no alternative
    // site is running.
    let mut poke = unsafe { DirectPoke::for_features(features) };
    let t = support::rdtsc();
    // SAFETY: as above; the features are this CPU's own.
    let report = unsafe { altpatch::alternative::apply(image, features, &mut poke) }?;
    support::report_cycles("alternatives", t, report.sites.len());
    print!("{report}");
    let ((value, marker), lvl, n) = (load_be_marked(&x), level(), ones(0b1011));
    println!(
        "alternatives before: load_be=({:#x}, {}) level={} ones={}",
        before.0.0, before.0.1, before.1, before.2
    );
    println!("alt load_be: value={value:#x} marker={marker}");
    println!("alt level: {lvl}");
    println!("alt call: ones={n}");
    // Applying again changes nothing.
    // SAFETY: as above.
    let again = unsafe { altpatch::alternative::apply(image, features, &mut poke) }?;
    println!("alternatives again: {} written", again.applied.written);
    Ok(())
}
