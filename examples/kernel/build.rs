//! Link as a static, freestanding image laid out by `link.ld`, with a C
//! part (an ifunc) compiled by GCC.
fn main() {
    println!("cargo:rerun-if-changed=src/kifunc.c");
    println!("cargo:rerun-if-changed=../../include/altpatch.h");
    cc::Build::new()
        .compiler("gcc")
        .file("src/kifunc.c")
        .include("../../include")
        .opt_level(2)
        .flag("-ffreestanding")
        .flag("-fno-pic")
        .flag("-fno-stack-protector")
        .flag("-fcf-protection=none")
        // Built with retpolines and return thunks, like the Rust part.
        .flag("-mindirect-branch=thunk-extern")
        .flag("-mfunction-return=thunk-extern")
        .compile("kifunc");
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    println!("cargo:rerun-if-changed=link.ld");
    // rust-lld's own arguments (x86_64-unknown-none links with it).
    for arg in [
        "-static",
        "--build-id=none",
        // Keep relocations so `altpatch embed` can find the sites.
        "--emit-relocs",
        &format!("-T{dir}/link.ld"),
    ] {
        println!("cargo:rustc-link-arg={arg}");
    }
}
