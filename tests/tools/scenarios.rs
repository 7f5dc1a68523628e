//! The child side: a process whose key and static call share a text page
//! with a function a uprobe is attached to, updated by each strategy and
//! publication while the probe is attached, detached, and attached again.

use altpatch::os::linux::set_live_publication;
use altpatch::static_key::{KeyIndex, StaticFalseKey};
use altpatch::{Image, LinuxPoke, Publish, static_branch_unlikely, static_call};

use super::uprobe::{Uprobe, byte, file_byte, mapping};

/// Calls per phase.
pub const N: u64 = 1000;

pub extern "C" fn plus1(x: u64) -> u64 {
    x + 1
}

pub extern "C" fn plus2(x: u64) -> u64 {
    x + 2
}

static_call! {
    pub fn tcall(x: u64) -> u64 = plus1;
}

pub static TKEY: StaticFalseKey = StaticFalseKey::new();

// The section the probed functions and the sites share starts a page (the
// module's asm comes first in its object file), so that all of them, a few
// hundred bytes, lie in one page whatever the layout of the rest.
core::arch::global_asm!(
    ".pushsection .text.tools_page,\"ax\",@progbits",
    ".balign 4096",
    ".popsection"
);

/// The probed function: in the page of `tools_sites`'s sites (one section,
/// one codegen unit; checked at run time).
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text.tools_page")]
#[inline(never)]
pub extern "C" fn tools_probed(x: u64) -> u64 {
    std::hint::black_box(x).wrapping_mul(3)
}

/// A key site and a static call site: 1 + 1 by default, +100 with the key,
/// +1 more with `plus2`.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text.tools_page")]
#[inline(never)]
pub extern "C" fn tools_sites(x: u64) -> u64 {
    let k = if static_branch_unlikely!(TKEY) {
        100
    } else {
        0
    };
    tcall(x) + k
}

/// Busy work for a profiler to sample, in the same page.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text.tools_page")]
#[inline(never)]
pub extern "C" fn tools_hot(n: u64) -> u64 {
    let mut x = 1u64;
    for i in 0..n {
        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
    }
    x
}

/// The text pages an update of `TKEY` and `tcall` writes.
pub fn patched_pages() -> Vec<usize> {
    let image = Image::current();
    let mut pages: Vec<usize> = image
        .static_key_records()
        .iter()
        .filter(|r| r.key() == TKEY.addr())
        .map(|r| r.site() & !4095)
        .collect();
    let sites = altpatch::elf::current_sites().expect("the test binary keeps its relocations");
    let tramp = tcall::static_call().trampoline();
    pages.extend(
        altpatch::static_call::sites_of(sites, tramp)
            .iter()
            .map(|s| s.addr & !4095),
    );
    pages.push(tcall::static_call().trampoline() & !4095);
    pages.sort_unstable();
    pages.dedup();
    pages
}

/// How the child updates: the publication (`swap`, `int3`, `inplace`).
fn how() -> String {
    std::env::var("TOOLS_PUBLISH").unwrap_or_else(|_| "swap".into())
}

/// Turns the key on or off and re-targets the call, as the scenario's
/// publication does it; the error text if the update was refused.
pub fn update(on: bool) -> Result<(), String> {
    let target = if on { plus2 } else { plus1 };
    if how() == "inplace" {
        let image = Image::current();
        let index = KeyIndex::new(&image);
        let sites = altpatch::elf::current_sites().map_err(|e| e.to_string())?;
        let mut poke = LinuxPoke::new().map_err(|e| e.to_string())?;
        // SAFETY: one instruction for one at each site, and no other thread
        // runs this process's code now.
        unsafe { TKEY.set_with(on, &image, &index, &mut poke) }.map_err(|e| e.to_string())?;
        // SAFETY: as above.
        unsafe { tcall::update_with(target, &image, sites, &mut poke) }
            .map_err(|e| e.to_string())?;
        return Ok(());
    }
    if on {
        TKEY.enable().map_err(|e| e.to_string())?;
    } else {
        TKEY.disable().map_err(|e| e.to_string())?;
    }
    tcall::update(target).map_err(|e| e.to_string())?;
    Ok(())
}

/// What `tools_sites(1)` returns with the update on or off.
pub fn expected(on: bool) -> u64 {
    if on { 103 } else { 2 }
}

/// Calls the probed function `n` times.
fn call_probed(n: u64) {
    for i in 0..n {
        assert_eq!(tools_probed(i), i.wrapping_mul(3));
    }
}

/// Every uprobe phase, for the strategy and publication in the environment.
pub fn probes() {
    let publish = how();
    if publish == "int3" {
        set_live_publication(Publish::Live).unwrap();
    }
    let probed = tools_probed as *const () as usize;
    let pages = patched_pages();
    assert!(
        pages.contains(&(probed & !4095)),
        "tools_probed ({probed:#x}) shares no page with the sites ({pages:x?}): the \
         section was split"
    );
    let before: Vec<_> = pages.iter().map(|&p| mapping(p)).collect();
    let original = file_byte(probed);
    let strategy = altpatch::os::linux::strategy().unwrap();
    let keeps = strategy.keeps_file_text();
    println!("strategy {strategy}, publication {publish}");

    // Attached before the update: survives it, counts every call before and
    // after, and the original byte is back on detach.
    let p = Uprobe::attach(probed).unwrap();
    call_probed(N);
    assert_eq!(p.count(), N, "probe before the update");
    assert_eq!(byte(probed), 0xcc, "the kernel's breakpoint is in place");
    let r = update(true);
    if !keeps {
        // The alias strategies refuse a file's text, and write nothing.
        let e = r.expect_err("an alias strategy moved the binary's text off its file");
        assert!(e.contains("maps a file"), "{e}");
        assert_eq!(tools_sites(1), expected(false), "a refused update wrote");
        call_probed(N);
        assert_eq!(p.count(), 2 * N, "probe after a refused update");
        drop(p);
        assert_eq!(byte(probed), original, "the breakpoint was not removed");
        println!("refused: {e}");
        return;
    }
    r.unwrap();
    assert_eq!(tools_sites(1), expected(true));
    call_probed(N);
    assert_eq!(p.count(), 2 * N, "probe across the update");
    drop(p);
    assert_eq!(
        byte(probed),
        original,
        "the original byte is back on detach"
    );
    call_probed(N);
    println!("phase 1: attached before the update, {N} + {N} hits, restored on detach");

    // Detached before any call after the update: no stray int3.
    let p = Uprobe::attach(probed).unwrap();
    update(false).unwrap();
    drop(p);
    assert_eq!(byte(probed), original, "a stray byte after detach");
    call_probed(N);
    assert_eq!(tools_sites(1), expected(false));
    println!("phase 2: detached before any call, no stray int3");

    // Attached after the update: fires on every call.
    update(true).unwrap();
    let p = Uprobe::attach(probed).unwrap();
    call_probed(N);
    assert_eq!(p.count(), N, "probe attached after the update");
    assert_eq!(tools_sites(1), expected(true));
    drop(p);
    assert_eq!(byte(probed), original);
    println!("phase 3: attached after the update, {N} hits");

    // Every patched page still names the file, at the same offset.
    for (&page, (start0, off0, path0)) in pages.iter().zip(&before) {
        let (start, off, path) = mapping(page);
        let want = off0 + (page - start0) as u64;
        let have = off + (page - start) as u64;
        assert!(
            path == *path0 && want == have && !path.is_empty(),
            "page {page:#x}: {path} at offset {have:#x}, was {path0} at {want:#x}"
        );
    }
    println!("maps: {} patched pages name {}", pages.len(), before[0].2);
    update(false).unwrap();
}

/// For `perf record -p`: updates (page swap), says so, then runs
/// `tools_hot` until killed (or 30 s).
pub fn perf_target() {
    let hot = tools_hot as *const () as usize;
    assert!(
        patched_pages().contains(&(hot & !4095)),
        "tools_hot shares no page with the sites"
    );
    update(true).unwrap();
    assert_eq!(tools_sites(1), expected(true));
    println!("READY {}", std::process::id());
    use std::io::Write;
    std::io::stdout().flush().unwrap();
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(30) {
        std::hint::black_box(tools_hot(100_000));
    }
}

/// A shared object patched at load, by page swap, with a uprobe on a
/// function in the page of its alternative site.
pub fn shared_object() {
    use altpatch::cpu::{Feature, Features};
    let so = std::ffi::CString::new(std::env::var("ALTSO").unwrap()).unwrap();
    // SAFETY: our fixture library, which has no constructors of its own.
    let h = unsafe { libc::dlopen(so.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!h.is_null());
    // SAFETY: the symbols exist with these C signatures; the library stays
    // loaded for the rest of the process.
    let (level, load_be) = unsafe {
        (
            std::mem::transmute::<*mut libc::c_void, extern "C" fn() -> u32>(libc::dlsym(
                h,
                c"altso_level".as_ptr(),
            )),
            std::mem::transmute::<*mut libc::c_void, unsafe extern "C" fn(*const u32) -> u32>(
                libc::dlsym(h, c"altso_load_be".as_ptr()),
            ),
        )
    };
    // SAFETY: the library stays loaded.
    let image = unsafe { Image::from_loaded(level as *const () as usize) }.unwrap();
    // `altso_load_be` begins with its alternative (a probe there is refused
    // by validation, as any unexpected byte at a site is): the probe goes
    // on the instruction after it.
    let own = image
        .alternatives()
        .iter()
        .find(|a| a.site() == load_be as *const () as usize)
        .expect("altso_load_be begins with its alternative");
    let probed = own.site() + own.site_len();
    let site = own.site();
    let sites: Vec<usize> = image
        .alternatives()
        .iter()
        .map(|a| a.site() & !4095)
        .collect();
    assert!(
        sites.contains(&(probed & !4095)),
        "altso_load_be ({probed:#x}) shares no page with the sites ({sites:x?})"
    );
    let (start0, off0, path0) = mapping(site);
    let original = file_byte(probed);
    let p = Uprobe::attach(probed).unwrap();
    let v = 0x0102_0304u32;
    for _ in 0..N {
        // SAFETY: `v` is a readable u32.
        assert_eq!(unsafe { load_be(&v) }, 0x0403_0201);
    }
    assert_eq!(p.count(), N);
    let features = Features::none().with(Feature::Sse4_2);
    let mut poke = LinuxPoke::remapping().unwrap();
    // SAFETY: no other thread runs the library's code.
    unsafe { altpatch::alternative::apply(&image, &features, &mut poke) }.unwrap();
    assert_eq!(level(), 2, "the alternative did not land");
    for _ in 0..N {
        // SAFETY: as above.
        assert_eq!(unsafe { load_be(&v) }, 0x0403_0201);
    }
    assert_eq!(
        p.count(),
        2 * N,
        "the probe in the shared object across the swap"
    );
    drop(p);
    assert_eq!(byte(probed), original);
    let (start, off, path) = mapping(site);
    let page = site & !4095;
    assert_eq!(
        (path.as_str(), off + (page - start) as u64),
        (path0.as_str(), off0 + (page - start0) as u64),
        "the shared object's patched page left its file"
    );
    println!("shared object: {N} + {N} hits, {path} keeps its page");
}
