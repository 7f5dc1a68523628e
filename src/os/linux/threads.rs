//! Whether every thread could survive an `int3` (for the INT3 protocol).
//!
//! A thread that has `SIGTRAP` blocked and executes an `int3` is killed by
//! the kernel with the default action: no handler can save it. Worker pools
//! and glibc's `SIGEV_THREAD` timer threads block every signal. Before an
//! INT3 batch the poke therefore reads each thread's blocked mask from
//! `/proc/self/task/*/status` and refuses the batch if one blocks `SIGTRAP`.
//! This is a check, not a guarantee (a thread can block it right after), which
//! is one reason the default live publication is the page swap, which needs
//! no trap at all.

use crate::poke::PokeError;

/// The first thread other than the caller that blocks `SIGTRAP`, if any.
fn blocker() -> Option<i32> {
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::gettid() };
    let dir = std::fs::read_dir("/proc/self/task").ok()?;
    for entry in dir.flatten() {
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if tid == me {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue; // the thread exited
        };
        let blocked = status
            .lines()
            .find_map(|l| l.strip_prefix("SigBlk:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0);
        // Glibc's internal signals blocked too: the thread is inside
        // altpatch's handler, which blocks them (see `trap::our_action`),
        // not a thread the program made deaf to SIGTRAP.
        let ours = blocked & super::trap::INTERNAL_SIGNALS == super::trap::INTERNAL_SIGNALS;
        if blocked & (1 << (libc::SIGTRAP - 1)) != 0 && !ours {
            return Some(tid);
        }
    }
    None
}

/// Refuses the INT3 protocol while a thread blocks `SIGTRAP`. A thread may
/// have it blocked for a moment — inside a signal handler of the program's,
/// possibly preempted there on a loaded machine — so it is asked again,
/// backing off for up to about a quarter of a second, before the batch is
/// refused. A thread inside altpatch's own handler (or on its way in or
/// out, which under a storm of traps on a busy machine can last a while)
/// is told apart by its mask (see [`blocker`]) and never counts.
pub(super) fn check_can_trap() -> Result<(), PokeError> {
    let mut last = None;
    for attempt in 0..8 {
        match blocker() {
            None => return Ok(()),
            Some(tid) => last = Some(tid),
        }
        std::thread::sleep(std::time::Duration::from_millis(1 << attempt));
    }
    Err(PokeError::SignalState {
        why: "a thread blocks SIGTRAP, so an int3 would kill it; use the page-swap publication",
        tid: last.unwrap_or(0),
    })
}

/// Whether the calling thread is the process's only one (no other can
/// appear while it is: only a thread of the process creates one). `false`
/// when it cannot tell.
pub(crate) fn only_thread() -> bool {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return false;
    };
    let mut n = 0;
    for entry in dir {
        if entry.is_err() {
            return false;
        }
        n += 1;
        if n > 1 {
            return false;
        }
    }
    n == 1
}
