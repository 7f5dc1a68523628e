//! Names this copy of the crate and keeps relocations in its own targets.
//!
//! * **The copy's tag** (`ALTPATCH_TAG`), as `altpatch-core`'s build
//!   script gives it to the core of this copy (its `build.rs` says what it
//!   is): the record sections' names, which this crate's code and the
//!   core's macros expanded here name through the environment variable.
//! * `--emit-relocs` for this crate's own tests, examples and benches, so
//!   they can find compiler-generated sites in their own images. Users of
//!   the crate add the same flag to their binaries (see the README);
//!   libraries depending on altpatch are unaffected.
use std::env;

// The tag's rules, shared with the core's build script.
#[allow(dead_code)]
#[path = "crates/altpatch-core/build.rs"]
mod core_build;

fn main() {
    let name = env::var("CARGO_PKG_NAME").expect("cargo sets CARGO_PKG_NAME");
    let version = env::var("CARGO_PKG_VERSION").expect("cargo sets CARGO_PKG_VERSION");
    let tag = core_build::tag(&name, &version);
    println!("cargo:rustc-env=ALTPATCH_TAG={tag}");
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
    println!("cargo:rerun-if-changed=crates/altpatch-core/build.rs");
}
