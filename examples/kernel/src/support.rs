//! What a freestanding Rust image needs and the host target's libc would
//! otherwise provide: memory routines, an allocator, a panic handler; plus
//! the serial port and QEMU's debug-exit device.

use core::alloc::{GlobalAlloc, Layout};
use core::arch::asm;
use core::cell::UnsafeCell;
use core::fmt;
use core::sync::atomic::{AtomicUsize, Ordering};

const COM1: u16 = 0x3f8;
/// QEMU `-device isa-debug-exit,iobase=0xf4`: the process exits with
/// `(value << 1) | 1`.
const DEBUG_EXIT: u16 = 0xf4;
/// Exit value for success: QEMU exits with status 33.
pub const EXIT_SUCCESS: u32 = 0x10;
/// Exit value for failure: QEMU exits with status 35.
pub const EXIT_FAILURE: u32 = 0x11;

fn outb(port: u16, value: u8) {
    // SAFETY: port I/O to the legacy serial port, which has no memory effects.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: reads a serial port status register.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Programs COM1 for 115200 8N1.
pub fn serial_init() {
    outb(COM1 + 1, 0x00); // no interrupts
    outb(COM1 + 3, 0x80); // DLAB
    outb(COM1, 0x01); // divisor 1: 115200
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); // 8N1
    outb(COM1 + 2, 0xc7); // FIFO
    outb(COM1 + 4, 0x03);
}

/// `core::fmt` sink writing to COM1.
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                self.put(b'\r');
            }
            self.put(b);
        }
        Ok(())
    }
}

impl Serial {
    fn put(&mut self, b: u8) {
        while inb(COM1 + 5) & 0x20 == 0 {}
        outb(COM1, b);
    }
}

/// `println!` to the serial port.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::support::Serial, $($arg)*);
    }};
}

/// The time-stamp counter (under TCG, QEMU's virtual one).
pub fn rdtsc() -> u64 {
    // SAFETY: `rdtsc` only reads the counter (CR4.TSD is clear).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Prints the cycles boot-time patching took for one mechanism since
/// `start`: `cycles: <what> <total> total, <per site> per site (<n> sites)`.
pub fn report_cycles(what: &str, start: u64, sites: usize) {
    let total = rdtsc().wrapping_sub(start);
    println!(
        "cycles: {what} {total} total, {} per site ({sites} sites)",
        total / sites.max(1) as u64
    );
}

/// Leaves QEMU with `value` (see [`EXIT_SUCCESS`]).
pub fn exit(value: u32) -> ! {
    // SAFETY: writing the debug-exit port ends the VM.
    unsafe { asm!("out dx, eax", in("dx") DEBUG_EXIT, in("eax") value, options(nomem, nostack)) };
    loop {
        // SAFETY: halting with interrupts disabled parks the CPU.
        unsafe { asm!("cli; hlt", options(nomem, nostack)) };
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    println!("PANIC: {info}");
    exit(EXIT_FAILURE)
}

/// A bump allocator over a static arena; freeing is a no-op (the kernel
/// allocates a few plans at boot and stops).
struct Bump {
    arena: UnsafeCell<[u8; 8 << 20]>,
    next: AtomicUsize,
}

// SAFETY: allocation hands out disjoint ranges via an atomic cursor.
unsafe impl Sync for Bump {}

// SAFETY: every returned block is inside the arena, aligned as asked, and
// never handed out twice.
unsafe impl GlobalAlloc for Bump {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let base = self.arena.get() as usize;
        let size = 8 << 20;
        let mut cur = self.next.load(Ordering::Relaxed);
        loop {
            let start = (base + cur + layout.align() - 1) & !(layout.align() - 1);
            let end = start - base + layout.size();
            if end > size {
                return core::ptr::null_mut();
            }
            match self
                .next
                .compare_exchange(cur, end, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return start as *mut u8,
                Err(now) => cur = now,
            }
        }
    }

    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: Layout) {}
}

#[global_allocator]
static ALLOC: Bump = Bump {
    arena: UnsafeCell::new([0; 8 << 20]),
    next: AtomicUsize::new(0),
};

// The compiler lowers copies and comparisons to these; with no libc they
// must be defined here, in asm or with volatile accesses so they are never
// lowered back into calls to themselves.

/// # Safety
/// `dst` and `src` are valid for `n` bytes and do not overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges; rep movsb copies forwards.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
            options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// `dst` and `src` are valid for `n` bytes (they may overlap).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        // SAFETY: forward copy is correct when dst does not start inside src.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: copy backwards (DF=1) from the last byte; DF is restored.
    unsafe {
        asm!("std", "rep movsb", "cld",
            inout("rcx") n => _, inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
            options(nostack));
    }
    dst
}

/// # Safety
/// `dst` is valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8,
            options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// Both pointers are valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: in bounds by the caller's guarantee; volatile keeps the
        // loop from being turned back into a memcmp call.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return x as i32 - y as i32;
        }
    }
    0
}

/// # Safety
/// Both pointers are valid for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: forwarded.
    unsafe { memcmp(a, b, n) }
}

/// # Safety
/// `s` points to a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn strlen(s: *const u8) -> usize {
    let mut n = 0;
    // SAFETY: the caller guarantees a terminator.
    while unsafe { s.add(n).read_volatile() } != 0 {
        n += 1;
    }
    n
}

// The precompiled `alloc` for the host target is built with unwinding, so
// its landing pads name these symbols. This kernel aborts on panic, so no
// unwind ever starts and neither is reached.

/// Never called: the kernel is built with `panic = "abort"`.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}

/// Never called: the kernel is built with `panic = "abort"`.
#[unsafe(no_mangle)]
pub extern "C" fn _Unwind_Resume() -> ! {
    exit(EXIT_FAILURE)
}
