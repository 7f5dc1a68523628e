//! What altpatch sees and does on this machine.
//!
//! ```text
//! cargo run --release --example demo              # features and a patch report
//! cargo run --release --example demo -- --dump-cpuid   # this CPU in the replay format
//! ALTPATCH=nomovbe,noavx2 cargo run --release --example demo
//! ALTPATCH_DEBUG=1 cargo run --release --example demo  # also print applied plans
//! ```

use std::process::ExitCode;
use std::time::Instant;

use altpatch::cpu::{self, Features, HostCpuid, Overrides};
use altpatch::{Edit, Image, LinuxPoke, Plan, patch_point};

/// Returns 1 until the demo rewrites the immediate of its `mov`.
#[inline(never)]
fn answer() -> u32 {
    let r: u32;
    // SAFETY: only moves an immediate into `r`.
    unsafe { core::arch::asm!(patch_point!("demo_answer"), "mov {0:e}, 1", out(reg) r) };
    r
}

fn main() -> ExitCode {
    if std::env::args().any(|a| a == "--dump-cpuid") {
        print!("{}", cpu::dump(&HostCpuid::new()));
        return ExitCode::SUCCESS;
    }

    println!("== CPU features");
    let detected = Features::detect();
    println!("detected:  {detected}");
    let overrides = match Overrides::from_env() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("ALTPATCH: {e}");
            return ExitCode::from(2);
        }
    };
    let features = detected.with_overrides(&overrides);
    if !overrides.is_empty() {
        println!("overrides: {overrides} (from ALTPATCH)");
        println!("effective: {features}");
    }

    println!();
    println!("== Image");
    let image = Image::current();
    println!("{image:?}");

    println!();
    println!("== Patching this program's own text");
    if let Err(e) = patch_answer(&image) {
        eprintln!("patching failed: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn patch_answer(image: &Image<'_>) -> Result<(), Box<dyn std::error::Error>> {
    let f = std::hint::black_box(answer as fn() -> u32);
    let at = image
        .patch_point("demo_answer")
        .ok_or("patch point demo_answer not recorded")?;
    let mut old = [0u8; 5];
    // SAFETY: the point is inside this program's readable text.
    unsafe { core::ptr::copy_nonoverlapping(at as *const u8, old.as_mut_ptr(), 5) };
    let mut new = old;
    new[1..5].copy_from_slice(&2u32.to_le_bytes());

    let mut plan = Plan::for_image(image);
    plan.push(
        Edit::replace(at, &old, &new)
            .site("demo::answer")
            .reason("return 2 instead of 1"),
    );
    let mut poke = LinuxPoke::new()?;
    plan.validate(&poke)?;
    println!("dry run:\n{plan}");

    let before = f();
    let t = Instant::now();
    // SAFETY: one `mov` replaced by one `mov`; no other thread runs `answer`.
    let report = unsafe { plan.apply(&mut poke) }?;
    let first = t.elapsed();
    let after = f();
    let t = Instant::now();
    // SAFETY: as above.
    unsafe { plan.undo(&mut poke) }?;
    let undo = t.elapsed();
    let undone = f();
    println!("applied: {report}");
    println!("answer(): before={before} after={after} after undo={undone}");
    println!(
        "first apply {first:?} (moves the page onto altpatch's memfd), undo {undo:?}; \
         membarrier(SYNC_CORE): {}",
        if LinuxPoke::has_membarrier_sync_core() {
            "yes"
        } else {
            "no (TLB-shootdown fallback)"
        }
    );
    if (before, after, undone) != (1, 2, 1) {
        return Err("the patch did not take effect".into());
    }
    Ok(())
}
