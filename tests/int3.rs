//! The INT3 protocol as a kernel drives it (`Int3Poke` over an in-place
//! poke, a `TrapSlot` read by the `#BP` handler): three syncs per batch
//! however many sites, the batch's table published before the first `int3`
//! and retired after the last sync, every intermediate state one a trapping
//! CPU can be emulated through.

use std::ops::Range;
use std::sync::Mutex;

use altpatch::poke::live::{Int3Poke, TrapAction, TrapFrame, TrapSlot};
use altpatch::{DirectPoke, Edit, Expect, Plan, PokeError, SyncMethod, TextPoke};

static SLOT: TrapSlot = TrapSlot::new();

/// What the inner poke saw, in order.
#[derive(Debug, PartialEq)]
enum Event {
    /// A store, and whether the batch's table was published at that moment.
    Write {
        addr: usize,
        bytes: Vec<u8>,
        published: bool,
    },
    Sync,
}

/// An in-place poke over a plain buffer that records every store and sync,
/// and runs `on_write` (a CPU "trapping" mid-batch) before each store.
struct Recording {
    direct: DirectPoke,
    events: Vec<Event>,
    on_write: Box<dyn FnMut()>,
}

impl Recording {
    fn new(on_write: impl FnMut() + 'static) -> Recording {
        Recording {
            // SAFETY: every plan of these tests writes its own buffer.
            direct: unsafe { DirectPoke::new(SyncMethod::Cpuid) },
            events: Vec::new(),
            on_write: Box::new(on_write),
        }
    }
}

// SAFETY: forwards every write to a DirectPoke over the test's own buffer.
unsafe impl TextPoke for Recording {
    fn begin(&mut self, pages: &[Range<usize>]) -> Result<(), PokeError> {
        self.direct.begin(pages)
    }

    unsafe fn write(&mut self, addr: usize, bytes: &[u8]) -> Result<(), PokeError> {
        (self.on_write)();
        let published = SLOT.enter().sites().is_some();
        self.events.push(Event::Write {
            addr,
            bytes: bytes.to_vec(),
            published,
        });
        // SAFETY: forwarded.
        unsafe { self.direct.write(addr, bytes) }
    }

    fn commit(&mut self) -> Result<(), PokeError> {
        self.direct.commit()
    }

    fn abort(&mut self) {
        self.direct.abort()
    }

    fn sync(&mut self) -> Result<(), PokeError> {
        self.events.push(Event::Sync);
        self.direct.sync()
    }
}

/// One test at a time uses SLOT.
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn three_syncs_per_batch_and_the_table_lives_exactly_as_long_as_the_batch() {
    let _one = SERIAL.lock().unwrap();
    const N: usize = 6;
    // N NOP5 sites at 16-byte spacing, each to become `jmp` to the byte
    // after the buffer's site block.
    let mut text = vec![0xccu8; 4096 * 2];
    let base = text.as_mut_ptr() as usize;
    for i in 0..N {
        text[i * 16..i * 16 + 5].copy_from_slice(&[0x0f, 0x1f, 0x44, 0x00, 0x00]);
    }
    let target = base + 0x800;
    // SAFETY: `text` outlives the plan and the poke; nothing executes it.
    let mut plan = unsafe { Plan::with_text(base..base + text.len()) };
    for i in 0..N {
        plan.push(Edit::jmp(base + i * 16, Expect::Nop, target));
    }
    let inner = Recording::new(|| {});
    let mut poke = Int3Poke::new(inner);
    // SAFETY: SERIAL makes this the only patcher publishing to SLOT.
    unsafe { poke.set_table(&SLOT) };
    // SAFETY: as above.
    unsafe { plan.apply(&mut poke) }.unwrap();
    let events = poke.into_inner().events;

    let syncs: Vec<usize> = (0..events.len())
        .filter(|&i| events[i] == Event::Sync)
        .collect();
    assert_eq!(
        syncs.len(),
        3,
        "syncs per batch (Plan::apply's own sync adds none): {events:?}"
    );
    assert_eq!(syncs[2], events.len() - 1, "the batch ends with a sync");
    // Phase 1: an int3 on every site; phase 2: the tails; phase 3: the
    // first bytes. Every store happened with the table published.
    let phase = |k: usize| {
        let from = if k == 0 { 0 } else { syncs[k - 1] + 1 };
        events[from..syncs[k]].iter().collect::<Vec<_>>()
    };
    for (k, want_len, first) in [(0, 1, Some(0xcc)), (1, 4, None), (2, 1, Some(0xe9))] {
        let stores = phase(k);
        assert_eq!(stores.len(), N, "phase {}", k + 1);
        for s in stores {
            let Event::Write {
                bytes, published, ..
            } = s
            else {
                unreachable!()
            };
            assert!(
                *published,
                "phase {}: a store with no table published",
                k + 1
            );
            assert_eq!(bytes.len(), want_len, "phase {}", k + 1);
            if let Some(b) = first {
                assert_eq!(bytes[0], b, "phase {}", k + 1);
            }
        }
    }
    // Retired. A CPU that trapped during the batch but reaches its handler
    // only now runs the site again (its int3 is gone); a trap anywhere
    // else is not ours; an int3 a debugger put at one of our sites, with no
    // batch in flight, is not ours either.
    let frame_at = |addr: usize| TrapFrame {
        rip: (addr + 1) as u64,
        rsp: 0,
        rflags: 0,
        regs: [0; 16],
    };
    let mut frame = frame_at(base);
    // SAFETY: a jmp touches no stack; the text is readable.
    assert_eq!(unsafe { SLOT.emulate(&mut frame) }, TrapAction::Restarted);
    assert_eq!(frame.rip as usize, base);
    let mut frame = frame_at(base + 0x400);
    // SAFETY: as above.
    assert_eq!(unsafe { SLOT.emulate(&mut frame) }, TrapAction::NotOurs);
    assert_eq!(frame.rip as usize, base + 0x401);
    text[16] = 0xcc;
    let mut frame = frame_at(base + 16);
    // SAFETY: as above.
    assert_eq!(unsafe { SLOT.emulate(&mut frame) }, TrapAction::NotOurs);
    text[16] = 0xe9;
    for i in 0..N {
        assert_eq!(text[i * 16], 0xe9);
        let rel = i32::from_le_bytes(text[i * 16 + 1..i * 16 + 5].try_into().unwrap());
        assert_eq!(base + i * 16 + 5 + rel as usize, target);
    }
}

/// A CPU that traps on a site while the batch is in flight is emulated
/// through the published table: checked from inside the inner poke, at
/// every store.
#[test]
fn a_trap_mid_batch_is_emulated_through_the_slot() {
    let _one = SERIAL.lock().unwrap();
    let mut text = vec![0xccu8; 4096];
    let base = text.as_mut_ptr() as usize;
    text[..5].copy_from_slice(&[0x0f, 0x1f, 0x44, 0x00, 0x00]);
    // SAFETY: `text` outlives the plan; nothing executes it.
    let mut plan = unsafe { Plan::with_text(base..base + 4096) };
    plan.push(Edit::jmp(base, Expect::Nop, base + 0x100));
    let before = SLOT.emulated();
    let inner = Recording::new(move || {
        let mut frame = TrapFrame {
            rip: (base + 1) as u64,
            rsp: 0,
            rflags: 0,
            regs: [0; 16],
        };
        // SAFETY: a jmp touches no stack; the site is readable.
        assert_eq!(unsafe { SLOT.emulate(&mut frame) }, TrapAction::Emulated);
        assert_eq!(frame.rip as usize, base + 0x100);
    });
    let mut poke = Int3Poke::new(inner);
    // SAFETY: SERIAL makes this the only patcher publishing to SLOT.
    unsafe { poke.set_table(&SLOT) };
    // SAFETY: as above.
    unsafe { plan.apply(&mut poke) }.unwrap();
    let writes = poke
        .into_inner()
        .events
        .iter()
        .filter(|e| **e != Event::Sync)
        .count();
    assert_eq!(writes, 3);
    assert_eq!(SLOT.emulated() - before, 3);
}
