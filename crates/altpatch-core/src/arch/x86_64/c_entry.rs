//! The weak C entries two copies of the crate share: a fixed C name that
//! lands on an indirect-branch landing pad and jumps to one copy's Rust
//! function.

/// Defines the C symbol `$name` as a *weak* entry (`endbr64; jmp $f`) to
/// the Rust `extern "C"` function `$f` of the same signature: the C
/// interface (`include/altpatch.h`) under its fixed names. Weak, so a
/// program linking two copies of the crate links, and the linker binds the
/// name to one copy's function (a `#[no_mangle]` definition in each copy
/// would be a duplicate symbol).
#[doc(hidden)]
#[macro_export]
macro_rules! __altpatch_c_entry {
    ($name:literal, $f:path) => {
        core::arch::global_asm!(
            concat!(".pushsection .text.", $name, ",\"ax\",@progbits"),
            concat!(".weak ", $name),
            concat!(".type ", $name, ",@function"),
            ".balign 16",
            concat!($name, ":"),
            "endbr64",
            "jmp {f}",
            concat!(".size ", $name, ", . - ", $name),
            ".popsection",
            f = sym $f,
        );
    };
}
#[doc(hidden)]
pub use crate::__altpatch_c_entry as c_entry;
