//! The demo's trampoline section: Rust closures with state handed to C
//! (`qsort`) as plain function pointers, and where their code lives.

use std::cell::Cell;
use std::ffi::c_void;

use altpatch::trampoline::{Closure, Pool};

/// The /proc/self/maps line of the mapping containing `addr`.
fn mapping(addr: usize) -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    maps.lines()
        .find(|l| {
            let Some((a, b)) = l.split_whitespace().next().and_then(|r| r.split_once('-')) else {
                return false;
            };
            let (a, b) = (
                usize::from_str_radix(a, 16).unwrap_or(0),
                usize::from_str_radix(b, 16).unwrap_or(0),
            );
            a <= addr && addr < b
        })
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "(not found)".into())
}

type Cmp = unsafe extern "C" fn(*const c_void, *const c_void) -> i32;

pub fn run() -> Result<(), Box<dyn std::error::Error>> {
    let source = Pool::global().prepare()?;
    println!("code pages come from {source}; nothing is ever written to them");
    let values = [42i64, -7, 19, 3, -30, 11, 8, 25];
    for pivot in [0i64, 20] {
        let comparisons = Cell::new(0u32);
        // State the comparator captures: the pivot and a counter. qsort's
        // comparator has no `void *` for state, so each closure needs its
        // own code address: the trampoline.
        let by_distance = Closure::<Cmp>::new(|a: *const c_void, b: *const c_void| {
            comparisons.set(comparisons.get() + 1);
            // SAFETY: qsort passes pointers to elements of `v`.
            let (a, b) = unsafe { (*a.cast::<i64>(), *b.cast::<i64>()) };
            ((a - pivot).abs(), a).cmp(&((b - pivot).abs(), b)) as i32
        })?;
        let mut v = values;
        // SAFETY: a valid i64 array and a comparator for it, alive across the call.
        unsafe { libc::qsort(v.as_mut_ptr().cast(), v.len(), 8, Some(by_distance.code())) };
        println!(
            "qsort by distance to {pivot:>2}: {v:?} ({} comparisons through {:p})",
            comparisons.get(),
            by_distance.as_ptr()
        );
        if pivot == 0 {
            let code = by_distance.as_ptr() as usize;
            println!("  code: {}", mapping(code));
            println!("  data: {}", mapping(code + 16 * 4096));
        }
    }
    let s = Pool::global().stats();
    println!(
        "pool: {} code pages ({} trampolines each), {} in use after the closures dropped",
        s.pages, s.per_page, s.in_use
    );
    Ok(())
}
