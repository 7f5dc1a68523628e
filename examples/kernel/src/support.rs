//! What a freestanding Rust image needs: memory routines (strong
//! definitions over `compiler_builtins`' weak ones, callable from the C
//! part), an allocator, a panic handler; plus the serial port and QEMU's
//! debug-exit device.

use core::alloc::{GlobalAlloc, Layout};
use core::arch::asm;
use core::cell::UnsafeCell;
use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};

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

/// The heap: power-of-two size classes from 16 bytes to 1 MiB over a static
/// arena, each with a free list, behind a spin lock (the SMP test updates
/// static calls and keys ten thousand times, each update allocating and
/// freeing its plan). Larger blocks are carved once and never reused.
/// No interrupt handler allocates, so the lock cannot be re-entered.
struct Heap {
    lock: AtomicBool,
    arena: UnsafeCell<[u8; ARENA]>,
    /// Bytes of the arena handed out so far.
    next: UnsafeCell<usize>,
    /// Head of each class's free list (0: empty); a free block holds the
    /// next block's address.
    free: UnsafeCell<[usize; CLASSES]>,
}

const ARENA: usize = 16 << 20;
const MIN_CLASS: u32 = 4;
const CLASSES: usize = 17; // 16 B ..= 1 MiB

// SAFETY: every field behind the UnsafeCells is touched only with `lock`
// held.
unsafe impl Sync for Heap {}

impl Heap {
    fn class(layout: Layout) -> Option<usize> {
        let size = layout.size().max(layout.align()).max(1 << MIN_CLASS);
        let c = size.next_power_of_two().trailing_zeros() - MIN_CLASS;
        ((c as usize) < CLASSES).then_some(c as usize)
    }

    fn locked<R>(&self, f: impl FnOnce() -> R) -> R {
        while self
            .lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        let r = f();
        self.lock.store(false, Ordering::Release);
        r
    }

    /// Carves `size` bytes aligned to `align` from the arena (lock held).
    ///
    /// # Safety
    ///
    /// The caller holds the lock.
    unsafe fn carve(&self, size: usize, align: usize) -> *mut u8 {
        let base = self.arena.get() as usize;
        // SAFETY: the lock is held.
        let next = unsafe { &mut *self.next.get() };
        let start = (base + *next + align - 1) & !(align - 1);
        if start + size > base + ARENA {
            return core::ptr::null_mut();
        }
        *next = start + size - base;
        start as *mut u8
    }
}

// SAFETY: blocks come from disjoint parts of the arena (carved once) or
// from a free list of blocks of exactly that class, which `dealloc` fills
// only with blocks no longer in use; a class block is aligned to its size,
// which is at least the layout's alignment.
unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.locked(|| match Heap::class(layout) {
            Some(c) => {
                // SAFETY: the lock is held.
                let free = unsafe { &mut *self.free.get() };
                if free[c] != 0 {
                    let block = free[c];
                    // SAFETY: a free block's first word is the next one.
                    free[c] = unsafe { (block as *const usize).read() };
                    return block as *mut u8;
                }
                let size = 1usize << (c as u32 + MIN_CLASS);
                // SAFETY: the lock is held.
                unsafe { self.carve(size, size) }
            }
            // SAFETY: the lock is held.
            None => unsafe { self.carve(layout.size(), layout.align()) },
        })
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if let Some(c) = Heap::class(layout) {
            self.locked(|| {
                // SAFETY: the lock is held; `ptr` is a block of class `c`
                // (same layout as allocated) that its owner gave up, at
                // least 16 bytes long.
                unsafe {
                    let free = &mut *self.free.get();
                    (ptr as *mut usize).write(free[c]);
                    free[c] = ptr as usize;
                }
            })
        }
    }
}

#[global_allocator]
static ALLOC: Heap = Heap {
    lock: AtomicBool::new(false),
    arena: UnsafeCell::new([0; ARENA]),
    next: UnsafeCell::new(0),
    free: UnsafeCell::new([0; CLASSES]),
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

/// `altpatch.debug` (a summary per plan) or `altpatch.debug=all` (every
/// edit) on the command line lists each applied plan over serial: the
/// kernel's `ALTPATCH_DEBUG`.
pub fn debug_listing(cmdline: &str) {
    use altpatch::plan::{DebugLevel, set_debug_sink};
    fn serial(listing: &dyn core::fmt::Display) {
        println!("{listing}");
    }
    for w in cmdline.split_ascii_whitespace() {
        match w {
            "altpatch.debug" => set_debug_sink(serial, DebugLevel::Summary),
            "altpatch.debug=all" => set_debug_sink(serial, DebugLevel::All),
            _ => {}
        }
    }
}
