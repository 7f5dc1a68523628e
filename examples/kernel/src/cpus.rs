//! Per-CPU tables and the application processors.
//!
//! * A GDT with a 64-bit TSS per CPU, whose interrupt stack table gives
//!   `#BP` and the sync IPI stacks of their own: the handlers then never
//!   push onto the interrupted stack (this kernel is built for the host
//!   target, whose code keeps data in the red zone below `%rsp`), and an
//!   emulated `call` can write its return address just below it.
//! * Bringing up APs: INIT, STARTUP, STARTUP to each CPU of the MADT; the
//!   STARTUP vector points at a real-mode trampoline copied to 0x8000,
//!   which loads this GDT, enters protected mode, turns on PAE and long
//!   mode with the boot page tables, and jumps to `ap_long_mode`, which
//!   takes the stack the BSP prepared and calls `ap_main(cpu)`.

use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::apic;

/// CPUs this kernel runs at most (the BSP is CPU 0).
pub const MAX_CPUS: usize = 8;
/// IST slot of `#BP`.
pub const IST_BP: u8 = 1;
/// IST slot of the sync IPI and spurious interrupts.
pub const IST_IPI: u8 = 2;
/// IST slot of `#DF`: a fault while pushing a frame on a broken stack is
/// then reported, not a triple fault.
pub const IST_DF: u8 = 3;

const IST_SIZE: usize = 16 * 1024;
const AP_STACK_SIZE: usize = 64 * 1024;
/// Where the trampoline runs: below 1 MiB, page-aligned (STARTUP page 8).
const TRAMPOLINE: usize = 0x8000;
/// Selector of CPU 0's TSS; CPU `i`'s is 16 bytes further per CPU.
const TSS0: u16 = 0x30;

#[repr(C, packed(4))]
struct Tss {
    _reserved0: u32,
    rsp: [u64; 3],
    _reserved1: u64,
    ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    iomap: u16,
}

const EMPTY_TSS: Tss = Tss {
    _reserved0: 0,
    rsp: [0; 3],
    _reserved1: 0,
    ist: [0; 7],
    _reserved2: 0,
    _reserved3: 0,
    // No I/O permission bitmap: past the segment's limit.
    iomap: core::mem::size_of::<Tss>() as u16,
};

static mut TSS: [Tss; MAX_CPUS] = [EMPTY_TSS; MAX_CPUS];

#[repr(C, align(16))]
struct Stacks<const N: usize>([[u8; N]; MAX_CPUS]);
static mut BP_STACKS: Stacks<IST_SIZE> = Stacks([[0; IST_SIZE]; MAX_CPUS]);
static mut IPI_STACKS: Stacks<IST_SIZE> = Stacks([[0; IST_SIZE]; MAX_CPUS]);
static mut DF_STACKS: Stacks<IST_SIZE> = Stacks([[0; IST_SIZE]; MAX_CPUS]);
static mut AP_STACKS: Stacks<AP_STACK_SIZE> = Stacks([[0; AP_STACK_SIZE]; MAX_CPUS]);

/// Null, 64-bit code (0x08), data (0x10), 32-bit code (0x18, for the
/// trampoline), two unused slots, then a 16-byte TSS descriptor per CPU.
#[repr(C, align(16))]
struct Gdt([u64; 6 + 2 * MAX_CPUS]);
static mut GDT: Gdt = {
    let mut g = [0u64; 6 + 2 * MAX_CPUS];
    g[1] = 0x00AF_9A00_0000_FFFF;
    g[2] = 0x00CF_9200_0000_FFFF;
    g[3] = 0x00CF_9A00_0000_FFFF;
    Gdt(g)
};

/// The stack and CPU number the next AP starts with (read by
/// `ap_long_mode`).
static mut AP_BOOT_STACK: u64 = 0;
static mut AP_BOOT_CPU: u64 = 0;

/// Set by each AP once it runs Rust code with its own tables.
static ONLINE: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
/// APIC ID of each CPU number.
pub static APIC_OF: [AtomicUsize; MAX_CPUS] = [const { AtomicUsize::new(0) }; MAX_CPUS];
/// How many CPUs run (BSP included).
pub static CPUS: AtomicUsize = AtomicUsize::new(1);

/// The top of stack `i` of `stacks` (16-byte aligned).
fn top<const N: usize>(stacks: *mut Stacks<N>, i: usize) -> u64 {
    // SAFETY: only the address is taken.
    unsafe { (&raw mut (*stacks).0[i]) as u64 + N as u64 }
}

/// Fills every CPU's TSS (IST stacks) and its GDT descriptor. BSP, once,
/// before `load`.
pub fn prepare() {
    // SAFETY: single-threaded boot: no CPU has loaded these tables yet.
    unsafe {
        let tss = &raw mut TSS;
        let gdt = &raw mut GDT;
        for i in 0..MAX_CPUS {
            (*tss)[i].ist[IST_BP as usize - 1] = top(&raw mut BP_STACKS, i);
            (*tss)[i].ist[IST_IPI as usize - 1] = top(&raw mut IPI_STACKS, i);
            (*tss)[i].ist[IST_DF as usize - 1] = top(&raw mut DF_STACKS, i);
            let base = (&raw const (*tss)[i]) as u64;
            let limit = core::mem::size_of::<Tss>() as u64 - 1;
            // Available 64-bit TSS (type 9), present.
            (*gdt).0[6 + 2 * i] = (limit & 0xffff)
                | (base & 0xff_ffff) << 16
                | 0x89 << 40
                | ((limit >> 16) & 0xf) << 48
                | ((base >> 24) & 0xff) << 56;
            (*gdt).0[7 + 2 * i] = base >> 32;
        }
    }
}

#[repr(C, packed)]
struct Pointer {
    limit: u16,
    base: u64,
}

/// Loads the GDT and CPU `cpu`'s TSS on this CPU. The code and data
/// selectors are the boot GDT's, so the loaded segments stay valid.
pub fn load(cpu: usize) {
    let p = Pointer {
        limit: (core::mem::size_of::<Gdt>() - 1) as u16,
        base: (&raw const GDT) as u64,
    };
    // SAFETY: the GDT is filled (`prepare`) and static; the TSS selector is
    // this CPU's own, loaded once.
    unsafe {
        core::arch::asm!("lgdt [{}]", in(reg) &p, options(readonly, nostack, preserves_flags));
        core::arch::asm!("ltr {0:x}", in(reg) TSS0 + 16 * cpu as u16, options(nostack, preserves_flags));
    }
}

core::arch::global_asm!(
    r#"
    .section .text.ap_trampoline, "ax"
    .code16
    .globl ap_tramp_start
ap_tramp_start:
    cli
    cld
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl (ap_tramp_gdtr - ap_tramp_start + {at})
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x18, $(ap_tramp_32 - ap_tramp_start + {at})

    .code32
ap_tramp_32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl %cr4, %eax
    orl $(1 << 5), %eax          /* PAE */
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx       /* EFER.LME */
    rdmsr
    orl $(1 << 8), %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax        /* PG | PE */
    movl %eax, %cr0
    ljmpl $0x08, $(ap_tramp_64 - ap_tramp_start + {at})

    .code64
ap_tramp_64:
    movabsq $ap_long_mode, %rax
    jmpq *%rax
    .balign 8
    .globl ap_tramp_gdtr
ap_tramp_gdtr:
    .word 0
    .long 0
    .globl ap_tramp_end
ap_tramp_end:

    .text
    .globl ap_long_mode
ap_long_mode:
    movq {stack}(%rip), %rsp
    call cpu_long_mode_setup
    movq {cpu}(%rip), %rdi
    call {main}
1:
    cli
    hlt
    jmp 1b
    "#,
    at = const TRAMPOLINE,
    stack = sym AP_BOOT_STACK,
    cpu = sym AP_BOOT_CPU,
    main = sym ap_main,
    options(att_syntax)
);

unsafe extern "C" {
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
    static ap_tramp_gdtr: u8;
}

/// The first Rust code of an AP: its tables, its APIC, then the SMP test.
extern "C" fn ap_main(cpu: u64) -> ! {
    let cpu = cpu as usize;
    load(cpu);
    crate::idt::load();
    crate::enable_xsave();
    apic::enable();
    ONLINE[cpu].store(true, Ordering::Release);
    crate::smp::ap_run(cpu)
}

/// Starts every CPU of `ids` but this one; returns how many run now (this
/// one included). Each gets its CPU number in MADT order.
pub fn start_aps(ids: &[u8]) -> usize {
    let me = apic::id();
    APIC_OF[0].store(me as usize, Ordering::Relaxed);
    // SAFETY: the trampoline's bytes are in the kernel image; 0x8000 is
    // free low memory (below the EBDA, above the BIOS data area) that
    // nothing else uses once the kernel runs; only the BSP writes it.
    unsafe {
        let start = &raw const ap_tramp_start as usize;
        let len = &raw const ap_tramp_end as usize - start;
        core::ptr::copy_nonoverlapping(start as *const u8, TRAMPOLINE as *mut u8, len);
        let gdtr = TRAMPOLINE + (&raw const ap_tramp_gdtr as usize - start);
        let limit = (core::mem::size_of::<Gdt>() - 1) as u16;
        (gdtr as *mut u16).write_unaligned(limit);
        ((gdtr + 2) as *mut u32).write_unaligned((&raw const GDT) as u32);
    }
    let mut n = 1;
    for &id in ids.iter().filter(|&&id| id != me) {
        if n == MAX_CPUS {
            break;
        }
        // SAFETY: no AP is between STARTUP and reading these (each waits
        // for the previous one to come online).
        unsafe {
            AP_BOOT_STACK = top(&raw mut AP_STACKS, n);
            AP_BOOT_CPU = n as u64;
        }
        APIC_OF[n].store(id as usize, Ordering::Relaxed);
        apic::init(id);
        apic::delay(10);
        for _ in 0..2 {
            apic::startup(id, (TRAMPOLINE >> 12) as u8);
            apic::delay(1);
            if ONLINE[n].load(Ordering::Acquire) {
                break;
            }
        }
        let mut waited = 0;
        while !ONLINE[n].load(Ordering::Acquire) && waited < 20_000 {
            apic::delay(1);
            waited += 1;
        }
        if !ONLINE[n].load(Ordering::Acquire) {
            // Start no more: a late AP would take the next one's stack and
            // number.
            println!("smp: cpu {n} (apic id {id}) did not come online; starting no more");
            break;
        }
        n += 1;
        CPUS.store(n, Ordering::Release);
    }
    n
}

/// This CPU's number (its APIC ID looked up).
pub fn current() -> usize {
    // Before the APs start the APIC may not even be mapped.
    if CPUS.load(Ordering::Acquire) == 1 {
        return 0;
    }
    let id = apic::id() as usize;
    (0..CPUS.load(Ordering::Acquire))
        .find(|&i| APIC_OF[i].load(Ordering::Relaxed) == id)
        .unwrap_or(0)
}
