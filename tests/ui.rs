//! Misuse of the macros is a compile error, and the error says what is
//! wrong where the user wrote it (trybuild; the expected messages are the
//! `.stderr` files next to each case, for the toolchain CI runs —
//! regenerate them with `TRYBUILD=overwrite cargo test --test ui` after a
//! compiler upgrade and review the diff).

#[test]
fn macro_misuse_is_a_compile_error() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
}
