//! A tracer attaching and detaching a uprobe again and again in the pages
//! of 1000 sites while four threads call through them and the sites are
//! updated: no thread dies of a stray `int3`, every caller sees the
//! updates, the probe counts, and the original byte is back at the end.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use altpatch::Publish;
use altpatch::os::linux::set_live_publication;
use altpatch::static_branch_unlikely;

use super::support::*;
use super::uprobe::{Uprobe, byte, file_byte};

/// 1000 call sites of `hcall` and 1000 branch sites of `HKEY`, entered at
/// the probed address.
#[inline(never)]
pub fn thousand(x: u64, seen: &mut Seen) {
    rep10!(rep10!(rep10!({
        let r = hcall(x);
        if r == x + 2 {
            seen.new += 1;
        } else if r != x + 1 {
            seen.bad += 1;
        }
        if static_branch_unlikely!(HKEY) {
            seen.hits += 1;
        }
    })));
    seen.rounds += 1;
}

pub fn scenario(s: &str) {
    match s {
        "probes_storm_swap" => storm(Publish::Remap),
        "probes_storm_int3" => storm(Publish::Live),
        _ => panic!("unknown scenario {s}"),
    }
}

fn storm(publish: Publish) {
    set_live_publication(publish).unwrap();
    let entry = thousand as fn(u64, &mut Seen) as usize;
    let original = file_byte(entry);
    // Located once: /proc/self/maps read during a swap may miss the page.
    let at = super::uprobe::file_and_offset(entry);
    let stop = Arc::new(AtomicBool::new(false));
    let tids = Arc::new(std::sync::Mutex::new(Vec::new()));
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let (stop, tids) = (stop.clone(), tids.clone());
            std::thread::spawn(move || {
                // SAFETY: gettid has no preconditions.
                tids.lock().unwrap().push(unsafe { libc::gettid() });
                let mut seen = Seen::default();
                while !stop.load(Ordering::Relaxed) {
                    thousand(1000 + i, &mut seen);
                }
                seen
            })
        })
        .collect();
    let hits = Arc::new(AtomicU64::new(0));
    let attaches = Arc::new(AtomicU64::new(0));
    let stop_tracer = Arc::new(AtomicBool::new(false));
    while tids.lock().unwrap().len() < 4 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let tids = tids.lock().unwrap().clone();
    let tracer = {
        let (stop, hits, attaches) = (stop_tracer.clone(), hits.clone(), attaches.clone());
        let at = at.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let p = Uprobe::attach_threads(&at, &tids).unwrap();
                std::thread::sleep(Duration::from_micros(500));
                hits.fetch_add(p.count(), Ordering::Relaxed);
                attaches.fetch_add(1, Ordering::Relaxed);
                drop(p);
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    while attaches.load(Ordering::Relaxed) < 2 {
        std::thread::sleep(Duration::from_millis(1));
    }
    updates(if publish == Publish::Live { 60 } else { 100 });
    stop_tracer.store(true, Ordering::Relaxed);
    tracer.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    let seen = joined(handles);
    let (hits, attaches) = (
        hits.load(Ordering::Relaxed),
        attaches.load(Ordering::Relaxed),
    );
    println!("{attaches} attaches, {hits} probe hits; callers {seen:?}");
    assert!(hits > 0, "the probe never fired");
    // The kernel removes a probe's breakpoint before `close` returns; the
    // pause only lets a swap in flight on another thread finish.
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(byte(entry), original, "a breakpoint was left behind");
    let mut s = Seen::default();
    thousand(1, &mut s);
    assert_eq!(s.bad, 0);
}
