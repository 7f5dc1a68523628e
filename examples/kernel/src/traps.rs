//! The trap side of live patching: the `#BP` handler that emulates a
//! site's new instruction for a CPU that hit the INT3 protocol's `int3`,
//! and the sync IPI that serializes a CPU and acknowledges. Both run on
//! stacks of their own (IST), so nothing is pushed onto the interrupted
//! stack (the red zone stays intact, and an emulated `call` writes its
//! return address where a real one would).

use core::sync::atomic::Ordering;

use altpatch::poke::live::{TrapAction, TrapFrame};

use crate::cpus::{self, IST_BP, IST_IPI};
use crate::smp::{COUNTS, SLOT, STABLE, STATE, SYNC_ACKS, SYNC_VECTOR};
use crate::{apic, idt};

/// The registers the `#BP` stub saved, then the CPU's interrupt frame.
#[repr(C)]
struct BpFrame {
    r15: u64,
    r14: u64,
    r13: u64,
    r12: u64,
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rdi: u64,
    rsi: u64,
    rbp: u64,
    rbx: u64,
    rdx: u64,
    rcx: u64,
    rax: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

core::arch::global_asm!(
    r#"
    .section .text.smp_entries, "ax"
    /* #BP, on its own stack (IST): every general register, then the x87/SSE
       state (the handler is compiled Rust), for the handler to rewrite the
       interrupted context. */
    .globl smp_bp_entry
smp_bp_entry:
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rbx
    pushq %rbp
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $512, %rsp
    fxsave64 (%rsp)
    leaq 512(%rsp), %rdi
    cld
    call {trap}
    fxrstor64 (%rsp)
    addq $512, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rbp
    popq %rbx
    popq %rdx
    popq %rcx
    popq %rax
    iretq

    /* The sync IPI: acknowledge, end the interrupt, return. `iretq` is
       serializing: after it this CPU fetches the bytes written before the
       IPI was sent. */
    .globl smp_ipi_entry
smp_ipi_entry:
    pushq %rax
    lock incq {acks}(%rip)
    movabsq ${eoi}, %rax
    movl $0, (%rax)
    popq %rax
    iretq

    .globl smp_spurious_entry
smp_spurious_entry:
    iretq
    .text
    "#,
    trap = sym bp_trap,
    acks = sym SYNC_ACKS,
    eoi = const apic::EOI_ADDR,
    options(att_syntax)
);

unsafe extern "C" {
    static smp_bp_entry: u8;
    static smp_ipi_entry: u8;
    static smp_spurious_entry: u8;
}

/// Routes `#BP` to the emulating handler, and the sync and spurious
/// vectors to theirs, each on its own interrupt stack.
pub fn install_gates() {
    idt::set_gate(3, &raw const smp_bp_entry as usize, IST_BP);
    idt::set_gate(SYNC_VECTOR, &raw const smp_ipi_entry as usize, IST_IPI);
    idt::set_gate(
        apic::SPURIOUS_VECTOR,
        &raw const smp_spurious_entry as usize,
        IST_IPI,
    );
}

/// `#BP`: a CPU hit an `int3` the INT3 protocol wrote. Anything else is
/// reported like any other exception.
extern "C" fn bp_trap(f: &mut BpFrame) {
    let mut t = TrapFrame {
        rip: f.rip,
        rsp: f.rsp,
        rflags: f.rflags,
        regs: [
            f.rax, f.rcx, f.rdx, f.rbx, f.rsp, f.rbp, f.rsi, f.rdi, f.r8, f.r9, f.r10, f.r11,
            f.r12, f.r13, f.r14, f.r15,
        ],
    };
    // SAFETY: `t` is the interrupted context; the handler runs on its own
    // stack (IST), so the 8 bytes below the interrupted `rsp` are free for
    // an emulated call's return address, as a real call would use them.
    match unsafe { SLOT.emulate(&mut t) } {
        TrapAction::Emulated => {
            f.rip = t.rip;
            f.rsp = t.rsp;
            COUNTS[cpus::current()]
                .traps
                .fetch_add(1, Ordering::Relaxed);
        }
        TrapAction::Restarted => {
            f.rip = t.rip;
            let c = &COUNTS[cpus::current()];
            c.restarts.fetch_add(1, Ordering::Relaxed);
            if STATE.load(Ordering::SeqCst) & STABLE != 0 {
                c.restarts_stable.fetch_add(1, Ordering::Relaxed);
            }
        }
        TrapAction::NotOurs => {
            println!(
                "altpatch kernel: EXCEPTION 3 (#BP breakpoint) not at a site being patched: \
                 rip {:#x} rsp {:#x} cpu {}",
                f.rip,
                f.rsp,
                cpus::current()
            );
            crate::support::exit(idt::EXCEPTION_EXIT + 3)
        }
    }
}
