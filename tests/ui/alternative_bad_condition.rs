// A condition that is neither a feature, its negation, `always` nor `never`.
use altpatch::alternative;

fn main() {
    unsafe { alternative!("nop", [Avx2 && Bmi2 => "nop"]) };
}
