// The default target's type differs from the declared signature.
extern "C" fn halve(x: u32) -> u32 {
    x / 2
}

altpatch::static_call! {
    fn scale(x: u64) -> u64 = halve;
}

fn main() {
    let _ = scale(4);
}
