//! Keeps the linker's relocations in this crate's own tests, examples and
//! benches (`--emit-relocs`), so they can find compiler-generated sites in
//! their own images. Users of the crate add the same flag to their
//! binaries (see the README); libraries depending on altpatch are unaffected.
fn main() {
    for kind in ["tests", "examples", "benches"] {
        println!("cargo:rustc-link-arg-{kind}=-Wl,--emit-relocs");
    }
    // The demo loads a shared object built against its retpoline thunks:
    // it exports them, as such a program must (see
    // `retpoline::apply_loaded`).
    for sym in ["__x86_indirect_thunk_*", "__x86_return_thunk"] {
        println!("cargo:rustc-link-arg-examples=-Wl,--export-dynamic-symbol={sym}");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
