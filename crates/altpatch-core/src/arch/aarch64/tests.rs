//! The encodings checked against the decoder (`yaxpeax-arm`): each word
//! decodes as the instruction meant, with the target meant; the reach of
//! each form at its edges; re-basing keeps every target; and the fixed-bit
//! classification of PC-relative forms agrees with the decoder on a
//! million words.

use std::string::{String, ToString};

use yaxpeax_arch::{Decoder, U8Reader};
use yaxpeax_arm::armv8::a64::{InstDecoder, Instruction, Opcode, Operand};

use super::encode::{self, Bti, Cond, EncodeError, Literal, Reg};
use super::{PcForm, RebaseError, branch_target, pc_form, pc_target, rebase};

fn decode(word: u32) -> Instruction {
    let bytes = word.to_le_bytes();
    InstDecoder::default()
        .decode(&mut U8Reader::new(&bytes))
        .unwrap_or_else(|e| panic!("{word:#010x} does not decode: {e:?}"))
}

fn text(word: u32) -> String {
    decode(word).to_string()
}

/// The decoder's PC offset of `word`.
fn decoded_offset(word: u32) -> i64 {
    decode(word)
        .operands
        .iter()
        .find_map(|o| match o {
            Operand::PCOffset(d) => Some(*d),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{word:#010x} has no PC offset"))
}

const X3: Reg = match Reg::new(3) {
    Some(r) => r,
    None => unreachable!(),
};

#[test]
fn fixed_words_decode_as_meant() {
    assert_eq!(text(encode::NOP), "nop");
    assert_eq!(text(encode::RET), "ret");
    assert_eq!(text(encode::br(Reg::IP0)), "br x16");
    assert_eq!(text(encode::blr(Reg::IP1)), "blr x17");
    assert_eq!(text(encode::brk(0)), "brk #0x0");
    assert_eq!(encode::BRK_ALTPATCH, 0xd434_3740);
    // BTI is HINT #32/#34/#36/#38 (the decoder prints the hint number).
    for (kind, hint) in [
        (Bti::None, 32u32),
        (Bti::C, 34),
        (Bti::J, 36),
        (Bti::Jc, 38),
    ] {
        assert_eq!(encode::bti(kind), 0xd503_201f | hint << 5);
        assert_eq!(text(encode::bti(kind)), std::format!("hint #0x{hint:x}"));
    }
    assert_eq!(encode::bti(Bti::C), 0xd503_245f);
}

#[test]
fn branches_reach_their_targets() {
    let from = 0x40_0000usize;
    for to in [from, from + 4, from - 4, from + 0x1234 * 4, from - 0x4000] {
        let d = to as i64 - from as i64;
        let b = encode::b(from, to).unwrap();
        assert!(text(b).starts_with("b "), "{}", text(b));
        assert_eq!(decoded_offset(b), d);
        assert_eq!(branch_target(b, from), Some(to));
        let bl = encode::bl(from, to).unwrap();
        assert!(text(bl).starts_with("bl "));
        assert_eq!(decoded_offset(bl), d);
        for cond in [Cond::Eq, Cond::Ne, Cond::Hi, Cond::Le] {
            let w = encode::b_cond(from, to, cond).unwrap();
            assert_eq!(decoded_offset(w), d);
            assert_eq!(branch_target(w, from), Some(to));
            assert_eq!(Cond::from_bits(w as u8), cond);
            // The decoder reads the same condition.
            let name = std::format!("b.{cond:?}").to_lowercase();
            assert!(text(w).starts_with(&name), "{} for {name}", text(w));
        }
        for (wide, nonzero, name) in [(true, false, "cbz x3"), (false, true, "cbnz w3")] {
            let w = encode::cbz(from, to, X3, wide, nonzero).unwrap();
            assert!(text(w).starts_with(name), "{}", text(w));
            assert_eq!(decoded_offset(w), d);
            assert_eq!(branch_target(w, from), Some(to));
        }
        for bit in [0u8, 5, 31, 32, 63] {
            let w = encode::tbz(from, to, X3, bit, bit % 2 == 1).unwrap();
            assert_eq!(decoded_offset(w), d);
            assert_eq!(branch_target(w, from), Some(to));
            assert!(text(w).contains(&std::format!("#0x{bit:x}")), "{}", text(w));
        }
    }
}

#[test]
fn each_form_reaches_exactly_its_range() {
    let from = 0x1000_0000usize;
    // (encoder, reach in bytes)
    type Encoder<'a> = &'a dyn Fn(usize) -> Result<u32, EncodeError>;
    let forms: [(Encoder, usize); 6] = [
        (&|to| encode::b(from, to), 128 << 20),
        (&|to| encode::bl(from, to), 128 << 20),
        (&|to| encode::b_cond(from, to, Cond::Eq), 1 << 20),
        (&|to| encode::cbz(from, to, X3, true, false), 1 << 20),
        (&|to| encode::tbz(from, to, X3, 1, false), 32 << 10),
        (&|to| encode::ldr_literal(from, to, X3, Literal::X), 1 << 20),
    ];
    for (enc, reach) in forms {
        // The words at both ends say exactly those offsets.
        assert_eq!(
            decoded_offset(enc(from + reach - 4).unwrap()),
            reach as i64 - 4
        );
        assert_eq!(decoded_offset(enc(from - reach).unwrap()), -(reach as i64));
        assert!(matches!(
            enc(from + reach),
            Err(EncodeError::OutOfRange { .. })
        ));
        assert!(matches!(
            enc(from - reach - 4),
            Err(EncodeError::OutOfRange { .. })
        ));
        assert_eq!(
            enc(from + 2),
            Err(EncodeError::Misaligned { addr: from + 2 })
        );
    }
    assert_eq!(
        decoded_offset(encode::adr(from, from + (1 << 20) - 1, X3).unwrap()),
        (1 << 20) - 1
    );
    assert_eq!(
        decoded_offset(encode::adr(from, from - (1 << 20), X3).unwrap()),
        -(1 << 20)
    );
    assert!(encode::adr(from, from + (1 << 20), X3).is_err());
    assert!(encode::adr(from, from - (1 << 20) - 1, X3).is_err());
    assert_eq!(
        encode::adr(from + 1, from, X3),
        Err(EncodeError::Misaligned { addr: from + 1 })
    );
    assert!(encode::adrp(from + 2, from, X3).is_err());
    let high = 0x7f00_0000_0000usize;
    assert_eq!(
        decoded_offset(encode::adrp(high, high + (4 << 30) - 4096, X3).unwrap()),
        (4 << 30) - 4096
    );
    assert_eq!(
        decoded_offset(encode::adrp(high, high - (4 << 30), X3).unwrap()),
        -(4 << 30)
    );
    assert_eq!(
        encode::adrp(high, high + (4 << 30), X3),
        Err(EncodeError::OutOfRange {
            from: high,
            to: high + (4 << 30),
            reach: 4 << 30
        })
    );
    assert!(encode::adrp(high, high - (4 << 30) - 4096, X3).is_err());
    assert_eq!(
        encode::tbz(from, from, X3, 64, false),
        Err(EncodeError::Operand("TBZ tests bits 0..=63"))
    );
}

#[test]
fn address_forms_point_where_meant() {
    let from = 0x7f12_3456_7000usize + 0x124;
    for to in [from + 1, from - 0x3_0001, from + 0xf_fff0] {
        let w = encode::adr(from, to, X3).unwrap();
        assert!(text(w).starts_with("adr x3"), "{}", text(w));
        assert_eq!(decoded_offset(w), to as i64 - from as i64);
        assert_eq!(pc_target(w, from), Some(to));
    }
    for to in [from + 0x1234_5678, from - 0x8000_0000] {
        let w = encode::adrp(from, to, X3).unwrap();
        assert!(text(w).starts_with("adrp x3"), "{}", text(w));
        assert_eq!(pc_target(w, from), Some(to & !0xfff));
        assert_eq!(
            decoded_offset(w),
            (to & !0xfff) as i64 - (from & !0xfff) as i64
        );
    }
    for (kind, name) in [
        (Literal::W, "ldr w3"),
        (Literal::X, "ldr x3"),
        (Literal::Sw, "ldrsw x3"),
        (Literal::Prfm, "prfm"),
        (Literal::S, "ldr s3"),
        (Literal::D, "ldr d3"),
        (Literal::Q, "ldr q3"),
    ] {
        let to = from + 0x100;
        let w = encode::ldr_literal(from, to, X3, kind).unwrap();
        assert!(text(w).starts_with(name), "{kind:?}: {}", text(w));
        assert_eq!(pc_form(w), Some(PcForm::Literal));
        assert_eq!(pc_target(w, from), Some(to));
    }
}

#[test]
fn rebasing_keeps_every_target() {
    let (from, to) = (0x40_1000usize, 0x48_2000usize);
    let target = 0x44_0000usize;
    let words = [
        encode::b(from, target).unwrap(),
        encode::bl(from, target).unwrap(),
        encode::b_cond(from, target, Cond::Ge).unwrap(),
        encode::cbz(from, target, X3, false, true).unwrap(),
        encode::adr(from, target + 3, X3).unwrap(),
        encode::adrp(from, target + 0x800, X3).unwrap(),
        encode::ldr_literal(from, target, X3, Literal::Q).unwrap(),
    ];
    for w in words {
        let moved = rebase(w, from, to).unwrap();
        assert_eq!(pc_form(moved), pc_form(w));
        assert_eq!(pc_target(moved, to), pc_target(w, from), "{w:#010x}");
        // Every bit but the offset's is kept (condition, register, size,
        // sf/V/opc, the op bit).
        let offset_bits: u32 = match pc_form(w).unwrap() {
            PcForm::B | PcForm::Bl => 0x03ff_ffff,
            PcForm::BCond | PcForm::Cbz | PcForm::Literal => 0x7ffff << 5,
            PcForm::Tbz => 0x3fff << 5,
            PcForm::Adr | PcForm::Adrp => 3 << 29 | 0x7ffff << 5,
        };
        assert_eq!(moved & !offset_bits, w & !offset_bits, "{w:#010x}");
        assert_ne!(moved, w, "the offset changed");
    }
    // TBZ reaches ±32 KiB: near moves re-base, far ones are refused.
    let tbz = encode::tbz(from, from + 0x100, X3, 40, true).unwrap();
    let near = rebase(tbz, from, from + 0x1000).unwrap();
    assert_eq!(pc_target(near, from + 0x1000), Some(from + 0x100));
    assert_eq!(
        near & !(0x3fff << 5),
        tbz & !(0x3fff << 5),
        "b5, b40, op, Rt kept"
    );
    // Misaligned addresses are refused, not re-based.
    assert_eq!(
        rebase(tbz, from + 2, to),
        Err(RebaseError::Encode(EncodeError::Misaligned {
            addr: from + 2
        }))
    );
    assert!(matches!(
        rebase(tbz, from, to),
        Err(RebaseError::Encode(EncodeError::OutOfRange { .. }))
    ));
    // Instructions that do not refer to the PC move as they are.
    for w in [
        encode::NOP,
        encode::RET,
        encode::br(X3),
        0x8b02_0020, /* add x0, x1, x2 */
    ] {
        assert_eq!(rebase(w, from, to), Ok(w));
    }
    // `UDF #0` is an instruction (it traps wherever it is); a word the
    // decoder does not know is refused, not copied.
    assert_eq!(rebase(0, from, to), Ok(0));
    let bytes = |w: u32| w.to_le_bytes();
    let unallocated = (1u32..)
        .map(|i| i.wrapping_mul(0x9e37_79b9))
        .find(|w| {
            InstDecoder::default()
                .decode(&mut U8Reader::new(&bytes(*w)))
                .is_err()
        })
        .unwrap();
    assert_eq!(
        rebase(unallocated, from, to),
        Err(RebaseError::Unknown { word: unallocated })
    );
}

/// The fixed-bit classification against the decoder, on a million words
/// spread over the whole encoding space (a fixed xorshift sequence): a
/// word the classification calls PC-relative has the PC offset the
/// decoder reads (or is not an instruction), and a word the decoder reads
/// as PC-relative is either classified or refused by `rebase` — never
/// copied unchanged.
#[test]
fn classification_agrees_with_the_decoder() {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let (mut classified, mut unknown_pc) = (0, 0);
    for _ in 0..1_000_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let w = x as u32;
        let bytes = w.to_le_bytes();
        let Ok(inst) = InstDecoder::default().decode(&mut U8Reader::new(&bytes)) else {
            assert!(matches!(
                rebase(w, 0x1000, 0x2000),
                Err(RebaseError::Unknown { .. })
            ));
            continue;
        };
        let offset = inst.operands.iter().find_map(|o| match o {
            Operand::PCOffset(d) => Some(*d),
            _ => None,
        });
        match (pc_form(w), offset) {
            (Some(form), Some(d)) => {
                classified += 1;
                let at = 0x10_0000usize;
                let base = if form == PcForm::Adrp {
                    at & !0xfff
                } else {
                    at
                };
                assert_eq!(
                    pc_target(w, at),
                    Some((base as i64 + d) as usize),
                    "{w:#010x} {inst}"
                );
            }
            // A mask too broad would show here: never.
            (Some(form), None) => {
                panic!("{w:#010x} ({inst}) classified {form:?} without a PC offset")
            }
            // The only PC-relative forms not re-based: FEAT_PAuth_LR's.
            (None, Some(_)) => {
                unknown_pc += 1;
                assert!(
                    matches!(
                        inst.opcode,
                        Opcode::AUTIASPPC
                            | Opcode::AUTIBSPPC
                            | Opcode::RETAASPPC
                            | Opcode::RETABSPPC
                    ),
                    "{w:#010x} {inst}: PC-relative and not classified"
                );
                assert_eq!(
                    rebase(w, 0x1000, 0x2000),
                    Err(RebaseError::UnknownPcRelative { word: w }),
                    "{inst}"
                );
            }
            (None, None) => assert_eq!(rebase(w, 0x1000, 0x2000), Ok(w)),
        }
    }
    assert!(
        classified > 10_000,
        "{classified} PC-relative words sampled"
    );
    std::println!(
        "{classified} classified PC-relative words, {unknown_pc} refused as PC-relative in other forms"
    );
}
