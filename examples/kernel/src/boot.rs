//! Multiboot header and the 32-bit entry that switches to long mode.
//!
//! QEMU's `-kernel` loader finds the multiboot header in the first 8 KiB of
//! the file and, because the a.out-kludge flag (bit 16) is set, copies the
//! image to the addresses the header gives instead of parsing the (64-bit)
//! ELF, which it would refuse. It enters `_start32` in 32-bit protected mode
//! with paging off, EAX = 0x2BADB002 and EBX = the multiboot info address.
//!
//! The entry first checks for long mode (CPUID 0x80000001 EDX.LM); without
//! it, it says so on the serial port and leaves QEMU with status 37.
//! Then it identity-maps the first GiB with 2 MiB pages (read, write,
//! execute: the kernel patches its own text through its own addresses), turns
//! on PAE, long mode and paging, loads a 64-bit GDT, enables SSE (the C
//! part and the alternatives' replacements use it; Rust code for
//! x86_64-unknown-none does not), and calls `kmain(multiboot_info)`.

core::arch::global_asm!(
    r#"
    .set MB_MAGIC, 0x1BADB002
    .set MB_FLAGS, 0x00010000
    .section .multiboot, "a"
    .balign 4
multiboot_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
    .long multiboot_header
    .long __load_start
    .long __load_end
    .long __bss_end
    .long _start32

    .section .text.boot, "ax"
    .code32
    .globl _start32
_start32:
    cli
    movl $boot_stack_top, %esp
    movl %ebx, multiboot_info

    /* Long mode (CPUID 0x80000001 EDX bit 29), or say why not and leave. */
    movl $0x80000000, %eax
    cpuid
    cmpl $0x80000001, %eax
    jb no_long_mode
    movl $0x80000001, %eax
    cpuid
    btl $29, %edx
    jnc no_long_mode

    /* pml4[0] -> pdpt, pdpt[0] -> pd, pd[i] = i * 2 MiB, present|write|huge */
    movl $boot_pdpt, %eax
    orl $3, %eax
    movl %eax, boot_pml4
    movl $boot_pd, %eax
    orl $3, %eax
    movl %eax, boot_pdpt
    xorl %ecx, %ecx
1:
    movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax
    movl %eax, boot_pd(,%ecx,8)
    incl %ecx
    cmpl $512, %ecx
    jne 1b

    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $(1 << 5), %eax          /* PAE */
    movl %eax, %cr4
    movl $0xC0000080, %ecx       /* EFER */
    rdmsr
    orl $(1 << 8), %eax          /* LME */
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax        /* PG | PE */
    movl %eax, %cr0
    lgdt boot_gdt_ptr
    ljmp $0x08, $long_mode

    .code64
long_mode:
    movabsq $boot_stack_top, %rsp
    call cpu_long_mode_setup
    movl multiboot_info(%rip), %edi
    call kmain
2:
    hlt
    jmp 2b

    /* What every CPU does first in long mode, with a stack (the APs call it
       too, cpus.rs): flat data segments, and SSE on (CR0.EM = 0, CR0.MP = 1;
       CR4.OSFXSR | CR4.OSXMMEXCPT), which the C part and the
       alternatives' replacements use. */
    .globl cpu_long_mode_setup
cpu_long_mode_setup:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    movq %cr0, %rax
    andq $~(1 << 2), %rax
    orq $(1 << 1), %rax
    movq %rax, %cr0
    movq %cr4, %rax
    orq $(3 << 9), %rax
    movq %rax, %cr4
    ret

    .code32
    /* The serial port works unprogrammed under QEMU: one byte at a time.
       Exit value 0x12: QEMU exits with status 37. */
no_long_mode:
    movl $no_long_mode_msg, %esi
3:
    movb (%esi), %al
    testb %al, %al
    jz 4f
    movw $0x3f8, %dx
    outb %al, %dx
    incl %esi
    jmp 3b
4:
    movw $0xf4, %dx
    movl $0x12, %eax
    outl %eax, %dx
5:
    hlt
    jmp 5b
    .code64

    .section .rodata
no_long_mode_msg:
    .asciz "altpatch kernel: this CPU has no long mode (CPUID 0x80000001 EDX.LM = 0); the kernel needs x86-64\r\n"
    .balign 8
boot_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF     /* 0x08: 64-bit code */
    .quad 0x00CF92000000FFFF     /* 0x10: data */
boot_gdt_ptr:
    .word boot_gdt_ptr - boot_gdt - 1
    .long boot_gdt

    .section .bss
    .balign 4096
    /* Global: the APs start on these tables (cpus.rs), and apic.rs maps
       the local APIC into them. */
    .globl boot_pml4, boot_pdpt
boot_pml4: .skip 4096
boot_pdpt: .skip 4096
boot_pd: .skip 4096
boot_stack: .skip 65536
boot_stack_top:
    .balign 4
multiboot_info: .skip 4

    .text
    "#,
    options(att_syntax)
);
