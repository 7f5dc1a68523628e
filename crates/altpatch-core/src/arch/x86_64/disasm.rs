//! Plan listings' disassembly (`std`: iced-x86's formatter).

/// AT&T disassembly of `bytes` at `ip`, instructions separated by `; `
/// (`int3` filler collapsed: `int3 x7`), as plan listings show it.
pub fn disasm(bytes: &[u8], ip: usize) -> std::string::String {
    use iced_x86::{Decoder, DecoderOptions, Formatter, GasFormatter, Instruction};
    use std::string::String;
    let mut out = String::new();
    let mut decoder = Decoder::with_ip(64, bytes, ip as u64, DecoderOptions::NONE);
    let mut fmt = GasFormatter::new();
    let mut insn = Instruction::default();
    let mut nops = 0usize;
    while decoder.can_decode() {
        decoder.decode_out(&mut insn);
        if insn.is_invalid() {
            if !out.is_empty() {
                out.push_str("; ");
            }
            out.push_str("(bad)");
            break;
        }
        // Collapse int3 filler: "int3 x7".
        if insn.code() == iced_x86::Code::Int3 {
            nops += 1;
            if decoder.can_decode() && bytes.get(decoder.position()) == Some(&0xcc) {
                continue;
            }
            if !out.is_empty() {
                out.push_str("; ");
            }
            out.push_str("int3");
            if nops > 1 {
                out.push_str(&std::format!(" x{nops}"));
            }
            nops = 0;
            continue;
        }
        if !out.is_empty() {
            out.push_str("; ");
        }
        fmt.format(&insn, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn collapses_int3_filler() {
        assert_eq!(
            super::disasm(&[0xe8, 0, 0, 0, 0, 0xcc, 0xcc], 0x1000),
            "call 0x0000000000001005; int3 x2"
        );
    }
}
