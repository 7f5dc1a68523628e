// Every function of an alternative_call! has the declared type.
use altpatch::alternative_call;

extern "C" fn a(x: u64) -> u64 {
    x
}
extern "C" fn b(x: u32) -> u64 {
    x as u64
}

fn main() {
    let _ = alternative_call!(fn(u64) -> u64; a, [Avx2 => b]; 1);
}
