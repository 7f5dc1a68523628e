//! What an AArch64 CPU has: the features alternatives and ifuncs choose
//! by, read from the ID registers (what a kernel reads with `MRS`, and what
//! Linux lets user space read too, sanitized) or from the kernel's
//! `AT_HWCAP`/`AT_HWCAP2`, and recorded ID-register dumps that replay a
//! machine (`tests/fixtures/aarch64/`).
//!
//! The field meanings are the Arm ARM's (`ID_AA64ISAR0_EL1`, ...); where a
//! feature needs a field at some level, the level is the one Linux asks
//! before it sets the matching `HWCAP` bit (SSBS: the `MSR SSBS`
//! instruction; MTE: MTE2), so that both sources agree on the same CPU.
//! Reading the registers on the CPU itself is the port's next part (issue
//! 29): this module decodes values from wherever they come.

use core::fmt;

/// A CPU feature (the names are Linux's `/proc/cpuinfo` ones, which
/// `ALTPATCH=` overrides will use).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
#[allow(missing_docs)] // each is named by its `name()`, the kernel's word
pub enum Feature {
    Fp,
    Asimd,
    Fp16,
    Aes,
    Pmull,
    Sha1,
    Sha2,
    Sha512,
    Sha3,
    Crc32,
    /// Large System Extensions: the atomic instructions (`CAS`, `LDADD`).
    Lse,
    Rdm,
    Dotprod,
    Flagm,
    Rng,
    Dcpop,
    Jscvt,
    Fcma,
    Lrcpc,
    /// Pointer authentication of addresses.
    Paca,
    /// Generic pointer authentication (`PACGA`).
    Pacg,
    Sb,
    I8mm,
    Bf16,
    Sve,
    Sve2,
    Dit,
    /// Branch Target Identification.
    Bti,
    Ssbs,
    /// Memory Tagging (MTE2).
    Mte,
}

impl Feature {
    /// Every feature, in discriminant order.
    pub const ALL: &'static [Feature] = &[
        Feature::Fp,
        Feature::Asimd,
        Feature::Fp16,
        Feature::Aes,
        Feature::Pmull,
        Feature::Sha1,
        Feature::Sha2,
        Feature::Sha512,
        Feature::Sha3,
        Feature::Crc32,
        Feature::Lse,
        Feature::Rdm,
        Feature::Dotprod,
        Feature::Flagm,
        Feature::Rng,
        Feature::Dcpop,
        Feature::Jscvt,
        Feature::Fcma,
        Feature::Lrcpc,
        Feature::Paca,
        Feature::Pacg,
        Feature::Sb,
        Feature::I8mm,
        Feature::Bf16,
        Feature::Sve,
        Feature::Sve2,
        Feature::Dit,
        Feature::Bti,
        Feature::Ssbs,
        Feature::Mte,
    ];

    /// Its name: `lse`, `sve2`, ... (as `/proc/cpuinfo` spells it: `fphp`
    /// for FP16 and `atomics` for LSE).
    ///
    /// ```
    /// use altpatch::aarch64::cpu::Feature;
    /// assert_eq!(Feature::Lse.name(), "atomics");
    /// assert_eq!(Feature::from_name("sve2"), Some(Feature::Sve2));
    /// ```
    pub const fn name(self) -> &'static str {
        match self {
            Feature::Fp => "fp",
            Feature::Asimd => "asimd",
            Feature::Fp16 => "fphp",
            Feature::Aes => "aes",
            Feature::Pmull => "pmull",
            Feature::Sha1 => "sha1",
            Feature::Sha2 => "sha2",
            Feature::Sha512 => "sha512",
            Feature::Sha3 => "sha3",
            Feature::Crc32 => "crc32",
            Feature::Lse => "atomics",
            Feature::Rdm => "asimdrdm",
            Feature::Dotprod => "asimddp",
            Feature::Flagm => "flagm",
            Feature::Rng => "rng",
            Feature::Dcpop => "dcpop",
            Feature::Jscvt => "jscvt",
            Feature::Fcma => "fcma",
            Feature::Lrcpc => "lrcpc",
            Feature::Paca => "paca",
            Feature::Pacg => "pacg",
            Feature::Sb => "sb",
            Feature::I8mm => "i8mm",
            Feature::Bf16 => "bf16",
            Feature::Sve => "sve",
            Feature::Sve2 => "sve2",
            Feature::Dit => "dit",
            Feature::Bti => "bti",
            Feature::Ssbs => "ssbs",
            Feature::Mte => "mte",
        }
    }

    /// The feature called `name` (also `lse` for `atomics`).
    pub fn from_name(name: &str) -> Option<Feature> {
        if name == "lse" {
            return Some(Feature::Lse);
        }
        Feature::ALL.iter().copied().find(|f| f.name() == name)
    }

    /// Its bit in [`Features::bits`].
    pub const fn mask(self) -> u64 {
        1 << self as u8
    }

    /// The `AT_HWCAP` (`false`) or `AT_HWCAP2` (`true`) bit Linux reports
    /// it by (its uapi `asm/hwcap.h`).
    pub const fn hwcap_bit(self) -> (bool, u32) {
        match self {
            Feature::Fp => (false, 0),
            Feature::Asimd => (false, 1),
            Feature::Aes => (false, 3),
            Feature::Pmull => (false, 4),
            Feature::Sha1 => (false, 5),
            Feature::Sha2 => (false, 6),
            Feature::Crc32 => (false, 7),
            Feature::Lse => (false, 8),
            Feature::Fp16 => (false, 9),
            Feature::Rdm => (false, 12),
            Feature::Jscvt => (false, 13),
            Feature::Fcma => (false, 14),
            Feature::Lrcpc => (false, 15),
            Feature::Dcpop => (false, 16),
            Feature::Sha3 => (false, 17),
            Feature::Dotprod => (false, 20),
            Feature::Sha512 => (false, 21),
            Feature::Sve => (false, 22),
            Feature::Dit => (false, 24),
            Feature::Flagm => (false, 27),
            Feature::Ssbs => (false, 28),
            Feature::Sb => (false, 29),
            Feature::Paca => (false, 30),
            Feature::Pacg => (false, 31),
            Feature::Sve2 => (true, 1),
            Feature::I8mm => (true, 13),
            Feature::Bf16 => (true, 14),
            Feature::Rng => (true, 16),
            Feature::Bti => (true, 17),
            Feature::Mte => (true, 18),
        }
    }
}

/// A snapshot of what a CPU has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Features {
    bits: u64,
}

/// The ID registers the features are read from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IdRegisters {
    /// `MIDR_EL1`: implementer, part and revision (recorded for the
    /// reader; no feature depends on it).
    pub midr: u64,
    /// `ID_AA64ISAR0_EL1`.
    pub isar0: u64,
    /// `ID_AA64ISAR1_EL1`.
    pub isar1: u64,
    /// `ID_AA64PFR0_EL1`.
    pub pfr0: u64,
    /// `ID_AA64PFR1_EL1`.
    pub pfr1: u64,
    /// `ID_AA64ZFR0_EL1` (SVE's own features).
    pub zfr0: u64,
}

/// The 4-bit field of `reg` at `lsb`, unsigned.
const fn field(reg: u64, lsb: u32) -> u64 {
    (reg >> lsb) & 0xf
}

impl Features {
    /// Nothing.
    pub const fn none() -> Features {
        Features { bits: 0 }
    }

    /// Whether `f` is present.
    pub const fn has(self, f: Feature) -> bool {
        self.bits & f.mask() != 0
    }

    /// With `f` added.
    pub const fn with(self, f: Feature) -> Features {
        Features {
            bits: self.bits | f.mask(),
        }
    }

    /// With `f` removed.
    pub const fn without(self, f: Feature) -> Features {
        Features {
            bits: self.bits & !f.mask(),
        }
    }

    /// One bit per feature (bit *n* is the feature whose discriminant is
    /// *n*).
    pub const fn bits(self) -> u64 {
        self.bits
    }

    /// The features present, in [`Feature::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = Feature> {
        Feature::ALL.iter().copied().filter(move |f| self.has(*f))
    }

    /// What Linux's `AT_HWCAP` and `AT_HWCAP2` say.
    ///
    /// ```
    /// use altpatch::aarch64::cpu::{Feature, Features};
    /// let f = Features::from_hwcap(1 << 8, 1 << 17); // atomics; bti
    /// assert!(f.has(Feature::Lse) && f.has(Feature::Bti) && !f.has(Feature::Sve));
    /// ```
    pub fn from_hwcap(hwcap: u64, hwcap2: u64) -> Features {
        let mut out = Features::none();
        for &f in Feature::ALL {
            let (second, bit) = f.hwcap_bit();
            let word = if second { hwcap2 } else { hwcap };
            if word >> bit & 1 != 0 {
                out = out.with(f);
            }
        }
        out
    }

    /// What the ID registers say, each feature at the level Linux requires
    /// for its `HWCAP` bit.
    ///
    /// ```
    /// use altpatch::aarch64::cpu::{Feature, Features, IdRegisters};
    /// // Neoverse N1 (its TRM's values).
    /// let n1 = IdRegisters {
    ///     isar0: 0x0000_1000_1021_1120,
    ///     isar1: 0x0000_0000_0010_0001,
    ///     pfr0: 0x1100_0000_1011_1112,
    ///     pfr1: 0x20,
    ///     ..IdRegisters::default()
    /// };
    /// let f = Features::from_id_registers(&n1);
    /// assert!(f.has(Feature::Lse) && f.has(Feature::Dotprod) && f.has(Feature::Ssbs));
    /// assert!(!f.has(Feature::Sve) && !f.has(Feature::Sha3));
    /// ```
    pub fn from_id_registers(r: &IdRegisters) -> Features {
        let (i0, i1, p0, p1) = (r.isar0, r.isar1, r.pfr0, r.pfr1);
        // FP and AdvSIMD are signed fields: 0xf means "not implemented".
        let fp = field(p0, 16);
        let simd = field(p0, 20);
        let sve = field(p0, 32) >= 1;
        let checks: [(Feature, bool); 30] = [
            (Feature::Fp, fp != 0xf),
            (Feature::Asimd, simd != 0xf),
            (Feature::Fp16, fp == 1),
            (Feature::Aes, field(i0, 4) >= 1),
            (Feature::Pmull, field(i0, 4) >= 2),
            (Feature::Sha1, field(i0, 8) >= 1),
            (Feature::Sha2, field(i0, 12) >= 1),
            (Feature::Sha512, field(i0, 12) >= 2),
            (Feature::Crc32, field(i0, 16) >= 1),
            (Feature::Lse, field(i0, 20) >= 2),
            (Feature::Rdm, field(i0, 28) >= 1),
            (Feature::Sha3, field(i0, 32) >= 1),
            (Feature::Dotprod, field(i0, 44) >= 1),
            (Feature::Flagm, field(i0, 52) >= 1),
            (Feature::Rng, field(i0, 60) >= 1),
            (Feature::Dcpop, field(i1, 0) >= 1),
            (Feature::Paca, field(i1, 4) >= 1 || field(i1, 8) >= 1),
            (Feature::Jscvt, field(i1, 12) >= 1),
            (Feature::Fcma, field(i1, 16) >= 1),
            (Feature::Lrcpc, field(i1, 20) >= 1),
            (Feature::Pacg, field(i1, 24) >= 1 || field(i1, 28) >= 1),
            (Feature::Sb, field(i1, 36) >= 1),
            (Feature::Bf16, field(i1, 44) >= 1),
            (Feature::I8mm, field(i1, 52) >= 1),
            (Feature::Sve, sve),
            (Feature::Sve2, sve && field(r.zfr0, 0) >= 1),
            (Feature::Dit, field(p0, 48) >= 1),
            (Feature::Bti, field(p1, 0) >= 1),
            (Feature::Ssbs, field(p1, 4) >= 2),
            (Feature::Mte, field(p1, 8) >= 2),
        ];
        checks
            .iter()
            .filter(|(_, on)| *on)
            .fold(Features::none(), |f, (feat, _)| f.with(*feat))
    }
}

/// The registers a dump names, with their field in [`IdRegisters`].
const REGISTERS: [&str; 6] = [
    "MIDR_EL1",
    "ID_AA64ISAR0_EL1",
    "ID_AA64ISAR1_EL1",
    "ID_AA64PFR0_EL1",
    "ID_AA64PFR1_EL1",
    "ID_AA64ZFR0_EL1",
];

/// Why a dump did not parse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DumpError {
    /// Line `line` (1-based) is not `NAME = 0xVALUE` for a known register.
    Line {
        /// The line number.
        line: usize,
    },
}

impl fmt::Display for DumpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let DumpError::Line { line } = self;
        write!(
            f,
            "line {line}: expected `NAME = 0xVALUE` with NAME one of {}",
            REGISTERS.join(", ")
        )
    }
}

impl core::error::Error for DumpError {}

impl IdRegisters {
    fn slot(&mut self, name: &str) -> Option<&mut u64> {
        Some(match name {
            "MIDR_EL1" => &mut self.midr,
            "ID_AA64ISAR0_EL1" => &mut self.isar0,
            "ID_AA64ISAR1_EL1" => &mut self.isar1,
            "ID_AA64PFR0_EL1" => &mut self.pfr0,
            "ID_AA64PFR1_EL1" => &mut self.pfr1,
            "ID_AA64ZFR0_EL1" => &mut self.zfr0,
            _ => return None,
        })
    }

    /// Reads a dump: one `NAME = 0xVALUE` line per register (any order;
    /// absent ones read as 0), `#` comments and blank lines.
    ///
    /// ```
    /// use altpatch::aarch64::cpu::IdRegisters;
    /// let r = IdRegisters::parse("# Cortex-A72\nID_AA64ISAR0_EL1 = 0x11120\n").unwrap();
    /// assert_eq!(r.isar0, 0x11120);
    /// assert_eq!(IdRegisters::parse(&r.to_string()), Ok(r));
    /// ```
    pub fn parse(text: &str) -> Result<IdRegisters, DumpError> {
        let mut r = IdRegisters::default();
        for (number, line) in crate::arch::dump::dump_lines(text) {
            let bad = DumpError::Line { line: number };
            let (name, value) = line.split_once('=').ok_or(bad)?;
            let hex = value.trim().strip_prefix("0x").ok_or(bad)?;
            let value = u64::from_str_radix(&hex.replace('_', ""), 16).map_err(|_| bad)?;
            *r.slot(name.trim()).ok_or(bad)? = value;
        }
        Ok(r)
    }
}

/// The dump format [`IdRegisters::parse`] reads.
impl fmt::Display for IdRegisters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let values = [
            self.midr, self.isar0, self.isar1, self.pfr0, self.pfr1, self.zfr0,
        ];
        for (name, value) in REGISTERS.iter().zip(values) {
            writeln!(f, "{name} = {value:#018x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "cpu_tests.rs"]
mod tests;
