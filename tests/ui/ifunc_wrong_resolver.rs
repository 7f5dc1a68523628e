// The resolver returns a function of another type than the ifunc's.
use altpatch::cpu::Features;

extern "C" fn wide(x: u64, y: u64) -> u64 {
    x + y
}

fn pick(_: &Features) -> extern "C" fn(u64, u64) -> u64 {
    wide
}

altpatch::ifunc! {
    fn sum(x: u64) -> u64 = pick;
}

fn main() {
    let _ = sum(1);
}
