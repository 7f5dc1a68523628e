// Updating a static call to a function of another type.
extern "C" fn double(x: u64) -> u64 {
    x * 2
}
extern "C" fn negate(x: i64) -> i64 {
    -x
}

altpatch::static_call! {
    fn scale(x: u64) -> u64 = double;
}

fn main() {
    let _ = scale::update(negate);
}
