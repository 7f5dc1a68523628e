//! The local APIC (xAPIC, memory-mapped at its default 0xFEE00000): this
//! CPU's ID, enabling it, end of interrupt, and the inter-processor
//! interrupts that start application processors (INIT, STARTUP) and sync
//! them (a fixed vector to all but self). QEMU 7.2's TCG has no x2APIC,
//! so the registers are reached through memory.

use core::sync::atomic::{AtomicBool, Ordering};

/// The architectural default base; the MADT says where it is.
pub const DEFAULT_BASE: usize = 0xFEE0_0000;

const ID: usize = 0x20;
const TPR: usize = 0x80;
const EOI: usize = 0xB0;
const SVR: usize = 0xF0;
const ICR_LOW: usize = 0x300;
const ICR_HIGH: usize = 0x310;
/// ICR delivery status: the IPI has not been accepted yet.
const PENDING: u32 = 1 << 12;

/// The spurious-interrupt vector (its handler returns without EOI).
pub const SPURIOUS_VECTOR: u8 = 0xFF;

static MAPPED: AtomicBool = AtomicBool::new(false);

unsafe extern "C" {
    /// The boot page tables' page-directory-pointer table (boot.rs).
    static mut boot_pdpt: [u64; 512];
}

/// One page directory of 2 MiB pages for the fourth GiB, where the APIC
/// lives (the boot tables map only the first GiB).
#[repr(C, align(4096))]
struct PageDirectory([u64; 512]);
static mut HIGH_PD: PageDirectory = PageDirectory([0; 512]);

/// Maps the APIC's page uncached at its own address. BSP only, before any
/// other CPU runs (they share the tables).
pub fn map() {
    const PRESENT_WRITE_HUGE: u64 = 0x83;
    const UNCACHED: u64 = 0x18; // PWT | PCD
    let base = DEFAULT_BASE as u64;
    // SAFETY: single-threaded boot; the fourth GiB is unmapped until now, so
    // nothing depends on the entries changed; CR3 is reloaded after.
    unsafe {
        let pd = &raw mut HIGH_PD;
        (*pd).0[((base >> 21) & 511) as usize] =
            (base & !0x1f_ffff) | PRESENT_WRITE_HUGE | UNCACHED;
        let pdpt = &raw mut boot_pdpt;
        (*pdpt)[(base >> 30) as usize] = (pd as u64) | 3;
        core::arch::asm!("mov {t}, cr3", "mov cr3, {t}", t = out(reg) _, options(nostack));
    }
    MAPPED.store(true, Ordering::Release);
}

fn reg(offset: usize) -> *mut u32 {
    debug_assert!(MAPPED.load(Ordering::Relaxed));
    (DEFAULT_BASE + offset) as *mut u32
}

fn read(offset: usize) -> u32 {
    // SAFETY: the APIC page is mapped (map) and this register is readable.
    unsafe { reg(offset).read_volatile() }
}

fn write(offset: usize, value: u32) {
    // SAFETY: as for `read`; writes of these registers have only the
    // documented effects on this CPU's APIC.
    unsafe { reg(offset).write_volatile(value) }
}

/// This CPU's APIC ID.
pub fn id() -> u8 {
    (read(ID) >> 24) as u8
}

/// Software-enables this CPU's APIC and lets every interrupt class in.
pub fn enable() {
    write(TPR, 0);
    write(SVR, 0x100 | SPURIOUS_VECTOR as u32);
}

/// The address interrupt handlers (in assembly) store to for the end of
/// interrupt.
pub const EOI_ADDR: usize = DEFAULT_BASE + EOI;

fn send(high: u32, low: u32) {
    while read(ICR_LOW) & PENDING != 0 {
        core::hint::spin_loop();
    }
    write(ICR_HIGH, high);
    write(ICR_LOW, low);
    while read(ICR_LOW) & PENDING != 0 {
        core::hint::spin_loop();
    }
}

/// INIT (assert, level) to the CPU with APIC ID `apic`.
pub fn init(apic: u8) {
    send((apic as u32) << 24, 0x0000_C500);
    send((apic as u32) << 24, 0x0000_8500); // de-assert
}

/// STARTUP: the CPU starts in real mode at `page << 12`.
pub fn startup(apic: u8, page: u8) {
    send((apic as u32) << 24, 0x0000_0600 | page as u32);
}

/// A fixed-vector interrupt to every CPU but this one.
pub fn all_but_self(vector: u8) {
    send(0, 0x000C_0000 | vector as u32);
}

/// Spins for roughly `n` thousand `pause`s (the start-up protocol's waits;
/// QEMU needs none of its real-hardware milliseconds).
pub fn delay(n: u32) {
    for _ in 0..n * 1000 {
        core::hint::spin_loop();
    }
}
