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
/// appear while it is, except from a signal handler of this thread's: only
/// a thread of the process creates one; [`Alone`] closes that door too).
/// `false` when it cannot tell. A task sharing the address space without
/// being a thread of the process (`clone(CLONE_VM)` without
/// `CLONE_THREAD`) is not listed in `/proc/self/task` and not seen. Three system calls and no allocation: it runs in
/// constructors, on every program's start.
pub(crate) fn only_thread() -> bool {
    // SAFETY: open with a NUL-terminated path.
    let fd = unsafe {
        libc::open(
            c"/proc/self/task".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return false;
    }
    // Entries are `.`, `..` and one per thread; the first buffer of a
    // process with one thread holds all three.
    let mut buf = [0u64; 128];
    let mut threads = 0usize;
    let mut ok = true;
    loop {
        // SAFETY: `buf` is writable for its length; `fd` is ours.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                fd,
                buf.as_mut_ptr(),
                core::mem::size_of_val(&buf),
            )
        };
        if n < 0 {
            ok = false;
            break;
        }
        if n == 0 {
            break;
        }
        let bytes = buf.as_ptr().cast::<u8>();
        let mut at = 0usize;
        while at + 20 < n as usize {
            // SAFETY: inside the `n` bytes the kernel wrote: a
            // `linux_dirent64` (ino u64, off u64, reclen u16, type u8,
            // name) at `at`, `reclen` long.
            let (reclen, name0, name1) = unsafe {
                (
                    core::ptr::read_unaligned(bytes.add(at + 16).cast::<u16>()) as usize,
                    *bytes.add(at + 19),
                    *bytes.add(at + 20),
                )
            };
            if reclen == 0 {
                ok = false;
                break;
            }
            // Thread entries are numbers; `.` and `..` are not threads.
            let dots = name0 == b'.' && (name1 == 0 || name1 == b'.');
            threads += usize::from(!dots);
            at += reclen;
        }
        if !ok || threads > 1 {
            break;
        }
    }
    // SAFETY: closing the descriptor we opened.
    unsafe { libc::close(fd) };
    ok && threads == 1
}

/// Proof that the calling thread is the process's only one, kept true
/// while it lives: every signal is blocked, so no handler runs on this
/// thread — none can start a thread, nor run code between two stores of a
/// batch. Dropping it restores the signal mask (signals that arrived
/// meanwhile are delivered then, none lost).
pub(super) struct Alone {
    old: libc::sigset_t,
}

impl Alone {
    /// Blocks every signal and checks the thread is alone; `None` (the mask
    /// restored) if it is not, or if that cannot be told. Four system calls
    /// when alone (mask, open, getdents, close), and no allocation.
    pub(super) fn claim() -> Option<Alone> {
        // SAFETY: sigset_t is plain data, valid all zero; both sets are
        // filled by the calls below before anything reads them.
        let (mut all, mut old): (libc::sigset_t, libc::sigset_t) =
            unsafe { (core::mem::zeroed(), core::mem::zeroed()) };
        // SAFETY: valid pointers to sets we own.
        let blocked = unsafe {
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old)
        };
        if blocked != 0 {
            return None;
        }
        let alone = Alone { old };
        only_thread().then_some(alone)
    }
}

impl Drop for Alone {
    fn drop(&mut self) {
        // SAFETY: restores the mask `claim` saved.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, core::ptr::null_mut()) };
    }
}
