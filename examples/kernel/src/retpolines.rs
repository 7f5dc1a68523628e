//! Retpolines at boot: the mode for this CPU, applied to every thunk site
//! of the embedded table and to the thunks (the kernel's own running code
//! included), with calls through each kind of site before and after.

use altpatch::cpu::{Features, Overrides};
use altpatch::{DirectPoke, Image};

use crate::{call_via_thunk, print, seven, support};

/// An indirect call (rustc: `call __x86_indirect_thunk_r11`).
#[inline(never)]
fn rust_indirect(f: fn(u64) -> u64, x: u64) -> u64 {
    core::hint::black_box(f(x)) * 2
}

/// An indirect tail call (rustc: `jmp __x86_indirect_thunk_r11`).
#[inline(never)]
fn rust_tail(f: fn(u64) -> u64, x: u64) -> u64 {
    f(x)
}

fn halve(x: u64) -> u64 {
    x / 2
}

/// Calls through every kind of site the test looks at.
fn retpoline_calls() -> (u64, u64, u64) {
    let f = core::hint::black_box(halve as fn(u64) -> u64);
    (
        call_via_thunk(core::hint::black_box(seven)),
        rust_indirect(f, 42),
        rust_tail(f, 84),
    )
}

/// Chooses the retpoline mode for this CPU (or `altpatch=retpoline=MODE`)
/// and applies it to every thunk site of the embedded table and to the
/// thunks, the kernel's own running code included.
pub fn apply(
    image: &Image<'_>,
    features: &Features,
    overrides: &Overrides,
) -> Result<(), altpatch::retpoline::Error> {
    use altpatch::retpoline::{self, Policy};
    use altpatch::sites::SiteKind;
    let sites: alloc::vec::Vec<altpatch::sites::Site> = match image.embedded_sites() {
        Ok(Some(t)) => t.iter().collect(),
        _ => alloc::vec::Vec::new(),
    };
    let before = retpoline_calls();
    let policy = Policy::choose(features, overrides);
    // SAFETY: text is writable, this CPU is the only one; every site
    // rewrite keeps the instruction's end (return addresses on the stack,
    // including this function's callers', stay valid).
    let mut poke = unsafe { DirectPoke::for_features(features) };
    let t = support::rdtsc();
    // SAFETY: as above; the mode is the policy's for this CPU.
    let report = unsafe { retpoline::apply(image, &policy, &sites, &mut poke) }?;
    support::report_cycles("retpolines", t, report.sites.len());
    print!("{report}");
    let here = call_via_thunk as fn(extern "C" fn() -> u64) -> u64 as usize;
    let site = sites
        .iter()
        .find(|s| s.kind == SiteKind::IndirectThunk(altpatch::x86::Reg::Rax) && s.addr > here)
        .filter(|s| s.addr < here + 64);
    if let Some(s) = site {
        print!("retpoline rax site:");
        for i in 0..s.len as usize {
            // SAFETY: the site lies in the kernel's text.
            print!(" {:02x}", unsafe { *((s.addr + i) as *const u8) });
        }
        println!();
    }
    let r11 = altpatch::retpoline::thunk(altpatch::x86::Reg::R11).unwrap_or(0);
    print!("retpoline r11 thunk:");
    for i in 0..6 {
        // SAFETY: the thunk lies in the kernel's text.
        print!(" {:02x}", unsafe { *((r11 + i) as *const u8) });
    }
    println!();
    let after = retpoline_calls();
    println!("retpoline calls: before={before:?} after={after:?}");
    Ok(())
}
