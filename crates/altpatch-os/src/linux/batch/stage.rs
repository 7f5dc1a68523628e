//! How a batch stages its pages: the publication it can use (sealed text,
//! a file's text and the alias strategies), the copies or alias slots its
//! writes go to, and the groups a file-backed page swap publishes.

use core::ops::Range;

use super::super::file_swap::FileAt;
use super::super::state::Shared;
use super::super::{Publish, maps, threads, trap};
use super::{Batch, Group};
use crate::poke::{PAGE_SIZE, PokeError, Strategy};

impl Batch {
    /// How this batch can be published: `publish`, unless sealed text
    /// forbids remapping (then the INT3 protocol, in place, if every thread
    /// can take it) or the pages are a file's text that the alias
    /// strategies would move off it.
    pub(super) fn choose_publication(
        &self,
        shared: &mut Shared,
        pages: &[Range<usize>],
        publish: Publish,
    ) -> Result<Publish, PokeError> {
        let alias = self.strategy != Strategy::ProcMem;
        if alias {
            for r in pages {
                for p in r.clone().step_by(PAGE_SIZE) {
                    if shared_file_of(shared, p).is_some() {
                        return Err(PokeError::LeavesFile {
                            addr: p,
                            why: if self.strategy == Strategy::Memfd {
                                "the memfd alias would re-home it onto a memfd (only pwrite to \
                                 /proc/self/mem, procmem, keeps text the file's)"
                            } else {
                                "the file alias would re-home it onto a temporary file (only \
                                 pwrite to /proc/self/mem, procmem, keeps text the file's)"
                            },
                            errno: 0,
                        });
                    }
                }
            }
        }
        let remaps = alias || publish == Publish::Remap;
        let Some(sealed) = remaps
            .then(|| pages.iter().find(|r| maps::sealed(r)))
            .flatten()
        else {
            return Ok(publish);
        };
        if alias {
            return Err(PokeError::Sealed {
                addr: sealed.start,
                why: "the memfd and file aliases remap text",
            });
        }
        // Sealed text changes only in place: the INT3 protocol is the
        // in-place publication that is safe while threads run.
        trap::install()
            .and_then(|()| threads::check_can_trap())
            .map_err(|e| PokeError::Sealed {
                addr: sealed.start,
                why: match e {
                    PokeError::SignalState { tid: 0, .. } => {
                        "the in-place INT3 protocol it allows was refused: the program replaced \
                         altpatch's SIGTRAP handler"
                    }
                    PokeError::SignalState { .. } => {
                        "the in-place INT3 protocol it allows was refused: a thread blocks \
                         SIGTRAP, so an int3 would kill it"
                    }
                    _ => "the in-place INT3 protocol it allows could not install its handler",
                },
            })?;
        Ok(Publish::Live)
    }

    /// ProcMem: a copy of every page to write into (none in place: the INT3
    /// protocol keeps its edits, the plain in-place store their bytes).
    pub(super) fn stage_copies(&mut self, pages: &[Range<usize>], n: usize) {
        // A start-up batch staged again as a running one starts afresh.
        self.targets.clear();
        if self.published != Publish::Remap {
            self.targets.resize(n, 0);
            return;
        }
        // Copied, not zeroed first: a batch covers every page holding a
        // site (a megabyte of text in a large program).
        self.stage.clear();
        self.stage.reserve(n * PAGE_SIZE);
        for r in pages {
            // SAFETY: the batch's pages are mapped readable text (checked by
            // `TextPages::check` in `begin`).
            let text =
                unsafe { core::slice::from_raw_parts(r.start as *const u8, r.end - r.start) };
            self.stage.extend_from_slice(text);
        }
        let base = self.stage.as_mut_ptr() as usize;
        self.targets.extend((0..n).map(|i| base + i * PAGE_SIZE));
    }

    /// ProcMem page swap: cuts the runs into groups of pages mapping one
    /// file at consecutive offsets (or anonymous), each file opened.
    pub(super) fn make_groups(&mut self, shared: &mut Shared) -> Result<(), PokeError> {
        for r in &self.runs {
            for p in r.text.clone().step_by(PAGE_SIZE) {
                let first = r.first + (p - r.text.start) / PAGE_SIZE;
                let anonymous =
                    super::super::ANONYMOUS_SWAPS.load(core::sync::atomic::Ordering::Relaxed);
                let file = match shared_file_of(shared, p).filter(|_| !anonymous) {
                    None => None,
                    Some((i, offset)) => {
                        let f = shared.text.file(i);
                        let id = f.id();
                        let fd = f.fd().map_err(|(call, errno)| PokeError::LeavesFile {
                            addr: p,
                            why: if errno == 0 {
                                "its file has been replaced, so no copy of it can be staged"
                            } else {
                                call
                            },
                            errno,
                        })?;
                        Some(FileAt { fd, id, offset })
                    }
                };
                let continues = self.groups.last().is_some_and(|g| {
                    g.text.end == p
                        && match (g.file, file) {
                            (None, None) => true,
                            (Some(a), Some(b)) => a.plus(p - g.text.start) == b,
                            _ => false,
                        }
                });
                match self.groups.last_mut() {
                    Some(g) if continues => g.text.end += PAGE_SIZE,
                    _ => self.groups.push(Group {
                        text: p..p + PAGE_SIZE,
                        first,
                        file,
                    }),
                }
            }
        }
        Ok(())
    }

    /// The alias strategies (anonymous text): the alias of each page's live
    /// slot (in place, INT3), or of its spare slot holding a copy (swap).
    pub(super) fn stage_in_arena(
        &mut self,
        shared: &mut Shared,
        pages: &[Range<usize>],
    ) -> Result<(), PokeError> {
        shared.arena.begin(self.strategy, pages)?;
        for r in pages {
            if self.published != Publish::Remap {
                self.remaps += super::publish::home(shared, r.clone())?;
            }
            for p in r.clone().step_by(PAGE_SIZE) {
                let s = shared.arena.slots(p).expect("slots were just made");
                let target = if self.published == Publish::Remap {
                    let (_, spare) = s.spare();
                    // SAFETY: the text page is mapped readable; the spare
                    // slot is ours, mapped executable nowhere.
                    unsafe {
                        core::ptr::copy_nonoverlapping(p as *const u8, spare as *mut u8, PAGE_SIZE)
                    };
                    spare
                } else {
                    s.live_alias().expect("page was just homed")
                };
                self.targets.push(target);
            }
        }
        Ok(())
    }
}

/// The file `page` maps and the offset it maps (checked pages only), unless
/// the page is anonymous or maps a file of the arena's (re-homed anonymous
/// text).
pub(super) fn shared_file_of(shared: &mut Shared, page: usize) -> Option<(usize, u64)> {
    let o = shared.text.origin(page)?;
    let i = o.file()?;
    let (dev, ino) = shared.text.file(i).id();
    (!shared.arena.owns(dev, ino)).then_some((i, o.offset))
}
