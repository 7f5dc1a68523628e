//! Threads that block every signal, signal storms whose handlers call the
//! patched sites, and handlers on alternate signal stacks, while another
//! thread updates the sites.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use altpatch::Publish;
use altpatch::os::linux::set_live_publication;

use super::support::*;

/// Results from neither target seen by signal handlers, and their runs.
static HANDLER_BAD: AtomicU64 = AtomicU64::new(0);
static HANDLER_RUNS: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_usr1(_sig: i32) {
    HANDLER_BAD.fetch_add(ten_in_handler(7), Ordering::Relaxed);
    HANDLER_RUNS.fetch_add(1, Ordering::Relaxed);
}

fn block_everything(_: usize) {
    // SAFETY: changes only this thread's mask.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        assert_eq!(
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, std::ptr::null_mut()),
            0
        );
    }
}

fn no_setup(_: usize) {}

/// An alternate signal stack for this thread (leaked: threads live until
/// the process ends).
fn with_altstack(_: usize) {
    let size = 256 * 1024;
    let mem: &'static mut [u8] = Vec::leak(vec![0u8; size]);
    // SAFETY: installs a stack we own for the rest of the thread's life.
    unsafe {
        let ss = libc::stack_t {
            ss_sp: mem.as_mut_ptr().cast(),
            ss_flags: 0,
            ss_size: size,
        };
        assert_eq!(libc::sigaltstack(&ss, std::ptr::null_mut()), 0);
    }
}

fn handle_usr1(onstack: bool) {
    // SAFETY: installs a plain handler for SIGUSR1 in this child process.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_usr1 as *const () as usize;
        sa.sa_flags = libc::SA_RESTART | if onstack { libc::SA_ONSTACK } else { 0 };
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut()), 0);
    }
}

/// Sends SIGUSR1 to every caller thread, as fast as it can, until `stop`.
fn storm(tids: Vec<i32>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut sent = 0;
        while !stop.load(Ordering::Relaxed) {
            for &t in &tids {
                // SAFETY: signalling a thread of this process.
                if unsafe { libc::tgkill(libc::getpid(), t, libc::SIGUSR1) } == 0 {
                    sent += 1;
                }
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        sent
    })
}

/// Caller threads that report their thread id first.
fn spawn_callers(
    n: usize,
    stop: &Arc<AtomicBool>,
    setup: fn(usize),
) -> (Vec<std::thread::JoinHandle<Seen>>, Vec<i32>) {
    let tids = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = {
        let tids = tids.clone();
        move |i: usize| {
            setup(i);
            // SAFETY: gettid has no preconditions.
            tids.lock().unwrap().push(unsafe { libc::gettid() });
        }
    };
    let handles = callers(n, stop, record);
    while tids.lock().unwrap().len() < n {
        std::thread::sleep(Duration::from_millis(1));
    }
    let tids = tids.lock().unwrap().clone();
    (handles, tids)
}

pub fn scenario(s: &str) {
    match s {
        "threads_blocked" => blocked(),
        "threads_storm_swap" => signals(false, Publish::Remap),
        "threads_storm_int3" => signals(false, Publish::Live),
        "threads_altstack_swap" => signals(true, Publish::Remap),
        "threads_altstack_int3" => signals(true, Publish::Live),
        _ => panic!("unknown scenario {s}"),
    }
}

/// Eight callers block every signal (as worker pools and glibc's timer
/// threads do). The page swap needs no trap: they survive and see every
/// update. The INT3 protocol would kill them, so it is refused, with
/// nothing written.
fn blocked() {
    let stop = Arc::new(AtomicBool::new(false));
    let handles = callers(8, &stop, block_everything);
    std::thread::sleep(Duration::from_millis(50));
    updates(300);
    set_live_publication(Publish::Live).unwrap();
    let before = hcall(1);
    // A real change (to the target not in use), which the protocol refuses.
    let err = hcall::update(if before == 2 { add2 } else { add1 }).unwrap_err();
    assert!(err.to_string().contains("blocks SIGTRAP"), "{err}");
    assert_eq!(hcall(1), before, "a refused batch changed the text");
    set_live_publication(Publish::Remap).unwrap();
    updates(2);
    stop.store(true, Ordering::Relaxed);
    let seen = joined(handles);
    println!("8 callers with every signal blocked: {seen:?}");
    assert_no_writable_view("updates with blocked callers");
}

/// Callers are hit by a SIGUSR1 storm whose handler calls ten sites
/// (optionally on an alternate stack) while updates run with `publish`.
fn signals(altstack: bool, publish: Publish) {
    handle_usr1(altstack);
    set_live_publication(publish).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let setup = if altstack { with_altstack } else { no_setup };
    let (handles, tids) = spawn_callers(4, &stop, setup);
    let stop_storm = Arc::new(AtomicBool::new(false));
    let storm = storm(tids, stop_storm.clone());
    let emulated = altpatch::os::linux::emulated_traps();
    updates(if publish == Publish::Live { 100 } else { 200 });
    stop_storm.store(true, Ordering::Relaxed);
    let sent = storm.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    let seen = joined(handles);
    let runs = HANDLER_RUNS.load(Ordering::Relaxed);
    let traps = altpatch::os::linux::emulated_traps() - emulated;
    println!("{sent} signals sent, {runs} handler runs, {traps} traps emulated; {seen:?}");
    assert_eq!(
        HANDLER_BAD.load(Ordering::Relaxed),
        0,
        "handlers saw neither target"
    );
    assert!(runs > 100, "the storm barely ran: {runs} handler runs");
    if publish == Publish::Remap {
        assert_eq!(traps, 0, "the page swap needs no trap");
    }
}
