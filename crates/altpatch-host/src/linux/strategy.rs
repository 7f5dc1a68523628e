//! The ways a Linux process writes its own text ([`Strategy`]) and why one
//! was refused ([`Refusal`]): plain data, below every layer of altpatch,
//! because its OS-neutral `PokeError::NoStrategy` carries them (the choice
//! and the probes are altpatch's `os/linux/strategy.rs`).

use core::fmt;

/// A way a Linux process writes its own text without a writable and
/// executable mapping (see altpatch's `LinuxPoke` for the order
/// they are tried in and why).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// `pwrite` to `/proc/self/mem`: the kernel writes the read-only text
    /// itself (breaking copy-on-write); no writable mapping ever exists.
    /// The only strategy that keeps a file's text that file's (in place, or
    /// page-swapped as a fresh private mapping of the same file): the one
    /// uprobes, perf and debuggers survive.
    ProcMem,
    /// Text pages re-homed onto a memfd (`memfd_create(MFD_EXEC)`) mapped
    /// read+exec, written through a read+write alias that is open only
    /// during a batch. Anonymous text only: a file's text re-homed would be
    /// unknown to the kernel's uprobes and to every tool outside the
    /// process, so such a batch is refused (`PokeError::LeavesFile`).
    Memfd,
    /// The same with an unlinked file in `/dev/shm`, `/tmp` or `/var/tmp`
    /// (where `vm.memfd_noexec` refuses executable memfds). Anonymous text
    /// only, as [`Memfd`](Self::Memfd).
    File,
}

impl Strategy {
    /// Every strategy, in the default order.
    pub const ALL: [Strategy; 3] = [Strategy::ProcMem, Strategy::Memfd, Strategy::File];

    /// The name used in reports and in `ALTPATCH_POKE`: `procmem`, `memfd`,
    /// `file`.
    ///
    /// ```
    /// use altpatch_host::Strategy;
    /// assert_eq!(Strategy::from_name("memfd"), Some(Strategy::Memfd));
    /// assert_eq!(Strategy::Memfd.name(), "memfd");
    /// ```
    pub const fn name(self) -> &'static str {
        match self {
            Strategy::ProcMem => "procmem",
            Strategy::Memfd => "memfd",
            Strategy::File => "file",
        }
    }

    /// Whether text a file maps stays that file's text when this strategy
    /// writes it, so that the kernel's uprobes, perf, gdb and
    /// `/proc/self/maps` keep seeing the binary. Only
    /// [`ProcMem`](Self::ProcMem) does; the alias strategies refuse such
    /// text and serve anonymous text.
    ///
    /// ```
    /// use altpatch_host::Strategy;
    /// assert!(Strategy::ProcMem.keeps_file_text());
    /// assert!(!Strategy::Memfd.keeps_file_text());
    /// ```
    pub const fn keeps_file_text(self) -> bool {
        matches!(self, Strategy::ProcMem)
    }

    /// The strategy called `name` (see [`name`](Self::name)).
    pub fn from_name(name: &str) -> Option<Strategy> {
        Strategy::ALL.into_iter().find(|s| s.name() == name)
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::ProcMem => "pwrite to /proc/self/mem",
            Strategy::Memfd => "memfd alias",
            Strategy::File => "file alias",
        })
    }
}

/// Why one [`Strategy`] was refused.
///
/// ```
/// use altpatch_host::{Refusal, Strategy};
/// let r = Refusal::new(Strategy::Memfd, &"memfd_create(MFD_EXEC)", 13);
/// assert_eq!((r.strategy(), r.call(), r.errno()), (Strategy::Memfd, "memfd_create(MFD_EXEC)", 13));
/// assert!(r.to_string().starts_with("memfd: memfd_create(MFD_EXEC): "));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    strategy: Strategy,
    /// A thin pointer, so that three refusals keep [`PokeError`] small.
    call: &'static &'static str,
    errno: i32,
}

impl Refusal {
    /// `strategy` refused: `call` failed with `errno` (0: it succeeded but
    /// had no effect).
    pub const fn new(strategy: Strategy, call: &'static &'static str, errno: i32) -> Refusal {
        Refusal {
            strategy,
            call,
            errno,
        }
    }

    /// The strategy.
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// The call that failed (`"memfd_create(MFD_EXEC)"`, ...).
    pub fn call(&self) -> &'static str {
        self.call
    }

    /// Its error number (0 when the call succeeded but had no effect).
    pub fn errno(&self) -> i32 {
        self.errno
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: ", self.strategy.name(), self.call)?;
        crate::write_errno(f, self.errno)
    }
}
