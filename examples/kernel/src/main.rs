//! A minimal multiboot x86-64 kernel that links `altpatch` without `std`,
//! takes the CPU feature snapshot, and patches its own text at boot.
//!
//! Build and boot (see `tests/qemu.rs`, which does exactly this):
//!
//! ```text
//! cd examples/kernel && cargo build --release
//! cargo run --manifest-path ../../Cargo.toml --features cli --bin altpatch -- \
//!     embed target/x86_64-unknown-none/release/altpatch-kernel
//! qemu-system-x86_64 -accel tcg -cpu Nehalem -display none -serial stdio \
//!     -device isa-debug-exit,iobase=0xf4,iosize=0x04 -no-reboot \
//!     -kernel target/x86_64-unknown-none/release/altpatch-kernel -append "altpatch=nopopcnt"
//! ```
//!
//! The command line (`-append`) may hold `altpatch=<overrides>`,
//! `dump-cpuid` (print a CPUID dump in altpatch's replay format and stop;
//! the test fixtures were recorded this way), `fault=ud|pf|de|bp|df` (fault on
//! purpose: the exception report, see `idt.rs`) and `altpatch.debug[=all]`
//! (list every applied plan over serial).
//!
//! Booted with more CPUs (`-smp 4 -accel tcg,thread=multi`), it starts
//! them from the ACPI MADT (`acpi.rs`, `cpus.rs`) and, while they run
//! through a static call, a static key, an ifunc and an alternative,
//! re-targets the call and flips the key 10 000 times with the INT3
//! protocol over IPI syncs (`smp.rs`).
//!
//! # What this kernel provides in place of an OS backend
//!
//! altpatch's OS contract (`ARCHITECTURE.md`, "Adding an OS") has a lower
//! half a freestanding build fills by itself (`altpatch-host`'s
//! `Freestanding`: a spin flag per update lock, no environment, no kernel
//! verdict) and an upper half a kernel provides through public types:
//!
//! | the contract asks for | a Linux process has | this kernel gives |
//! |---|---|---|
//! | the running program's image | `Image::current` from the loader | `Image::current().with_text(__text_start..__text_end)` (below) |
//! | the environment (`ALTPATCH=`) | `environ`, `/proc/self/environ` | its command line: `Overrides::from_cmdline` (below) |
//! | the kernel's verdict | sysfs | its own decision: `Policy::choose(features, overrides)` (`retpolines.rs`) |
//! | writing text, published | `LinuxPoke` | `DirectPoke` at boot; `Int3Poke` over an IPI-syncing poke on four CPUs (`smp.rs`) |
//! | trap delivery | a `SIGTRAP` handler | its `#BP` handler feeding the `TrapSlot` (`traps.rs`) |
//! | fork repair | `pthread_atfork` | — (no fork) |

#![no_std]
#![no_main]

extern crate alloc;

mod boot;
#[macro_use]
mod support;
mod acpi;
mod alternatives;
mod apic;
mod cpus;
mod idt;
mod ifuncs;
mod retpolines;
mod smp;
mod traps;

use core::ffi::CStr;

use altpatch::cpu::{self, Features, HostCpuid, Overrides};
use altpatch::static_key::{KeyIndex, StaticFalseKey};
use altpatch::{DirectPoke, Image, static_branch_unlikely, static_call};
use support::{EXIT_FAILURE, EXIT_SUCCESS, exit};

unsafe extern "C" {
    static __text_start: u8;
    static __text_end: u8;
}

// Room for the sites `altpatch embed` finds in the linked kernel: the kernel
// has no file system to read relocations from at boot.
altpatch::reserve_site_table!(4096);

extern "C" fn seven() -> u64 {
    7
}

/// An indirect call through the `%rax` thunk (altpatch's), as GCC's
/// retpoline-built code makes; the kernel's Rust code uses `%r11`.
#[inline(never)]
fn call_via_thunk(f: extern "C" fn() -> u64) -> u64 {
    let r: u64;
    // SAFETY: calls a safe extern "C" function through a thunk that jumps to
    // it; caller-saved registers are declared clobbered, the stack is
    // aligned (no `nostack`).
    unsafe {
        core::arch::asm!("call __x86_indirect_thunk_rax", inout("rax") f => r, clobber_abi("C"))
    };
    r
}

extern "C" fn k_double(x: u64) -> u64 {
    x * 2
}

extern "C" fn k_triple(x: u64) -> u64 {
    x * 3
}

static_call! {
    /// Scales by two, or by three once updated at boot.
    fn kernel_scale(x: u64) -> u64 = k_double;
}

extern "C" fn k_ones_portable(x: u64) -> u64 {
    alternatives::ones_portable(x)
}

extern "C" fn k_ones_movbe(x: u64) -> u64 {
    // Tagged so the test can see which implementation the resolver chose.
    3000 + x.count_ones() as u64
}

fn pick_k_ones(f: &Features) -> extern "C" fn(u64) -> u64 {
    if f.has(altpatch::cpu::Feature::Movbe) {
        k_ones_movbe
    } else {
        k_ones_portable
    }
}

altpatch::ifunc! {
    /// Counts set bits; the implementation is chosen once, at boot.
    fn kernel_ones(x: u64) -> u64 = pick_k_ones;
}

/// Off until boot enables it.
static K_BOOT: StaticFalseKey = StaticFalseKey::new();

#[inline(never)]
fn scaled(x: u64) -> u64 {
    // `black_box` keeps this a `call` site rather than a tail `jmp`.
    core::hint::black_box(kernel_scale(x))
}

#[inline(never)]
fn boot_key() -> bool {
    static_branch_unlikely!(K_BOOT)
}

/// The multiboot command line, if the loader passed one.
fn cmdline(info: u32) -> &'static str {
    if info == 0 {
        return "";
    }
    let info = info as usize as *const u32;
    // SAFETY: the loader passed the address of a multiboot info structure in
    // identity-mapped low memory; `flags` is its first word, and bit 2 says
    // the word at offset 16 is the physical address of a C string.
    unsafe {
        if info.read() & (1 << 2) == 0 {
            return "";
        }
        let s = info.add(4).read() as usize as *const core::ffi::c_char;
        CStr::from_ptr(s).to_str().unwrap_or("")
    }
}

/// Enables the x87, SSE, AVX and (where complete) AVX-512 state in XCR0, so
/// the feature snapshot can report AVX as usable: the OS half of the AVX
/// check that `Features` makes.
pub(crate) fn enable_xsave() {
    let leaf1 = raw_cpuid_leaf(1, 0);
    if leaf1.2 & (1 << 26) == 0 {
        return; // no XSAVE
    }
    let leaf_d = raw_cpuid_leaf(0xd, 0);
    let supported = ((leaf_d.3 as u64) << 32) | leaf_d.0 as u64;
    let mut xcr0 = supported & 0x7; // x87 | SSE | AVX
    if supported & 0xe0 == 0xe0 {
        xcr0 |= 0xe0; // opmask | ZMM_Hi256 | Hi16_ZMM
    }
    // SAFETY: CPUID says XSAVE exists; setting CR4.OSXSAVE then XCR0 to a
    // subset of the supported state (always including x87) is valid.
    unsafe {
        core::arch::asm!(
            "mov {t}, cr4",
            "or {t}, {bit}",
            "mov cr4, {t}",
            t = out(reg) _, bit = in(reg) 1u64 << 18,
            options(nostack)
        );
        core::arch::asm!("xsetbv", in("ecx") 0u32, in("eax") xcr0 as u32, in("edx") (xcr0 >> 32) as u32,
            options(nostack));
    }
}

fn raw_cpuid_leaf(leaf: u32, sub: u32) -> (u32, u32, u32, u32) {
    use altpatch::cpu::CpuidSource;
    let r = HostCpuid::new().cpuid(leaf, sub);
    (r.eax, r.ebx, r.ecx, r.edx)
}

#[unsafe(no_mangle)]
extern "C" fn kmain(multiboot_info: u32) -> ! {
    support::serial_init();
    // Per-CPU tables first: the #BP and IPI gates run on IST stacks.
    cpus::prepare();
    cpus::load(0);
    idt::install();
    traps::install_gates();
    enable_xsave();
    let cmdline = cmdline(multiboot_info);
    println!("altpatch kernel: cmdline `{cmdline}`");
    idt::deliberate(cmdline);
    support::debug_listing(cmdline);

    if cmdline.split_ascii_whitespace().any(|w| w == "dump-cpuid") {
        // With IA32_ARCH_CAPABILITIES where CPUID says it exists (reading
        // it otherwise faults): the dump then carries what the MSR says
        // (enhanced IBRS, ITS_NO).
        let arch_capabilities = raw_cpuid_leaf(7, 0).3 & (1 << 29) != 0;
        let source = if arch_capabilities {
            HostCpuid::with_msr_reader(read_msr)
        } else {
            HostCpuid::new()
        };
        println!("{}", cpu::dump(&source));
        println!("altpatch kernel: dump done");
        exit(EXIT_SUCCESS);
    }

    let overrides = match Overrides::from_cmdline(cmdline) {
        Ok(o) => o,
        Err(e) => {
            println!("altpatch kernel: bad command line: {e}");
            exit(EXIT_FAILURE);
        }
    };
    // At CPL 0 the kernel can read IA32_ARCH_CAPABILITIES, which shows
    // enhanced IBRS (a process cannot, and asks Linux instead).
    let features =
        Features::from_source(&HostCpuid::with_msr_reader(read_msr)).with_overrides(&overrides);
    println!("features: {features}");

    // SAFETY: the linker script brackets all of the kernel's code with these
    // symbols, and the boot page tables map it readable (and writable).
    let image = unsafe {
        let start = &raw const __text_start as usize;
        let end = &raw const __text_end as usize;
        Image::current().with_text(start..end)
    };
    println!(
        "image: text {:#x}..{:#x}, {} patch points",
        image.text()[0].start,
        image.text()[0].end,
        image.patch_points().len()
    );

    if let Err(e) = alternatives::patch_answer(&image, &features) {
        println!("altpatch kernel: FAILED: {e}");
        exit(EXIT_FAILURE);
    }
    if let Err(e) = alternatives::apply_alternatives(&image, &features) {
        println!("altpatch kernel: FAILED: {e}");
        exit(EXIT_FAILURE);
    }
    report_sites(&image);
    if let Err(e) = ifuncs::resolve(&image, &features) {
        println!("altpatch kernel: FAILED: {e}");
        exit(EXIT_FAILURE);
    }
    if let Err(e) = retpolines::apply(&image, &features, &overrides) {
        println!("altpatch kernel: FAILED: {e}");
        exit(EXIT_FAILURE);
    }
    if let Err(e) = update_calls_and_keys(&image, &features) {
        println!("altpatch kernel: FAILED: {e}");
        exit(EXIT_FAILURE);
    }
    let sites: alloc::vec::Vec<altpatch::sites::Site> = match image.embedded_sites() {
        Ok(Some(t)) => t.iter().collect(),
        _ => alloc::vec::Vec::new(),
    };
    if let Err(e) = smp::run(&image, &features, &sites) {
        println!("altpatch kernel: FAILED: {e}");
        exit(EXIT_FAILURE);
    }
    println!("altpatch kernel: ok");
    exit(EXIT_SUCCESS)
}

/// The entries the crate handed out start with `endbr64` (an IBT landing
/// pad), and an indirect call through each reaches the current target
/// past it: the static call's trampoline (now `jmp k_triple`) and the
/// ifunc's stub.
fn cet_entries() {
    let tramp = kernel_scale::static_call().trampoline();
    let stub = kernel_ones::ifunc().stub();
    // SAFETY: both are code in the kernel's text, at least 16 bytes each.
    let starts = |at: usize| unsafe { core::slice::from_raw_parts(at as *const u8, 4) };
    let endbr = |at: usize| starts(at) == altpatch::x86::ENDBR64;
    // SAFETY: each address is a C-ABI `fn(u64) -> u64` (the trampoline's
    // and the stub's declared signature).
    let call = |at: usize| unsafe { core::mem::transmute::<usize, extern "C" fn(u64) -> u64>(at) };
    let (via_tramp, via_stub) = (
        core::hint::black_box(call(tramp))(7),
        core::hint::black_box(call(stub))(0b1011),
    );
    println!(
        "cet: trampoline endbr64={} stub endbr64={} indirect: scale={via_tramp} ones={via_stub}",
        endbr(tramp),
        endbr(stub),
    );
}

/// Re-targets a static call (trampoline and call sites, from the embedded
/// site table) and flips a static key through the INT3 protocol.
fn update_calls_and_keys(image: &Image<'_>, features: &Features) -> Result<(), &'static str> {
    let sites: alloc::vec::Vec<altpatch::sites::Site> = match image.embedded_sites() {
        Ok(Some(t)) => t.iter().collect(),
        _ => return Err("no embedded site table"),
    };
    // SAFETY: text is writable, this CPU is the only one, nothing runs the
    // static call during the update.
    let mut poke = unsafe { DirectPoke::for_features(features) };
    let before = scaled(7);
    // SAFETY: as above.
    let r = unsafe { kernel_scale::update_with(k_triple, image, &sites, &mut poke) }
        .map_err(|_| "static call update failed")?;
    println!(
        "static call: before={before} after={} inlined={} trampoline={}",
        scaled(7),
        r.inlined,
        r.trampoline
    );
    cet_entries();

    let index = KeyIndex::new(image);
    let key_before = boot_key();
    // The INT3 protocol over the direct poke: on one CPU no thread can hit
    // a site mid-update, but the same code serves an SMP kernel whose
    // poke syncs with IPIs and whose #BP handler calls LiveSites::emulate.
    // SAFETY: as above.
    let inner = unsafe { DirectPoke::for_features(features) };
    let mut live = altpatch::poke::live::Int3Poke::new(inner);
    // SAFETY: as above; each key site is one instruction.
    let r = unsafe { K_BOOT.set_with(true, image, &index, &mut live) }
        .map_err(|_| "static key flip failed")?;
    println!(
        "static key: before={key_before} after={} sites={}",
        boot_key(),
        r.written
    );
    Ok(())
}

/// Lists the compiler-generated sites from the table embedded after linking.
fn report_sites(image: &Image<'_>) {
    let via_thunk = call_via_thunk(seven);
    match image.embedded_sites() {
        Ok(Some(table)) => {
            let thunks = table
                .iter()
                .filter(|s| matches!(s.kind, altpatch::sites::SiteKind::IndirectThunk(_)))
                .count();
            let here = call_via_thunk as fn(extern "C" fn() -> u64) -> u64 as usize;
            let ours = table.iter().any(|s| s.addr > here && s.addr < here + 64);
            println!(
                "sites: embedded {} ({thunks} thunk), call_via_thunk listed: {ours}",
                table.len()
            );
        }
        Ok(None) => println!("sites: no embedded table"),
        Err(e) => println!("sites: bad embedded table: {e}"),
    }
    println!("thunk call: {via_thunk}");
}

/// `print!` without a newline (plans print their own line breaks).
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = write!($crate::support::Serial, $($arg)*);
    }};
}

/// `rdmsr` for the feature snapshot. Detection asks only for
/// `IA32_ARCH_CAPABILITIES` (0x10a) and only when CPUID says the CPU has it,
/// so the MSR exists and the read cannot fault; anything else is refused.
fn read_msr(index: u32) -> Option<u64> {
    const IA32_ARCH_CAPABILITIES: u32 = 0x10a;
    if index != IA32_ARCH_CAPABILITIES {
        return None;
    }
    let (lo, hi): (u32, u32);
    // SAFETY: ring 0, and the MSR is architectural when CPUID.7.0:EDX[29]
    // is set, which is the only case detection calls this in.
    unsafe {
        core::arch::asm!("rdmsr", in("ecx") index, out("eax") lo, out("edx") hi,
            options(nomem, nostack, preserves_flags));
    }
    Some(((hi as u64) << 32) | lo as u64)
}
