// A patch point's name goes into the record as a string: it must be a
// literal, not an expression.
fn main() {
    let name = "entry";
    unsafe { core::arch::asm!(altpatch::patch_point!(name)) };
}
