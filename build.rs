//! Keeps relocations in this package's own targets: `--emit-relocs` for
//! its tests, examples and benches, so they can find compiler-generated
//! sites in their own images. Users of the crate add the same flag to
//! their binaries (see the README); libraries depending on altpatch are
//! unaffected. (The copy's tag, which names every record section, is
//! `altpatch-core`'s build script's; this crate names it through
//! `altpatch_core::__altpatch_tag!`.)
use std::env;

fn main() {
    let name = env::var("CARGO_PKG_NAME").expect("cargo sets CARGO_PKG_NAME");
    // Only the package itself has these targets: the same source built
    // under another package name (tests/fixtures/twocopies) has none, and
    // cargo refuses link arguments for targets a package lacks.
    if name == "altpatch" {
        for kind in ["tests", "examples", "benches"] {
            println!("cargo:rustc-link-arg-{kind}=-Wl,--emit-relocs");
        }
        // The demo loads a shared object built against its retpoline
        // thunks: it exports them, as such a program must (see
        // `retpoline::apply_loaded`).
        for sym in ["__x86_indirect_thunk_*", "__x86_return_thunk"] {
            println!("cargo:rustc-link-arg-examples=-Wl,--export-dynamic-symbol={sym}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
