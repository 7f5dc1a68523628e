//! The INT3 protocol as a kernel drives it (`Int3Poke` over an in-place
//! poke, a `TrapSlot` read by the `#BP` handler): three syncs per batch
//! however many sites, the batch's table published before the first `int3`
//! and retired after the last sync, every intermediate state one a trapping
//! CPU can be emulated through.

use std::ops::Range;
use std::sync::Mutex;

use altpatch::poke::live::{
    Int3Poke, LiveSite, LiveSites, ShadowStack, TrapAction, TrapFrame, TrapSlot, TrapTable,
};
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

/// A shadow stack that is on, whose waits yield the CPU (counted in
/// `PAUSES`); `allow_wait` false plays the patching thread's own trap.
struct Shadow {
    allow_wait: bool,
}

static PAUSES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl ShadowStack for Shadow {
    fn active(&self) -> bool {
        true
    }
    fn pause(&self) -> bool {
        PAUSES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::thread::yield_now();
        self.allow_wait
    }
}

/// A trap handler running on another thread, and what it returns.
type Handler = std::thread::JoinHandle<(TrapAction, TrapFrame)>;

/// Under a shadow stack, a CPU that traps on a site becoming a `call` is
/// not emulated: its handler waits, outside the slot, while the batch goes
/// on (the patcher's retire does not wait for it), and once the protocol
/// wrote the site's first byte it resumes at the site to run the real
/// `call`. Its stack is never touched (`rsp` is 0: a write there would
/// crash the test).
#[test]
fn under_a_shadow_stack_a_call_site_is_waited_for_and_restarted() {
    let _one = SERIAL.lock().unwrap();
    let mut text = vec![0xccu8; 4096];
    let base = text.as_mut_ptr() as usize;
    text[..5].copy_from_slice(&[0x0f, 0x1f, 0x44, 0x00, 0x00]);
    // SAFETY: `text` outlives the plan; nothing executes it.
    let mut plan = unsafe { Plan::with_text(base..base + 4096) };
    plan.push(Edit::call(base, Expect::Nop, base + 0x100));
    let (emulated, restarted) = (SLOT.emulated(), SLOT.restarted());
    let cpu: std::sync::Arc<Mutex<Option<Handler>>> = Default::default();
    let started = cpu.clone();
    let inner = Recording::new(move || {
        let mut slot = started.lock().unwrap();
        // The first store after phase 1 (the site holds its int3): a CPU
        // traps there now, and its handler runs on another thread.
        // SAFETY: the site's first byte is readable.
        if slot.is_none() && unsafe { *(base as *const u8) } == 0xcc {
            *slot = Some(std::thread::spawn(move || {
                let mut frame = TrapFrame {
                    rip: (base + 1) as u64,
                    rsp: 0,
                    rflags: 0,
                    regs: [0; 16],
                };
                let shadow = Shadow { allow_wait: true };
                // SAFETY: nothing is emulated under the shadow stack (no
                // stack access); the site is readable.
                let action = unsafe { SLOT.emulate_with(&mut frame, &shadow) };
                (action, frame)
            }));
            // The patcher goes on only once that handler is waiting.
            let before = PAUSES.load(std::sync::atomic::Ordering::SeqCst);
            while PAUSES.load(std::sync::atomic::Ordering::SeqCst) == before {
                std::thread::yield_now();
            }
        }
    });
    let mut poke = Int3Poke::new(inner);
    // SAFETY: SERIAL makes this the only patcher publishing to SLOT.
    unsafe { poke.set_table(&SLOT) };
    // SAFETY: as above.
    unsafe { plan.apply(&mut poke) }.unwrap();
    let handler = cpu.lock().unwrap().take().expect("no CPU trapped");
    let (action, frame) = handler.join().unwrap();
    assert_eq!(action, TrapAction::Restarted);
    assert_eq!((frame.rip as usize, frame.rsp), (base, 0));
    assert_eq!(SLOT.emulated() - emulated, 0, "a call emulated");
    assert_eq!(SLOT.restarted() - restarted, 1);
    assert_eq!(
        text[..5],
        *altpatch::x86::call_rel32(base, base + 0x100).unwrap()
    );
}

/// Which sites a handler emulates under a shadow stack, and what it does
/// when it may not wait or the batch ends with the `int3` still there.
#[test]
fn under_a_shadow_stack_only_stack_free_sites_are_emulated() {
    let _one = SERIAL.lock().unwrap();
    let mut text = vec![0xccu8; 64];
    let base = text.as_mut_ptr() as usize;
    let nop5 = [0x0f, 0x1f, 0x44, 0x00, 0x00];
    let ret = [0xc3, 0xcc, 0xcc, 0xcc, 0xcc];
    let jne = altpatch::x86::jcc_rel32(altpatch::x86::Cond::Ne, base + 16, base + 0x100).unwrap();
    // 0: NOP5 -> jmp; 16: jne -> `je` over `ret` (a conditional return);
    // 32: call -> ret.
    let sites = LiveSites::new(vec![
        LiveSite::new(
            base,
            &nop5,
            &altpatch::x86::jmp_rel32(base, base + 0x40).unwrap(),
        )
        .unwrap(),
        LiveSite::new(base + 16, &jne, &[0x74, 4, 0xc3, 0xcc, 0xcc, 0xcc]).unwrap(),
        LiveSite::new(
            base + 32,
            &altpatch::x86::call_rel32(base + 32, base + 0x200).unwrap(),
            &ret,
        )
        .unwrap(),
    ]);
    // SAFETY: SERIAL: the only patcher; `sites` outlives the publication.
    unsafe { SLOT.publish(&sites) };
    let frame_at = |addr: usize, rflags: u64| TrapFrame {
        rip: (addr + 1) as u64,
        rsp: 0,
        rflags,
        regs: [0; 16],
    };
    let may_not_wait = Shadow { allow_wait: false };
    let zf = 1 << 6;
    // SAFETY (all calls below): rsp is 0, so any emulated push or pop
    // would crash the test; only stack-free emulations may run. The text
    // is readable.
    // A jmp is emulated, shadow stack or not.
    let mut f = frame_at(base, 0);
    assert_eq!(
        unsafe { SLOT.emulate_with(&mut f, &may_not_wait) },
        TrapAction::Emulated
    );
    assert_eq!(f.rip as usize, base + 0x40);
    // A conditional return not taken (ZF set: `je` skips the ret) touches
    // no stack: emulated.
    let mut f = frame_at(base + 16, zf);
    assert_eq!(
        unsafe { SLOT.emulate_with(&mut f, &may_not_wait) },
        TrapAction::Emulated
    );
    assert_eq!(f.rip as usize, base + 22);
    // Taken, or a plain ret: not emulated; a context that may not wait
    // (the patcher's own) gets the trap back unclaimed, frame unchanged.
    for (at, rflags) in [(base + 16, 0), (base + 32, 0)] {
        let mut f = frame_at(at, rflags);
        assert_eq!(
            unsafe { SLOT.emulate_with(&mut f, &may_not_wait) },
            TrapAction::NotOurs
        );
        assert_eq!(f, frame_at(at, rflags));
    }
    // A thread waiting at the ret site when the batch is retired with the
    // int3 still there (a protocol that stopped midway): not ours, as it
    // would be without a shadow stack; never a hang.
    let restarted = SLOT.restarted();
    let waiter = std::thread::spawn(move || {
        let mut f = frame_at(base + 32, 0);
        let shadow = Shadow { allow_wait: true };
        // SAFETY: as above.
        unsafe { SLOT.emulate_with(&mut f, &shadow) }
    });
    std::thread::sleep(std::time::Duration::from_millis(20));
    // SAFETY: published above.
    unsafe { SLOT.retire() };
    assert_eq!(waiter.join().unwrap(), TrapAction::NotOurs);
    // Once the site holds its new instruction, a late trap there restarts.
    text[32] = 0xc3;
    let mut f = frame_at(base + 32, 0);
    assert_eq!(
        unsafe { SLOT.emulate_with(&mut f, &Shadow { allow_wait: true }) },
        TrapAction::Restarted
    );
    assert_eq!(f.rip as usize, base + 32);
    assert_eq!(SLOT.restarted() - restarted, 1);
}
