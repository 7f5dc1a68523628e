// A floating-point argument or result travels in an SSE register, which
// the site's `asm!` does not set: refused at compile time, never passed in
// the wrong register.
use altpatch::alternative_call;

extern "C" fn half(x: f64) -> f64 {
    x / 2.0
}

fn main() {
    let _ = alternative_call!(fn(f64) -> f64; half, [Avx2 => half]; 1.0);
}
