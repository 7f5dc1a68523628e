// A resolver written in place returns a function of another type than the
// ifunc's.
extern "C" fn wide(x: u64, y: u64) -> u64 {
    x + y
}

altpatch::ifunc! {
    fn sum(x: u64) -> u64 = |_features| wide;
}

fn main() {
    let _ = sum(1);
}
