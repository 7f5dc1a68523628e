//! Resolving the kernel's ifuncs at boot: GCC's (an IRELATIVE relocation
//! and the PLT/GOT call sites bound to it) and the Rust `ifunc!`.

use altpatch::cpu::Features;
use altpatch::{DirectPoke, Image};

use crate::{print, support};

unsafe extern "C" {
    /// GCC's ifunc (src/kifunc.c), and a C function calling it twice.
    fn c_ones(x: u64) -> u64;
    safe fn c_ones_twice(x: u64) -> u64;
    static __rela_iplt_start: u8;
    static __rela_iplt_end: u8;
}

/// A call through the ifunc's GOT slot, as `-fno-plt` code makes it.
#[inline(never)]
fn c_ones_via_got(x: u64) -> u64 {
    let r: u64;
    // SAFETY: calls the C ifunc (resolved before this runs) with the C ABI;
    // caller-saved registers are declared clobbered.
    unsafe {
        core::arch::asm!(
            "call qword ptr [rip + c_ones@GOTPCREL]",
            inout("rdi") x => _,
            out("rax") r,
            clobber_abi("C"),
        )
    };
    r
}

/// Resolves the kernel's ifuncs: the C one's IRELATIVE entry (its resolver
/// reads the published snapshot), then every call site direct — the Rust
/// `ifunc!` stub and sites, and the C ifunc's PLT-bound and GOT sites.
pub fn resolve(image: &Image<'_>, features: &Features) -> Result<(), &'static str> {
    let sites: alloc::vec::Vec<altpatch::sites::Site> = match image.embedded_sites() {
        Ok(Some(t)) => t.iter().collect(),
        _ => return Err("no embedded site table"),
    };
    // SAFETY: the linker script brackets the IRELATIVE entries with these
    // symbols; the table is in the loaded image.
    let table = unsafe {
        altpatch::ifunc::IrelativeTable::from_bounds(
            &raw const __rela_iplt_start,
            &raw const __rela_iplt_end,
            0,
        )
    }
    .map_err(|_| "bad IRELATIVE bounds")?;
    // SAFETY: the GOT slots are in the kernel's writable data, nothing has
    // called the ifunc yet, and the resolvers follow the glibc convention.
    let t = support::rdtsc();
    let irel = unsafe { altpatch::ifunc::process_irelative(image, features, &table) };
    let irel = irel.map_err(|e| {
        println!("ifunc: IRELATIVE: {e}");
        "IRELATIVE processing failed"
    })?;
    support::report_cycles("ifunc IRELATIVE", t, irel.resolved.len());
    println!("ifunc: {} IRELATIVE entries resolved", irel.resolved.len());
    // Calls through the PLT and the GOT now reach the chosen function.
    let (c_before, lazy_before) = (c_ones_twice(0b1011), crate::kernel_ones(0b1011));
    // SAFETY: text is writable, this CPU is the only one.
    let mut poke = unsafe { DirectPoke::for_features(features) };
    let t = support::rdtsc();
    // SAFETY: as above.
    let plt = unsafe { altpatch::ifunc::apply_plt_sites(image, &sites, Some(&table), &mut poke) };
    let plt = plt.map_err(|e| {
        println!("ifunc: PLT sites: {e}");
        "rewriting PLT sites failed"
    })?;
    support::report_cycles(
        "ifunc PLT sites",
        t,
        plt.rewritten.len() + plt.already_direct,
    );
    let t = support::rdtsc();
    // SAFETY: as above.
    let rust = unsafe { altpatch::ifunc::apply(image, features, &sites, &mut poke) };
    let rust = rust.map_err(|e| {
        println!("ifunc: {e}");
        "applying ifunc! failed"
    })?;
    support::report_cycles("ifunc! sites", t, rust.applied.edits);
    print!("{rust}");
    let direct = |f: usize| {
        sites
            .iter()
            .filter(|s| s.kind == altpatch::sites::SiteKind::Ifunc)
            .filter(|s| {
                // SAFETY: sites lie in the kernel's text.
                let b = unsafe { core::slice::from_raw_parts(s.addr as *const u8, s.len as usize) };
                let at = b.len() - 5;
                (b[at] == 0xe8 || b[at] == 0xe9)
                    && s.addr
                        + b.len()
                        + i32::from_le_bytes([b[at + 1], b[at + 2], b[at + 3], b[at + 4]]) as isize
                            as usize
                        == f
            })
            .count()
    };
    let c_impl = irel.resolved.first().map_or(0, |r| r.2);
    let k_impl = crate::kernel_ones::ifunc().resolved().unwrap_or(0);
    println!(
        "ifunc sites: c plt+got rewritten={} direct to c impl={} rust direct={} rust runs={}",
        plt.rewritten.len(),
        direct(c_impl),
        direct(k_impl),
        crate::kernel_ones::ifunc().resolver_runs()
    );
    println!(
        "ifunc calls: c={} twice={} got={} rust={} (before: twice={c_before} rust={lazy_before})",
        // SAFETY: the C ifunc is resolved.
        unsafe { c_ones(0b1011) },
        c_ones_twice(0b1011),
        c_ones_via_got(0b1011),
        crate::kernel_ones(0b1011),
    );
    Ok(())
}
