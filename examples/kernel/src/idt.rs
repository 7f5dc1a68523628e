//! An interrupt descriptor table for the 32 exception vectors: whatever
//! the kernel does wrong is reported over serial (vector, error code, RIP,
//! CR2) and ends QEMU with a failure code naming the vector, instead of a
//! silent hang or a triple-fault reboot.
//!
//! Each stub pushes a zero where the CPU pushes no error code, then the
//! vector, so the report sees one frame layout. The handler runs on the
//! faulting stack, except `#DF`, which has a stack of its own (IST): a
//! fault while pushing onto a broken stack becomes a double fault that is
//! reported, not a triple fault.

use core::arch::global_asm;

use crate::support::exit;

/// Exit values: `EXCEPTION_EXIT + vector` (QEMU's status is
/// `(value << 1) | 1`: 65 for #DE, 77 for #UD, 93 for #PF, ...).
pub const EXCEPTION_EXIT: u32 = 0x20;

global_asm!(
    r#"
    .macro exc_stub n, has_error
    .balign 16
exc_stub_\n:
    .if \has_error == 0
    pushq $0
    .endif
    pushq $\n
    jmp exc_common
    .endm

    .section .text.exceptions, "ax"
    exc_stub 0, 0
    exc_stub 1, 0
    exc_stub 2, 0
    exc_stub 3, 0
    exc_stub 4, 0
    exc_stub 5, 0
    exc_stub 6, 0
    exc_stub 7, 0
    exc_stub 8, 1
    exc_stub 9, 0
    exc_stub 10, 1
    exc_stub 11, 1
    exc_stub 12, 1
    exc_stub 13, 1
    exc_stub 14, 1
    exc_stub 15, 0
    exc_stub 16, 0
    exc_stub 17, 1
    exc_stub 18, 0
    exc_stub 19, 0
    exc_stub 20, 0
    exc_stub 21, 1
    exc_stub 22, 0
    exc_stub 23, 0
    exc_stub 24, 0
    exc_stub 25, 0
    exc_stub 26, 0
    exc_stub 27, 0
    exc_stub 28, 0
    exc_stub 29, 1
    exc_stub 30, 1
    exc_stub 31, 0

exc_common:
    movq %rsp, %rdi
    andq $-16, %rsp
    call exception_report
    ud2

    .section .rodata
    .balign 8
    .globl exception_stubs
exception_stubs:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad exc_stub_\n
    .endr
    .text
    "#,
    options(att_syntax)
);

unsafe extern "C" {
    static exception_stubs: [usize; 32];
}

/// What the stubs and the CPU pushed.
#[repr(C)]
pub struct Frame {
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

const NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor segment overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved",
    "#MF x87 floating point",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD floating point",
    "#VE virtualization",
    "#CP control protection",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security",
    "reserved",
];

#[unsafe(no_mangle)]
extern "C" fn exception_report(frame: &Frame) -> ! {
    let cr2: u64;
    // SAFETY: reading CR2 at CPL 0 has no side effects.
    unsafe { core::arch::asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
    let v = frame.vector as usize & 31;
    println!(
        "altpatch kernel: EXCEPTION {} ({}) error {:#x} rip {:#x} cr2 {cr2:#x} rsp {:#x} \
         rflags {:#x} cs {:#x} ss {:#x}",
        frame.vector, NAMES[v], frame.error, frame.rip, frame.rsp, frame.rflags, frame.cs, frame.ss
    );
    exit(EXCEPTION_EXIT + v as u32)
}

/// 256 gates of 16 bytes; the first 32 filled.
#[repr(C, align(16))]
struct Idt([u64; 512]);

static mut IDT: Idt = Idt([0; 512]);

/// Points `vector` at `handler` through an interrupt gate (interrupts off
/// in the handler) on interrupt stack `ist` (0: the interrupted stack).
/// BSP only, before other CPUs load the table.
pub fn set_gate(vector: u8, handler: usize, ist: u8) {
    let s = handler as u64;
    let v = vector as usize;
    // SAFETY: single-threaded boot (no other CPU runs yet), and a gate is
    // written whole before any interrupt can use it (interrupts are off).
    unsafe {
        let idt = &raw mut IDT;
        // Interrupt gate (type 0xE, present, DPL 0), code selector 0x08.
        (*idt).0[2 * v] = (s & 0xffff)
            | (0x08 << 16)
            | ((ist as u64 & 7) << 32)
            | (0x8e << 40)
            | ((s >> 16) & 0xffff) << 48;
        (*idt).0[2 * v + 1] = s >> 32;
    }
}

/// Fills the exception gates and loads the IDT. Call once, early, with
/// interrupts disabled.
pub fn install() {
    // SAFETY: the stubs table is initialized data in this image.
    let stubs: &[usize; 32] = unsafe { &exception_stubs };
    for (v, &stub) in stubs.iter().enumerate() {
        let ist = if v == 8 { crate::cpus::IST_DF } else { 0 };
        set_gate(v as u8, stub, ist);
    }
    load();
}

/// Loads the (shared) IDT on this CPU.
pub fn load() {
    #[repr(C, packed)]
    struct Pointer {
        limit: u16,
        base: u64,
    }
    let p = Pointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: (&raw const IDT) as u64,
    };
    // SAFETY: the IDT is static and its gates point at handlers in this
    // image.
    unsafe {
        core::arch::asm!("lidt [{}]", in(reg) &p, options(readonly, nostack, preserves_flags))
    };
}

/// The deliberate faults `fault=ud|pf|de|bp|df` on the command line asks for,
/// so tests see the report.
pub fn deliberate(cmdline: &str) {
    for w in cmdline.split_ascii_whitespace() {
        match w.strip_prefix("fault=") {
            // SAFETY (all five): each faults on purpose; the handler
            // reports and exits, never returning here.
            Some("ud") => unsafe { core::arch::asm!("ud2", options(nomem, nostack)) },
            Some("pf") => unsafe {
                // Past the 1 GiB the boot page tables map.
                core::ptr::read_volatile(0x40_0000_0000usize as *const u64);
            },
            Some("bp") => unsafe { core::arch::asm!("int3", options(nomem, nostack)) },
            // A fault with the stack pointer in unmapped memory: the #UD
            // frame cannot be pushed (#PF), nor the #PF frame: #DF.
            Some("df") => unsafe {
                core::arch::asm!("mov rsp, {}", "ud2", in(reg) 0x40_0000_0000u64, options(nomem, nostack))
            },
            Some("de") => unsafe {
                core::arch::asm!("xor edx, edx", "xor eax, eax", "div eax", out("eax") _, out("edx") _, options(nomem, nostack))
            },
            Some(other) => println!("altpatch kernel: unknown fault={other}"),
            None => {}
        }
    }
}
