//! Calls through the GOT on x86-64, as ELF ifunc call sites make them, and
//! the direct call each becomes once the ifunc is resolved: `call/jmp
//! <PLT stub>` (5 bytes) or `call/jmp *slot(%rip)` (6 bytes, `-fno-plt`).

use super::encode::{ENDBR64, Encoded, OutOfRange, call_rel32, jmp_rel32};

/// `R_X86_64_IRELATIVE`, the relocation type of an ifunc's GOT slot.
pub const R_IRELATIVE: u32 = 37;

/// What a table entry of another type is called in errors.
pub const NOT_IRELATIVE: &str = "not an R_X86_64_IRELATIVE relocation";

/// What a site of another form is called in errors.
pub const NOT_GOT_CALL: &str = "not call/jmp rel32 to a PLT stub or call/jmp *slot(%rip)";

/// Bytes of a PLT stub read to find its slot: `[endbr64] [bnd] jmp
/// *disp32(%rip)` (4 + 1 + 6).
pub const PLT_STUB_LEN: usize = 11;

/// The GOT slot the PLT stub at `stub`, whose first [`PLT_STUB_LEN`] bytes
/// are `b`, jumps through.
pub fn plt_slot(stub: usize, b: &[u8; PLT_STUB_LEN]) -> Option<usize> {
    let mut at = 0;
    if b[..4] == ENDBR64 {
        at += 4;
    }
    if b[at] == 0xf2 {
        at += 1;
    }
    if b[at..at + 2] != [0xff, 0x25] {
        return None;
    }
    let disp = i32::from_le_bytes(b[at + 2..at + 6].try_into().ok()?);
    Some((stub + at + 6).wrapping_add(disp as isize as usize))
}

/// What a call site of an ELF ifunc holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GotCall {
    /// A direct call or jump to this address (a PLT stub, or already the
    /// implementation).
    To(usize),
    /// A call or jump through the GOT slot at this address.
    Through(usize),
    /// A direct call or jump of the form [`direct_call`] writes for a
    /// slot call (already rewritten).
    Direct,
}

/// Reads the site `cur` at `addr`: 5 bytes `call/jmp rel32`, or 6 bytes
/// `call/jmp *slot(%rip)` or its rewritten form `cs call/jmp rel32`.
pub fn got_call(cur: &[u8], addr: usize) -> Option<GotCall> {
    let rel = |b: &[u8]| {
        let d = i32::from_le_bytes(b.try_into().expect("4 bytes"));
        (addr + cur.len()).wrapping_add(d as isize as usize)
    };
    match (cur.len(), cur.first()?, cur.get(1)) {
        (5, 0xe8 | 0xe9, _) => Some(GotCall::To(rel(&cur[1..5]))),
        (6, 0xff, Some(0x15 | 0x25)) => Some(GotCall::Through(rel(&cur[2..6]))),
        (6, 0x2e, Some(0xe8 | 0xe9)) => Some(GotCall::Direct),
        _ => None,
    }
}

/// The direct call (or, for a tail call, jump) to `chosen` that replaces
/// a GOT call of `len` bytes at `addr`: one instruction of the same
/// length (a 6-byte slot call gets a `cs` prefix), so the return address
/// is unchanged.
pub fn direct_call(
    addr: usize,
    len: usize,
    tail: bool,
    chosen: usize,
) -> Result<Encoded, OutOfRange> {
    let prefix = usize::from(len == 6);
    let branch = if tail {
        jmp_rel32(addr + prefix, chosen)?
    } else {
        call_rel32(addr + prefix, chosen)?
    };
    Ok(if prefix == 1 {
        let mut b = [0u8; 6];
        b[0] = 0x2e;
        b[1..].copy_from_slice(&branch);
        Encoded::from_slice(&b)
    } else {
        branch
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn got_calls_read_and_become_direct() {
        let at = 0x40_1000;
        let slot_call = [0xff, 0x15, 0x10, 0, 0, 0];
        assert_eq!(
            got_call(&slot_call, at),
            Some(GotCall::Through(at + 6 + 0x10))
        );
        let direct = direct_call(at, 6, false, at + 0x100).unwrap();
        assert_eq!(direct[..2], [0x2e, 0xe8]);
        assert_eq!(got_call(&direct, at), Some(GotCall::Direct));
        let five = direct_call(at, 5, true, at + 0x100).unwrap();
        assert_eq!(got_call(&five, at), Some(GotCall::To(at + 0x100)));
        let mut stub = [0xcc; PLT_STUB_LEN];
        stub[..4].copy_from_slice(&ENDBR64);
        stub[4..10].copy_from_slice(&[0xff, 0x25, 0x20, 0, 0, 0]);
        assert_eq!(plt_slot(0x2000, &stub), Some(0x2000 + 10 + 0x20));
    }
}
