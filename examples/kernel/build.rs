//! Link as a static, freestanding image laid out by `link.ld`.
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    println!("cargo:rerun-if-changed=link.ld");
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-Wl,--build-id=none",
        // Keep relocations so `altpatch embed` can find the sites.
        "-Wl,--emit-relocs",
        &format!("-Wl,-T,{dir}/link.ld"),
    ] {
        println!("cargo:rustc-link-arg={arg}");
    }
}
