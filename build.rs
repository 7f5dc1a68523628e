//! Keeps the linker's relocations in this crate's own tests, examples and
//! benches (`--emit-relocs`), so they can find compiler-generated sites in
//! their own images. Users of the crate add the same flag to their
//! binaries (see the README); libraries depending on altpatch are unaffected.
fn main() {
    for kind in ["tests", "examples", "benches"] {
        println!("cargo:rustc-link-arg-{kind}=-Wl,--emit-relocs");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
