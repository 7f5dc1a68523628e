//! Where a relocation's branch really starts: whether the `cs` bytes
//! (`2e`) before its opcode are its prefixes (GCC's and LLVM's
//! `-mindirect-branch-cs-prefix`, what the kernel is built with; an
//! assembler's branch-alignment padding) or the end of the instruction
//! before it.
//!
//! A relocation proves where a branch's displacement is, and so its opcode;
//! it says nothing about the bytes before. `cs call` is `2e e8`, and so is
//! `mov $0x2e, %al` (`b0 2e`) followed by a `call`. Taking a byte of the
//! previous instruction into the site would rewrite that instruction, so a
//! prefix is only believed where decoding proves it, as objtool does: from
//! the start of the function symbol holding the branch (or the end of the
//! site before it in that function), instruction by instruction, to the
//! branch. Only a site whose opcode follows a `2e` byte pays for it.
//!
//! Other bytes before an opcode are not examined. Where they are really
//! prefixes of the branch (no compiler puts any other before a direct
//! branch to a thunk, trampoline or ifunc; a linker's relaxed `addr32
//! call` has `67`), the site starts at the opcode and the prefix stays in
//! front of what is written there: a segment override, `67` or REX changes
//! nothing in any form this crate writes (a NOP, `lfence`, a short `jcc`,
//! `ret`, `int3`, a rel32 `call`/`jmp`/`jcc`). Examining every byte that
//! could be one would decode around one site in thirty of a compiled Rust
//! program (`89 f3`, `mov %esi,%ebx`, ends in a `rep` byte) and cost more
//! than discovery itself.

use iced_x86::{Decoder, DecoderOptions, Instruction};

use super::Parsed;
use super::audit_symbols::SymbolMap;
use crate::arch::x86_64 as x86;
use crate::sites::Site;

/// The `cs` segment override prefix.
const CS: u8 = 0x2e;

/// Why a branch with `cs` and other prefixes is not a site: compilers put
/// only `cs` before a branch to a thunk, and a prefix such as `66` or `f3`
/// in front of what this crate writes would change it.
pub(super) const PREFIX_NOT_CS: &str = "a branch with a prefix other than cs (decoded from its \
     function's start): not a form compilers emit, left alone";

/// What decoding says about the `cs` bytes before a branch's opcode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Prefixes {
    /// None of them is the branch's: no `2e` byte before the opcode, or
    /// decoding reaches the opcode as an instruction boundary.
    None,
    /// The branch starts this many bytes earlier, every one a `cs` prefix.
    Cs(usize),
    /// The branch starts this many bytes earlier, with prefixes other than
    /// `cs` among them.
    Other(usize),
    /// Nothing proves whether the `2e` before is a prefix: no function
    /// symbol holds the branch, or decoding does not meet it. The site
    /// starts at the opcode (a `cs` before it changes nothing).
    Unproven,
}

/// The function symbols of an image, sorted, and the latest instruction
/// boundaries known: how far decoding got in the last function, and where
/// the last site found ends.
pub(super) struct Boundaries<'d> {
    /// The image's symbols by address, read on the first site that needs
    /// them (`None` inside if they cannot be read: nothing is proven then).
    symbols: Option<Option<SymbolMap<'d>>>,
    /// (function start, a proven instruction boundary in it).
    cursor: (u64, u64),
    /// One decoder per section, moved to each place decoding starts
    /// (building one costs more than the few instructions it decodes).
    decoder: Option<(u64, Decoder<'d>)>,
}

impl<'d> Boundaries<'d> {
    pub(super) fn new() -> Boundaries<'d> {
        Boundaries {
            symbols: None,
            cursor: (u64::MAX, 0),
            decoder: None,
        }
    }

    /// The prefixes of the `len`-byte branch at `start` in `code`, the
    /// bytes of the section at `base`; `found` are the sites found so far
    /// (the last one's end, where its relocation proves an instruction
    /// starts, is where decoding starts when it lies in the same function:
    /// in compiled code a few instructions back, not the whole function).
    #[inline(always)]
    pub(super) fn prefixes(
        &mut self,
        p: &Parsed<'d>,
        code: &'d [u8],
        base: u64,
        start: usize,
        len: usize,
        found: &[Site],
    ) -> Prefixes {
        // Nearly every site: the byte before is no `cs` (one compare).
        match start.checked_sub(1) {
            Some(b) if code[b] == CS => {
                let last_end = found.last().map_or(0, |s| (s.addr + s.len as usize) as u64);
                self.decide(p, code, base, start, len, last_end)
            }
            _ => Prefixes::None,
        }
    }

    /// [`prefixes`](Self::prefixes) when the byte before is `2e` (out of
    /// line: rare but in prefixed code).
    #[inline(never)]
    fn decide(
        &mut self,
        p: &Parsed<'d>,
        code: &'d [u8],
        base: u64,
        start: usize,
        len: usize,
        last_end: u64,
    ) -> Prefixes {
        // An instruction is at most 15 bytes. Any legacy prefix or REX
        // may be among them: decoding tells which are the branch's.
        let room = 15usize.saturating_sub(len).min(start);
        let k = code[start - room..start]
            .iter()
            .rev()
            .take_while(|&&b| may_be_prefix(b))
            .count();
        let unproven = Prefixes::Unproven;
        let site = base + start as u64;
        let symbols = self.symbols.get_or_insert_with(|| SymbolMap::new(p).ok());
        let Some((f_start, f_end)) = symbols.as_ref().and_then(|m| m.function_at(site)) else {
            return unproven;
        };
        if f_start < base || f_end > base + code.len() as u64 {
            return unproven;
        }
        let mut at = if self.cursor.0 == f_start && self.cursor.1 <= site {
            self.cursor.1
        } else {
            f_start
        };
        if (at..=site).contains(&last_end) {
            at = last_end;
        }
        self.cursor = (f_start, at);
        // A boundary right before `cs` bytes and the opcode: the branch
        // with those prefixes, nothing to decode (`2e` is always a prefix,
        // and a branch after it is the same branch).
        if site - at <= k as u64 && code[(at - base) as usize..start].iter().all(|&b| b == CS) {
            return match site - at {
                0 => Prefixes::None,
                n => Prefixes::Cs(n as usize),
            };
        }
        self.decode_to(code, base, at, site, len, k)
            .unwrap_or(unproven)
    }

    /// Decodes from the boundary `at` to the instruction reaching the
    /// opcode at `site`: what that says of the bytes before it, `None` if
    /// it proves nothing (an undecodable byte, or an instruction that
    /// covers the opcode but is not the branch).
    fn decode_to(
        &mut self,
        code: &'d [u8],
        base: u64,
        at: u64,
        site: u64,
        len: usize,
        k: usize,
    ) -> Option<Prefixes> {
        let decoder = match &mut self.decoder {
            Some((b, d)) if *b == base => d,
            slot => {
                &mut slot
                    .insert((base, Decoder::with_ip(64, code, base, DecoderOptions::NONE)))
                    .1
            }
        };
        decoder.set_position((at - base) as usize).ok()?;
        decoder.set_ip(at);
        let mut insn = Instruction::default();
        let mut boundary = at;
        while boundary < site && decoder.can_decode() {
            decoder.decode_out(&mut insn);
            if insn.is_invalid() {
                return None;
            }
            let next = insn.next_ip();
            if next > site {
                // An instruction that starts before the opcode and covers
                // it: the branch with prefixes, if it is the same branch.
                let n = (site - boundary) as usize;
                let same = next == site + len as u64
                    && n <= k
                    && x86::rel_branch_of(&insn)
                        .is_some_and(|b| b.disp_size == 4 && b.disp_offset == n + len - 4);
                let start = (site - base) as usize;
                return match same {
                    true if code[start - n..start].iter().all(|&b| b == 0x2e) => {
                        Some(Prefixes::Cs(n))
                    }
                    true => Some(Prefixes::Other(n)),
                    false => None,
                };
            }
            boundary = next;
            self.cursor.1 = boundary;
        }
        (boundary == site).then_some(Prefixes::None)
    }
}

/// A byte that may be a prefix of the instruction after it: the legacy
/// prefixes and REX.
fn may_be_prefix(b: u8) -> bool {
    matches!(
        b,
        0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x66 | 0x67 | 0xf0 | 0xf2 | 0xf3 | 0x40..=0x4f
    )
}
