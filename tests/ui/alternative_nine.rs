// A ninth alternative: at most eight per site.
use altpatch::alternative;

fn main() {
    unsafe {
        alternative!("nop", [Sse3 => "nop", Sse3 => "nop", Sse3 => "nop", Sse3 => "nop",
            Sse3 => "nop", Sse3 => "nop", Sse3 => "nop", Sse3 => "nop", Sse3 => "nop"])
    };
}
