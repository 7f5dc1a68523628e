// A feature name that does not exist.
use altpatch::alternative;

fn main() {
    unsafe { alternative!("nop", [Movbee => "nop"]) };
}
