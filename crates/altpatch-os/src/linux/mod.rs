//! Linux process text poking that never creates a writable+executable
//! mapping, works under `prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)` and
//! `vm.memfd_noexec=2`, and leaves no writable view of code behind.
//!
//! # Strategies: how bytes reach read-only text
//!
//! Tried in this order (override with `ALTPATCH_POKE=memfd,file,...`); the
//! first this process may use is taken, and if all are refused the error
//! lists why each was ([`PokeError::NoStrategy`]):
//!
//! 1. [`Strategy::ProcMem`] — `pwrite` to `/proc/self/mem` (see
//!    `procmem.rs`): the kernel writes the page itself. First because it
//!    needs *no* writable mapping: no writable view of code exists at any
//!    instant; nothing is shared with a forked child (private pages are
//!    copy-on-write); a re-loaded object is written where it is, not
//!    missed; and it is the one way a file's text stays that file's, in
//!    place or by the file-backed page swap (`file_swap.rs`).
//! 2. [`Strategy::Memfd`] — pages re-homed onto a memfd mapped read+exec
//!    and written through a read+write alias (see `arena.rs`).
//! 3. [`Strategy::File`] — the same with an unlinked file in `/dev/shm`,
//!    `/tmp` or `/var/tmp`, for `vm.memfd_noexec=2` (refused if those are
//!    mounted `noexec`).
//!
//! The aliases of 2 and 3 serve anonymous text only: a file's text
//! re-homed would be unknown to the kernel's uprobes and to every tool
//! outside the process, so a batch over it is refused
//! ([`PokeError::LeavesFile`]). They are `PROT_NONE` between batches: when
//! any call returns, no writable mapping of any text page exists.
//!
//! # Publication: when threads see the bytes
//!
//! * [`Publish::InPlace`] ([`LinuxPoke::new`]): the bytes are stored into
//!   the live page. For text no thread runs during the batch (start-up),
//!   since a thread could fetch a multi-byte instruction half written.
//! * [`Publish::Remap`] ([`LinuxPoke::remapping`]), the *page swap*: each
//!   page's new contents are built aside and mapped over the text in one
//!   step: a fresh private mapping of the same file at the same offset
//!   (`file_swap.rs`; the kernel keeps its uprobes in it, and perf, gdb and
//!   `/proc/self/maps` keep seeing the binary), or for anonymous text an
//!   anonymous page or an alias's spare slot. A thread running through a
//!   page executes all-old or all-new bytes, so one instruction can be
//!   replaced by one while other threads run it, **with no trap**: nothing
//!   depends on any thread's signal mask, handlers, alternate stack or
//!   state. Sealed text (`mseal`) cannot be remapped: there the batch is
//!   published by the INT3 protocol, or refused ([`PokeError::Sealed`]).
//! * [`Publish::Live`] ([`LinuxPoke::live`]), the INT3 protocol (see
//!   [`live`](crate::poke::live)): in place, `int3` first, a `SIGTRAP`
//!   handler emulating the new instruction for a thread that hits a site.
//!   Three `membarrier`s per batch. It needs every thread to be able to take
//!   `SIGTRAP`: a thread with it blocked is killed by the kernel, so the poke
//!   refuses the batch when it finds one ([`PokeError::SignalState`]).
//!
//! The high-level APIs of `altpatch` (`static_call!` `update`,
//! `StaticKey::enable`, `ifunc::init`, `retpoline::apply_current`) use
//! [`LinuxPoke::running`]: the page swap, with every edit checked to replace
//! one instruction by one. It is the default because it is the only live
//! publication no ordinary program can break (worker pools block every
//! signal; handlers call anything; programs install their own `SIGTRAP`
//! handlers and debuggers single-step), and it costs about the same: one
//! swap per run of pages and one `membarrier`, against three `membarrier`s
//! and three stores per site (see `BENCHMARKS.md`). The INT3 protocol stays
//! for kernels ([`Int3Poke`](crate::poke::live::Int3Poke)) and as an
//! explicit choice ([`set_live_publication`]).
//!
//! Every batch that lands can be logged for trace decoders ([`poke_log`]).
//!
//! # Checked
//!
//! * A page is written only if `/proc/self/maps` shows it readable,
//!   executable, private and not writable ([`PokeError::NotText`] for JIT
//!   memory, data, shared mappings); pages are checked again whenever the
//!   loader has loaded or unloaded an object since.
//! * After every batch the bytes are read back through the executable
//!   address. A page whose mapping is no longer the one written (a
//!   debugger's private copy, a re-loaded object, someone's `mmap`) is built
//!   afresh from what is mapped now plus the batch's writes and swapped in;
//!   if that does not land either, the batch fails with
//!   [`PokeError::NotLanded`] naming the address.
//! * **fork**: the process-wide update lock is held across `fork`,
//!   so a child never starts mid-batch; a child reopens `/proc/self/mem`
//!   and homes its pages into a new arena.

mod arena;
mod backend;
mod batch;
mod file_swap;
mod file_view;
mod files;
mod fork;
mod in_place;
mod jmps;
mod loader;
pub(crate) mod maps;
mod overlay;
mod peers;
pub mod poke_log;
mod procmem;
mod publish;
mod runs;
mod sorted_map;
mod state;
mod strategy;
mod sys;
mod threads;
mod trap;
// What this backend knows about the instruction set: the signal frame,
// shadow stacks, raw system calls in a signal handler.
pub(crate) use altpatch_host::linux as host;
#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
use x86_64::{cet, frame};

pub use crate::image::LoadError;
#[doc(hidden)]
pub use cet::force_shadow_stack_for_tests;
pub use cet::shadow_stack_enabled;
pub use publish::{Publish, live_publication, set_live_publication};
pub use trap::{emulated_traps, restarted_traps};

use alloc::vec::Vec;
use core::ops::Range;
use core::sync::atomic::Ordering;

use crate::poke::{PokeError, Refusal, Strategy};
#[doc(hidden)]
pub use arena::open_exec_tmpfile;
use state::Locked;
#[doc(hidden)]
pub use sys::{errno, memfd_exec};

/// The strategy this process writes text with (probing them in order the
/// first time), or why none can be used.
///
/// ```
/// let s = altpatch::os::linux::strategy().unwrap();
/// println!("text is written by {s}");
/// ```
pub fn strategy() -> Result<Strategy, PokeError> {
    let mut lock = Locked::acquire()?;
    strategy::choose(lock.shared())
}

/// Whether each strategy can be used in this process, in the default order
/// (each probed once; for reports such as the demo's).
///
/// ```
/// for (s, r) in altpatch::os::linux::strategies() {
///     match r {
///         Ok(()) => println!("{s}: usable"),
///         Err(why) => println!("{s}: refused ({why})"),
///     }
/// }
/// ```
pub fn strategies() -> Vec<(Strategy, Result<(), Refusal>)> {
    let Ok(mut lock) = Locked::acquire() else {
        return Vec::new();
    };
    Strategy::ALL
        .iter()
        .map(|&s| (s, strategy::usable(lock.shared(), s)))
        .collect()
}

/// Starts logging every batch this process commits to `path` (appended;
/// created if missing), or with `None` stops. Replaces an earlier log, and
/// overrides `ALTPATCH_POKE_LOG`. See [`poke_log`] for the format and how to
/// replay it.
///
/// ```
/// use altpatch::os::linux::set_poke_log;
/// let path = std::env::temp_dir().join(format!("altpatch-doc-{}.jsonl", std::process::id()));
/// set_poke_log(Some(&path)).unwrap();
/// // ... updates here are logged, one line per batch ...
/// set_poke_log(None).unwrap();
/// # std::fs::remove_file(&path).ok();
/// ```
pub fn set_poke_log(path: Option<&std::path::Path>) -> std::io::Result<()> {
    let mut lock = Locked::acquire().map_err(std::io::Error::other)?;
    lock.shared().log.set(path)
}

/// Benchmarks only: from now on, stage the page swap of a file's text as
/// anonymous memory, as altpatch did before it kept text the file's. That
/// page is then unknown to the kernel's uprobes (one attached there kills
/// the process) and to perf and debuggers: `benches/update.rs` measures what
/// keeping it the file's costs against this.
#[doc(hidden)]
pub fn stage_swaps_anonymously_for_benchmarks(on: bool) {
    ANONYMOUS_SWAPS.store(on, Ordering::Relaxed);
}

/// See [`stage_swaps_anonymously_for_benchmarks`].
static ANONYMOUS_SWAPS: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Makes the first in-place store of a batch that reaches past `addr` fail
/// from now on, as a partial `pwrite` does: its first half lands, then an
/// error (`None`: no more). For tests that a failed in-place batch puts
/// back every byte.
#[doc(hidden)]
pub fn fail_in_place_store_for_tests(addr: Option<usize>) {
    FAIL_IN_PLACE_STORE.store(addr.unwrap_or(0), Ordering::Relaxed);
}

/// See [`fail_in_place_store_for_tests`].
static FAIL_IN_PLACE_STORE: core::sync::atomic::AtomicUsize =
    core::sync::atomic::AtomicUsize::new(0);

/// Makes `strategy` refused from now on, as if its probe had failed with
/// `errno` at `call` (for tests of the fallback order; e.g. a kernel that
/// refuses executable memfd mappings). Pokes already created keep theirs.
#[doc(hidden)]
pub fn refuse_for_tests(strategy: Strategy, call: &'static str, errno: i32) {
    if let Ok(mut lock) = Locked::acquire() {
        // A test-only path: the name is leaked once per call.
        let call: &'static &'static str = alloc::boxed::Box::leak(alloc::boxed::Box::new(call));
        lock.shared().injected[state::slot(strategy)] = Some(Refusal::new(strategy, call, errno));
    }
}

/// Patches this process's own text without a writable+executable mapping
/// (see the [module documentation](self) for how and why).
///
/// All patching in a process shares one lock, held from
/// [`begin`](crate::poke::TextPoke::begin) to [`commit`](crate::poke::TextPoke::commit)
/// or [`abort`](crate::poke::TextPoke::abort): concurrent patchers serialize, and
/// `fork` waits for a batch to end. A poke is not `Send`, because the lock
/// must be released by the thread that took it; create one where you patch
/// (it is cheap).
///
/// ```
/// use altpatch::{Edit, Image, LinuxPoke, Plan, patch_point};
///
/// #[inline(never)]
/// fn value() -> u32 {
///     let r: u32;
///     // SAFETY: only moves an immediate.
///     unsafe { core::arch::asm!(patch_point!("doc_linux_value"), "mov {0:e}, 1", out(reg) r) };
///     r
/// }
/// let image = Image::current();
/// let at = image.patch_point("doc_linux_value").unwrap();
/// let mut old = [0u8; 5];
/// // SAFETY: the point is inside this program's readable text.
/// unsafe { core::ptr::copy_nonoverlapping(at as *const u8, old.as_mut_ptr(), 5) };
/// let mut new = old;
/// new[1] = 7; // mov r32, imm32: the immediate follows the opcode byte
/// let mut plan = Plan::for_image(&image);
/// plan.push(Edit::replace(at, &old, &new).site("value"));
/// let mut poke = LinuxPoke::new().unwrap();
/// // SAFETY: one `mov` replaced by one `mov`; no other thread runs `value`.
/// let report = unsafe { plan.apply(&mut poke) }.unwrap();
/// assert_eq!(value(), 7);
/// println!("{report}"); // ... via pwrite to /proc/self/mem, in place
/// ```
pub struct LinuxPoke {
    lock: Option<Locked>,
    /// The batch in progress, and how this poke writes and publishes.
    batch: batch::Batch,
    maps_checks: u64,
}

impl core::fmt::Debug for LinuxPoke {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("LinuxPoke")
            .field("publish", &self.batch.publish)
            .field("strategy", &self.batch.strategy)
            .field("in_batch", &self.lock.is_some())
            .field("remaps", &self.batch.remaps)
            .finish()
    }
}

impl LinuxPoke {
    /// A poke that writes in place ([`Publish::InPlace`]), for text no other
    /// thread runs during the batch.
    pub fn new() -> Result<LinuxPoke, PokeError> {
        LinuxPoke::with_publish(Publish::InPlace)
    }

    /// A poke that publishes whole pages atomically ([`Publish::Remap`]).
    pub fn remapping() -> Result<LinuxPoke, PokeError> {
        LinuxPoke::with_publish(Publish::Remap)
    }

    /// A poke running the INT3 protocol ([`Publish::Live`]).
    pub fn live() -> Result<LinuxPoke, PokeError> {
        LinuxPoke::with_publish(Publish::Live)
    }

    /// A poke for text other threads may be running now: the process's
    /// live publication ([`live_publication`], the page swap unless changed),
    /// refusing any edit that does not replace one instruction by one.
    ///
    /// ```
    /// let poke = altpatch::LinuxPoke::running().unwrap();
    /// assert_eq!(poke.publish(), altpatch::Publish::Remap);
    /// ```
    pub fn running() -> Result<LinuxPoke, PokeError> {
        let mut p = LinuxPoke::with_publish(live_publication())?;
        p.batch.one_for_one = true;
        Ok(p)
    }

    /// A poke for start-up, while the program may still have one thread:
    /// each batch is stored in place if, when it commits, the calling
    /// thread is the process's only one — checked with every signal blocked
    /// until the stores have landed, so no handler starts a thread or runs
    /// a site between two stores — and published as [`running`] publishes
    /// otherwise. In place means no page is copied, staged or swapped: the
    /// pages stay the file's mapping with their uprobes, as a page swap
    /// keeps them. Edits must replace one instruction by one, as for
    /// [`running`], whichever way the batch goes. The alias strategies
    /// (anonymous text) store as they write, so with them this is
    /// [`running`].
    ///
    /// [`running`]: LinuxPoke::running
    pub(crate) fn start_up() -> Result<LinuxPoke, PokeError> {
        let mut p = LinuxPoke::running()?;
        if p.batch.strategy == Strategy::ProcMem {
            p.batch.publish = Publish::InPlace;
            p.batch.published = Publish::InPlace;
            p.batch.start_up = true;
        }
        Ok(p)
    }

    /// A poke with the given publication and the process's strategy
    /// ([`strategy`]).
    pub fn with_publish(publish: Publish) -> Result<LinuxPoke, PokeError> {
        let s = strategy()?;
        Ok(LinuxPoke::make(publish, s))
    }

    /// A poke with the given publication and strategy; an error if this
    /// process may not use `strategy`.
    ///
    /// ```
    /// use altpatch::{LinuxPoke, Publish, poke::Strategy};
    /// match LinuxPoke::with_strategy(Publish::Remap, Strategy::Memfd) {
    ///     Ok(p) => assert_eq!(p.strategy(), Strategy::Memfd),
    ///     Err(e) => println!("memfd refused here: {e}"),
    /// }
    /// ```
    pub fn with_strategy(publish: Publish, strategy: Strategy) -> Result<LinuxPoke, PokeError> {
        let mut lock = Locked::acquire()?;
        strategy::usable(lock.shared(), strategy).map_err(|r| PokeError::NoStrategy {
            refusals: [Some(r), None, None],
        })?;
        Ok(LinuxPoke::make(publish, strategy))
    }

    fn make(publish: Publish, strategy: Strategy) -> LinuxPoke {
        fork::keep_linked();
        sys::init_sync_core();
        LinuxPoke {
            lock: None,
            batch: batch::Batch::new(strategy, publish),
            maps_checks: 0,
        }
    }

    /// The publication.
    pub fn publish(&self) -> Publish {
        self.batch.publish
    }

    /// The strategy this poke writes with.
    pub fn strategy(&self) -> Strategy {
        self.batch.strategy
    }

    /// Whether [`sync`](crate::poke::TextPoke::sync) uses
    /// `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)`. Otherwise
    /// it forces a TLB shootdown, whose IPIs interrupt (and so serialize)
    /// every CPU running this process.
    pub fn has_membarrier_sync_core() -> bool {
        sys::has_sync_core()
    }

    /// Number of mapping publications this poke has made (page swaps and
    /// homing; for tests and benchmarks: it grows with runs of pages, not
    /// edits).
    pub fn remaps(&self) -> u64 {
        self.batch.remaps
    }

    /// Number of times this poke read `/proc/self/maps` (once per batch that
    /// touches text not checked before).
    pub fn maps_checks(&self) -> u64 {
        self.maps_checks
    }

    /// Pages this poke found not holding its writes after publication and
    /// built afresh (a debugger's copy, a re-loaded object).
    pub fn repairs(&self) -> u64 {
        self.batch.repairs
    }

    /// Unmaps every alias of text and forgets the arena of the alias
    /// strategies. The aliases are `PROT_NONE` between batches anyway; this
    /// returns their address space. Patched pages stay as they are; a later
    /// batch homes the pages it touches again.
    pub fn release_aliases() {
        if let Ok(mut lock) = Locked::acquire() {
            lock.shared().arena.reset(true);
        }
    }

    fn end_batch(&mut self) {
        if let Some(mut lock) = self.lock.take() {
            lock.shared().arena.end();
        }
        self.batch.clear();
    }
}

impl Drop for LinuxPoke {
    fn drop(&mut self) {
        self.end_batch();
    }
}

// SAFETY: every strategy writes exactly the bytes passed to `write`, at
// their text addresses, into a copy that is published at commit (ProcMem,
// Remap) or into the live page (in place, where the plan rolls back before
// `abort`); homing and repair publish the current bytes plus the batch's
// writes. `commit` reads every write back through the executable address.
// `sync` serializes every thread of the process (membarrier SYNC_CORE, or a
// TLB shootdown); the INT3 protocol syncs after each phase.
unsafe impl crate::poke::TextPoke for LinuxPoke {
    fn begin(&mut self, pages: &[Range<usize>]) -> Result<(), PokeError> {
        if self.lock.is_some() {
            return Err(PokeError::Unsupported("begin while a batch is in progress"));
        }
        let mut lock = Locked::acquire()?;
        let before = lock.shared().text.reads;
        let r = self.batch.begin(lock.shared(), pages);
        self.maps_checks += lock.shared().text.reads - before;
        match r {
            Ok(()) => {
                self.lock = Some(lock);
                Ok(())
            }
            Err(e) => {
                lock.shared().arena.end();
                self.batch.clear();
                Err(e)
            }
        }
    }

    #[inline]
    unsafe fn write(&mut self, addr: usize, bytes: &[u8]) -> Result<(), PokeError> {
        if self.lock.is_none() {
            return Err(PokeError::Unsupported("write outside a batch"));
        }
        // SAFETY: forwarded; the batch checks the address is inside it.
        unsafe { self.batch.write(addr, bytes) }
    }

    fn commit(&mut self) -> Result<(), PokeError> {
        let Some(mut lock) = self.lock.take() else {
            return Err(PokeError::Unsupported("commit without a batch"));
        };
        let result = self.batch.commit(lock.shared());
        self.lock = Some(lock);
        self.end_batch();
        result
    }

    fn abort(&mut self) {
        self.end_batch();
    }

    fn sync(&mut self) -> Result<(), PokeError> {
        if self.batch.publish == Publish::Live {
            // The protocol synced after each of its phases.
            return Ok(());
        }
        sys::sync_all_threads()
    }

    fn method(&self) -> &'static str {
        self.batch.method()
    }
}
