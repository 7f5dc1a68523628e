//! Live patching while the other CPUs run the sites.
//!
//! Every AP loops through a static call site, a static-key branch site, an
//! ifunc and an alternative, checking each result. Meanwhile the BSP
//! re-targets the static call and flips the key, one batch at a time,
//! through the INT3 protocol (`Int3Poke`) over the kernel's own poke,
//! whose `sync` is an IPI to every other CPU: its handler acknowledges and
//! returns with `iretq`, which serializes that CPU. An AP that fetches an
//! `int3` mid-batch traps to `#BP`, whose handler emulates the site's new
//! instruction through the batch table published in [`SLOT`].
//!
//! What the boot then asserts, per AP: no wrong result, no stale one (a
//! result of the old code after the batch's last sync), both targets and
//! both key states observed; and sync rounds per batch: three.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use altpatch::cpu::Features;
use altpatch::poke::live::{Int3Poke, TrapSlot};
use altpatch::sites::Site;
use altpatch::static_key::{KeyIndex, StaticFalseKey};
use altpatch::{DirectPoke, Image, PokeError, TextPoke, static_branch_unlikely, static_call};

use crate::cpus::{self, MAX_CPUS};
use crate::{apic, print};

/// Batches the BSP runs: half re-target the static call, half flip the key.
const BATCHES: usize = 10_000;
/// Iterations an AP runs after waking before it halts for the next IPI.
const RUN_BEFORE_HALT: u64 = 8;
/// The vector of the sync IPI.
pub(crate) const SYNC_VECTOR: u8 = 0xF0;

/// The batch in flight, for the `#BP` handler.
pub(crate) static SLOT: TrapSlot = TrapSlot::new();
/// Sync IPIs acknowledged, by every CPU together.
pub(crate) static SYNC_ACKS: AtomicU64 = AtomicU64::new(0);
/// Sync rounds (IPI to all, wait for all) so far.
static SYNCS: AtomicU64 = AtomicU64::new(0);
static GO: AtomicBool = AtomicBool::new(false);
static STOP: AtomicBool = AtomicBool::new(false);

/// `version << 3 | STABLE | KEY_ON | TRIPLE`: what the sites do now, when
/// STABLE (no batch in flight since `version` was stored).
pub(crate) static STATE: AtomicU64 = AtomicU64::new(STABLE);
const TRIPLE: u64 = 1;
const KEY_ON: u64 = 2;
pub(crate) const STABLE: u64 = 4;

/// The ifunc's and alternative's results at boot, which the APs expect.
static WANT_ONES: AtomicU64 = AtomicU64::new(0);
static WANT_BE: AtomicU64 = AtomicU64::new(0);

/// What each CPU counted.
pub(crate) struct Counts {
    iterations: AtomicU64,
    wrong: AtomicU64,
    stale: AtomicU64,
    double: AtomicU64,
    triple: AtomicU64,
    key_off: AtomicU64,
    key_on: AtomicU64,
    pub(crate) traps: AtomicU64,
    /// Traps at a site whose batch had ended (run again), and of those the
    /// ones taken when no batch was in flight at all.
    pub(crate) restarts: AtomicU64,
    pub(crate) restarts_stable: AtomicU64,
    done: AtomicBool,
}

pub(crate) static COUNTS: [Counts; MAX_CPUS] = [const {
    Counts {
        iterations: AtomicU64::new(0),
        wrong: AtomicU64::new(0),
        stale: AtomicU64::new(0),
        double: AtomicU64::new(0),
        triple: AtomicU64::new(0),
        key_off: AtomicU64::new(0),
        key_on: AtomicU64::new(0),
        traps: AtomicU64::new(0),
        restarts: AtomicU64::new(0),
        restarts_stable: AtomicU64::new(0),
        done: AtomicBool::new(false),
    }
}; MAX_CPUS];

extern "C" fn ap_double(x: u64) -> u64 {
    x * 2
}

extern "C" fn ap_triple(x: u64) -> u64 {
    x * 3
}

static_call! {
    /// Re-targeted by the BSP while the APs call it.
    fn ap_scale(x: u64) -> u64 = ap_double;
}

/// Flipped by the BSP while the APs test it.
static AP_KEY: StaticFalseKey = StaticFalseKey::new();

#[inline(never)]
fn ap_scaled(x: u64) -> u64 {
    // `black_box` keeps this a `call` site rather than a tail `jmp`.
    core::hint::black_box(ap_scale(x))
}

#[inline(never)]
fn ap_key_on() -> bool {
    static_branch_unlikely!(AP_KEY)
}

/// The kernel's poke for running code: stores in place (text is mapped
/// writable), and a sync that serializes this CPU and every other one.
struct IpiPoke {
    direct: DirectPoke,
    others: u64,
}

// SAFETY: every write goes straight to the text (DirectPoke), visible to
// all CPUs' fetches at once; `sync` returns only when every other CPU has
// taken the IPI and returned from it with `iretq`, after the writes.
unsafe impl TextPoke for IpiPoke {
    fn begin(&mut self, pages: &[core::ops::Range<usize>]) -> Result<(), PokeError> {
        self.direct.begin(pages)
    }

    unsafe fn write(&mut self, addr: usize, bytes: &[u8]) -> Result<(), PokeError> {
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
        self.direct.sync()?;
        let want = SYNC_ACKS.load(Ordering::SeqCst) + self.others;
        apic::all_but_self(SYNC_VECTOR);
        while SYNC_ACKS.load(Ordering::SeqCst) < want {
            core::hint::spin_loop();
        }
        SYNCS.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn method(&self) -> &'static str {
        "in place, IPI sync"
    }
}

/// What an AP runs once online: the checking loop, until the BSP stops it.
pub fn ap_run(cpu: usize) -> ! {
    while !GO.load(Ordering::Acquire) {
        core::hint::spin_loop();
    }
    // SAFETY: the IDT routes the sync IPI (and spurious interrupts) to
    // handlers on their own stacks; nothing else is unmasked.
    unsafe { core::arch::asm!("sti", options(nomem, nostack)) };
    let (want_ones, want_be) = (
        WANT_ONES.load(Ordering::Relaxed),
        WANT_BE.load(Ordering::Relaxed),
    );
    let c = &COUNTS[cpu];
    let mut x = cpu as u64;
    let (mut n, mut wrong, mut stale, mut dbl, mut tpl, mut on, mut off) = (0, 0, 0, 0, 0, 0, 0);
    while !STOP.load(Ordering::Relaxed) {
        x = (x + 1) & 0xffff;
        let s1 = STATE.load(Ordering::SeqCst);
        let r = ap_scaled(x);
        let k = ap_key_on();
        let s2 = STATE.load(Ordering::SeqCst);
        match r {
            _ if r == 2 * x => dbl += 1,
            _ if r == 3 * x => tpl += 1,
            _ => wrong += 1,
        }
        if k {
            on += 1
        } else {
            off += 1
        }
        // No batch began or ended around the calls: the sites must do
        // exactly what the last finished batch made them do.
        if s1 == s2 && s1 & STABLE != 0 {
            let want = if s1 & TRIPLE != 0 { 3 * x } else { 2 * x };
            if r != want || k != (s1 & KEY_ON != 0) {
                stale += 1;
            }
        }
        if crate::kernel_ones(0b1011) != want_ones
            || crate::alternatives::load_be_marked(&0x1122_3344).0 as u64 != want_be
        {
            wrong += 1;
        }
        n += 1;
        if n % RUN_BEFORE_HALT == 0 {
            // Sleep until the next IPI (the BSP's next sync): four busy
            // vCPUs on a two-core host would make every sync wait for a
            // descheduled vCPU thread. Woken, this CPU runs the sites
            // again while the BSP goes on with the next phase. STOP is
            // checked with interrupts off and `sti; hlt` sleeps at once
            // (an interrupt is taken only after the instruction following
            // `sti`), so the BSP's last wake-up IPI cannot come between the
            // check and the halt and be lost.
            // SAFETY: only masks interrupts on this CPU for the check.
            unsafe { core::arch::asm!("cli", options(nomem, nostack)) };
            if STOP.load(Ordering::Acquire) {
                break;
            }
            // SAFETY: interrupts are routed (the IDT has the IPI gate); the
            // next sync IPI wakes this CPU.
            unsafe { core::arch::asm!("sti", "hlt", options(nomem, nostack)) };
        }
    }
    for (a, v) in [
        (&c.iterations, n),
        (&c.wrong, wrong),
        (&c.stale, stale),
        (&c.double, dbl),
        (&c.triple, tpl),
        (&c.key_on, on),
        (&c.key_off, off),
    ] {
        a.store(v, Ordering::Relaxed);
    }
    c.done.store(true, Ordering::Release);
    loop {
        // SAFETY: parks this CPU for good.
        unsafe { core::arch::asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// On the BSP: finds the CPUs, starts the APs and, if there are any, runs
/// the live-patching test. Everything else is patched already.
pub fn run(image: &Image<'_>, features: &Features, sites: &[Site]) -> Result<(), &'static str> {
    let Some(found) = crate::acpi::cpus() else {
        println!("smp: no ACPI MADT, one CPU");
        return Ok(());
    };
    if found.count < 2 {
        println!("smp: 1 CPU in the MADT, no APs to start");
        return Ok(());
    }
    apic::map();
    apic::enable();
    WANT_ONES.store(crate::kernel_ones(0b1011), Ordering::Relaxed);
    WANT_BE.store(
        crate::alternatives::load_be_marked(&0x1122_3344).0 as u64,
        Ordering::Relaxed,
    );
    let online = cpus::start_aps(&found.ids[..found.count]);
    print!("smp: {} CPUs in the MADT (apic ids", found.count);
    for id in &found.ids[..found.count] {
        print!(" {id}");
    }
    println!("), {} online", online);
    if online < 2 {
        return Err("no AP came online");
    }

    let index = KeyIndex::new(image);
    // SAFETY: text is mapped writable; the INT3 protocol (with the #BP
    // handler reading SLOT, and IPI syncs) keeps every state safe for the
    // CPUs running the sites.
    let direct = unsafe { DirectPoke::for_features(features) };
    let mut poke = Int3Poke::new(IpiPoke {
        direct,
        others: online as u64 - 1,
    });
    // SAFETY: the BSP is the only patcher, one batch at a time.
    unsafe { poke.set_table(&SLOT) };
    GO.store(true, Ordering::Release);
    let (mut triple, mut key) = (false, false);
    let (mut fewest, mut most) = (u64::MAX, 0);
    let start = crate::support::rdtsc();
    for i in 0..BATCHES as u64 {
        let bits = |t: bool, k: bool| ((t as u64) * TRIPLE) | ((k as u64) * KEY_ON);
        STATE.store((2 * i + 1) << 3 | bits(triple, key), Ordering::SeqCst);
        let before = SYNCS.load(Ordering::Relaxed);
        if i % 2 == 0 {
            triple = !triple;
            let f = if triple { ap_triple } else { ap_double };
            // SAFETY: as above.
            unsafe { ap_scale::update_with(f, image, sites, &mut poke) }
                .map_err(|_| "static call update failed")?;
        } else {
            key = !key;
            // SAFETY: as above; each key site is one instruction.
            unsafe { AP_KEY.set_with(key, image, &index, &mut poke) }
                .map_err(|_| "static key flip failed")?;
        }
        let rounds = SYNCS.load(Ordering::Relaxed) - before;
        (fewest, most) = (fewest.min(rounds), most.max(rounds));
        STATE.store(
            (2 * i + 2) << 3 | STABLE | bits(triple, key),
            Ordering::SeqCst,
        );
    }
    let cycles = crate::support::rdtsc().wrapping_sub(start);
    STOP.store(true, Ordering::Release);
    // Wake the halted APs to see STOP.
    apic::all_but_self(SYNC_VECTOR);
    for c in &COUNTS[1..online] {
        while !c.done.load(Ordering::Acquire) {
            core::hint::spin_loop();
        }
    }
    let call_sites =
        altpatch::static_call::sites_of(sites, ap_scale::static_call().trampoline()).len();
    println!(
        "smp live: {BATCHES} batches ({} static call re-targets over {call_sites} sites + \
         trampoline, {} key flips over {} sites) in {cycles} cycles, {} per batch; sync \
         rounds per batch min {fewest} max {most}; traps emulated {}",
        BATCHES / 2,
        BATCHES / 2,
        index.count(AP_KEY.addr()),
        cycles / BATCHES as u64,
        SLOT.emulated()
    );
    let mut ok = true;
    for (cpu, c) in COUNTS.iter().enumerate().take(online).skip(1) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (wrong, stale) = (get(&c.wrong), get(&c.stale));
        let (dbl, tpl, off, on) = (
            get(&c.double),
            get(&c.triple),
            get(&c.key_off),
            get(&c.key_on),
        );
        println!(
            "smp cpu {cpu}: iterations={} wrong={wrong} stale={stale} calls double={dbl} \
             triple={tpl} key off={off} on={on} traps={} restarted={} (with no batch in flight: {})",
            get(&c.iterations),
            get(&c.traps),
            get(&c.restarts),
            get(&c.restarts_stable)
        );
        ok &= wrong == 0 && stale == 0 && dbl > 0 && tpl > 0 && off > 0 && on > 0;
    }
    if !ok {
        return Err("an AP saw a wrong or stale result, or not both states");
    }
    println!("smp: ok");
    Ok(())
}
