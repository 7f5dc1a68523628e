// A static branch needs a key in a `static`: its address is in the site's
// record, fixed at link time.
use altpatch::static_branch_unlikely;
use altpatch::static_key::StaticFalseKey;

fn main() {
    let key = StaticFalseKey::new();
    if static_branch_unlikely!(key) {
        println!("on");
    }
}
