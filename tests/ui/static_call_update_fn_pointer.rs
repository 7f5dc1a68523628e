// `update` takes an `extern "C" fn` of the declared signature; a Rust fn
// goes through `update_fn` (a C-ABI shim), not `update`.
extern "C" fn one() -> u32 {
    1
}
fn two() -> u32 {
    2
}

altpatch::static_call! {
    fn pick() -> u32 = one;
}

fn main() {
    let _ = pick::update(two);
}
