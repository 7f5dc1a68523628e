//! The feature table, the `HWCAP` bits and the ID-register fields, checked
//! on three recorded cores (`tests/fixtures/aarch64/*.idregs`).

use std::vec::Vec;

use super::{DumpError, Feature, Features, IdRegisters};
use Feature as F;

const A72: &str = include_str!("../../../../../tests/fixtures/aarch64/cortex-a72.idregs");
const N1: &str = include_str!("../../../../../tests/fixtures/aarch64/neoverse-n1.idregs");
const V1: &str = include_str!("../../../../../tests/fixtures/aarch64/neoverse-v1.idregs");

fn features(dump: &str) -> Vec<Feature> {
    Features::from_id_registers(&IdRegisters::parse(dump).unwrap())
        .iter()
        .collect()
}

/// What each core has, field by field of its TRM's registers.
#[test]
fn recorded_cores() {
    assert_eq!(
        features(A72),
        [
            F::Fp,
            F::Asimd,
            F::Aes,
            F::Pmull,
            F::Sha1,
            F::Sha2,
            F::Crc32
        ]
    );
    assert_eq!(
        features(N1),
        [
            F::Fp,
            F::Asimd,
            F::Fp16,
            F::Aes,
            F::Pmull,
            F::Sha1,
            F::Sha2,
            F::Crc32,
            F::Lse,
            F::Rdm,
            F::Dotprod,
            F::Dcpop,
            F::Lrcpc,
            F::Ssbs,
        ]
    );
    assert_eq!(
        features(V1),
        [
            F::Fp,
            F::Asimd,
            F::Fp16,
            F::Aes,
            F::Pmull,
            F::Sha1,
            F::Sha2,
            F::Sha512,
            F::Sha3,
            F::Crc32,
            F::Lse,
            F::Rdm,
            F::Dotprod,
            F::Flagm,
            F::Rng,
            F::Dcpop,
            F::Jscvt,
            F::Fcma,
            F::Lrcpc,
            F::Paca,
            F::Pacg,
            F::I8mm,
            F::Sve,
            F::Dit,
            F::Ssbs,
        ]
    );
}

/// The levels that matter: LSE is `Atomic == 2`, not 1; SVE2 needs SVE;
/// SSBS and MTE need their second level; FP and AdvSIMD are absent only
/// at `0xf`.
#[test]
fn field_levels() {
    let none = IdRegisters::default();
    // (registers, feature, expected)
    let cases = [
        (
            IdRegisters {
                isar0: 1 << 20,
                ..none
            },
            F::Lse,
            false,
        ),
        (
            IdRegisters {
                isar0: 2 << 20,
                ..none
            },
            F::Lse,
            true,
        ),
        (IdRegisters { zfr0: 1, ..none }, F::Sve2, false),
        (
            IdRegisters {
                zfr0: 1,
                pfr0: 1 << 32,
                ..none
            },
            F::Sve2,
            true,
        ),
        (
            IdRegisters {
                pfr1: 1 << 4,
                ..none
            },
            F::Ssbs,
            false,
        ),
        (
            IdRegisters {
                pfr1: 1 << 8,
                ..none
            },
            F::Mte,
            false,
        ),
        (
            IdRegisters {
                pfr1: 2 << 8 | 1,
                ..none
            },
            F::Mte,
            true,
        ),
        (
            IdRegisters {
                pfr0: 0xff << 16,
                ..none
            },
            F::Fp,
            false,
        ),
        (
            IdRegisters {
                pfr0: 0xff << 16,
                ..none
            },
            F::Asimd,
            false,
        ),
        (none, F::Fp, true),
        (none, F::Fp16, false),
    ];
    for (regs, feat, want) in cases {
        assert_eq!(
            Features::from_id_registers(&regs).has(feat),
            want,
            "{feat:?} in {regs:?}"
        );
    }
}

/// Each feature's `HWCAP` bit alone gives that feature alone; the bits are
/// Linux's uapi ones (spot checks against `asm/hwcap.h`).
#[test]
fn hwcap_bits() {
    for &feat in Feature::ALL {
        let (second, bit) = feat.hwcap_bit();
        let (h1, h2) = if second {
            (0, 1u64 << bit)
        } else {
            (1u64 << bit, 0)
        };
        assert_eq!(
            Features::from_hwcap(h1, h2).iter().collect::<Vec<_>>(),
            [feat]
        );
    }
    assert_eq!(F::Lse.hwcap_bit(), (false, 8)); // HWCAP_ATOMICS
    assert_eq!(F::Sve.hwcap_bit(), (false, 22)); // HWCAP_SVE
    assert_eq!(F::Pacg.hwcap_bit(), (false, 31)); // HWCAP_PACG
    assert_eq!(F::Sve2.hwcap_bit(), (true, 1)); // HWCAP2_SVE2
    assert_eq!(F::Bti.hwcap_bit(), (true, 17)); // HWCAP2_BTI
    assert_eq!(F::Mte.hwcap_bit(), (true, 18)); // HWCAP2_MTE
    // No two features share a bit.
    let mut seen: Vec<_> = Feature::ALL.iter().map(|f| f.hwcap_bit()).collect();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), Feature::ALL.len());
}

#[test]
fn names_and_masks() {
    for (i, &feat) in Feature::ALL.iter().enumerate() {
        assert_eq!(feat as usize, i, "ALL is in discriminant order");
        assert_eq!(Feature::from_name(feat.name()), Some(feat));
        assert_eq!(feat.mask(), 1 << i);
    }
    assert_eq!(Feature::from_name("lse"), Some(F::Lse));
    assert_eq!(Feature::from_name("avx2"), None);
}

#[test]
fn dumps_round_trip_and_refuse_garbage() {
    for dump in [A72, N1, V1] {
        let r = IdRegisters::parse(dump).unwrap();
        assert_eq!(IdRegisters::parse(&std::format!("{r}")), Ok(r));
    }
    assert_eq!(
        IdRegisters::parse("ID_AA64ISAR0_EL1 = 0x1\nID_AA64FOO_EL1 = 0x2\n"),
        Err(DumpError::Line { line: 2 })
    );
    assert_eq!(
        IdRegisters::parse("ID_AA64ISAR0_EL1 = 12"),
        Err(DumpError::Line { line: 1 })
    );
}
