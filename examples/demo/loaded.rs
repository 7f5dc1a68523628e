//! The demo's shared-object section: a C library built by GCC against this
//! program's retpoline thunks (`-mindirect-branch=thunk-extern
//! -mfunction-return=thunk-extern`, `--emit-relocs`), loaded with `dlopen`
//! and patched at load time in the program's own mode; unloaded and loaded
//! again. (The demo exports its thunks: see build.rs.)

use std::ffi::{CStr, CString};
use std::path::PathBuf;

use altpatch::retpoline::{self, Outcome, Policy};
use altpatch::sites::SiteKind;

/// Builds the library with GCC in a temporary directory; `None` (with the
/// reason) if GCC is not there.
fn build() -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("altpatch-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let src = dir.join("lib.c");
    std::fs::write(&src, include_str!("../../tests/fixtures/retpoline_lib.c"))
        .map_err(|e| e.to_string())?;
    let out = dir.join("libretpoline_demo.so");
    let status = std::process::Command::new("gcc")
        .args(["-O2", "-fPIC", "-shared", "-mindirect-branch=thunk-extern"])
        .args(["-mfunction-return=thunk-extern", "-Wl,--emit-relocs", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .map_err(|e| format!("running gcc: {e}"))?;
    status
        .success()
        .then_some(out)
        .ok_or_else(|| "gcc failed".into())
}

type Work = unsafe extern "C" fn(i64) -> i64;

pub fn run(policy: &Policy) -> Result<(), Box<dyn std::error::Error>> {
    let lib = match build() {
        Ok(p) => p,
        Err(why) => {
            println!("(skipped: {why})");
            return Ok(());
        }
    };
    let path = CString::new(lib.to_string_lossy().as_bytes())?;
    for load in 1..=2 {
        // SAFETY: a valid C string.
        let h = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if h.is_null() {
            // SAFETY: dlerror describes the failed dlopen.
            let e = unsafe { CStr::from_ptr(libc::dlerror()) };
            return Err(format!("dlopen: {}", e.to_string_lossy()).into());
        }
        // SAFETY: a live handle and a C string; `work` is `long work(long)`.
        let work: Work = unsafe { std::mem::transmute(libc::dlsym(h, c"work".as_ptr())) };
        // SAFETY: as above.
        let before = unsafe { work(5) };
        // SAFETY: the library stays loaded until the dlclose below.
        let r = unsafe { retpoline::apply_loaded(work as usize, policy) }?;
        let kind = |k: fn(&SiteKind) -> bool| r.sites.iter().filter(|s| k(&s.site.kind)).count();
        let outcome = |o: fn(&Outcome) -> bool| r.sites.iter().filter(|s| o(&s.outcome)).count();
        // SAFETY: as above.
        let after = unsafe { work(5) };
        println!(
            "load {load} of {} at {:#x}: {} sites ({} through thunks, {} returns) patched in \
             mode {}: {} inlined, {} via the program's thunks, {} refused or left on the PLT; \
             {} written. \
             work(5) = {before} before, {after} after",
            lib.file_name().unwrap_or_default().to_string_lossy(),
            work as usize,
            r.sites.len(),
            kind(|k| matches!(k, SiteKind::IndirectThunk(_))),
            kind(|k| *k == SiteKind::ReturnThunk),
            policy.mode,
            outcome(|o| matches!(o, Outcome::Inlined)),
            outcome(|o| matches!(o, Outcome::ViaThunk)),
            outcome(|o| matches!(o, Outcome::Refused(_))),
            r.sites_applied.written,
        );
        if before != after {
            return Err("the library's result changed".into());
        }
        // SAFETY: nothing runs in the library any more.
        if unsafe { libc::dlclose(h) } != 0 {
            return Err("dlclose failed".into());
        }
    }
    let _ = std::fs::remove_dir_all(lib.parent().unwrap_or(&lib));
    Ok(())
}
