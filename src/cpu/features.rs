//! The feature bitset and how it is read from CPUID.

use core::fmt;

use super::source::{CpuidSource, Reader};

/// `IA32_ARCH_CAPABILITIES`.
pub(crate) const MSR_ARCH_CAPABILITIES: u32 = 0x10a;

/// XCR0 bits that must be enabled by the OS for AVX: SSE and YMM state.
const XCR0_AVX: u64 = 0b110;
/// XCR0 bits for AVX-512: SSE, YMM, opmask, ZMM_Hi256, Hi16_ZMM.
const XCR0_AVX512: u64 = 0b1110_0110;

/// Where a feature bit lives in CPUID.
#[derive(Clone, Copy)]
enum Src {
    /// `cpuid(leaf, subleaf).reg` bit `bit`; reg 0..=3 = eax, ebx, ecx, edx.
    Cpuid(u32, u32, u8, u8),
    /// A hardware fact read from more than one place (vendor-specific
    /// leaves, an MSR); set during detection.
    Derived,
    /// Computed from other facts after detection and after overrides.
    Synthetic,
}

const EAX: u8 = 0;
const EBX: u8 = 1;
const ECX: u8 = 2;
const EDX: u8 = 3;

macro_rules! features {
    ($( $(#[$doc:meta])* $variant:ident = $bit:literal, $name:literal, $src:expr, [$($dep:ident),*]; )*) => {
        /// One CPU feature (or synthetic fact) the patcher can decide on.
        ///
        /// The name used in override strings and reports is
        /// [`Feature::name`]; it follows Linux's `/proc/cpuinfo` spelling where
        /// that is the common name (`sse4_2`, `md_clear`), else the mnemonic (`lzcnt`, `sha`).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u8)]
        #[non_exhaustive]
        pub enum Feature {
            $( $(#[$doc])* $variant = $bit, )*
        }

        impl Feature {
            /// Every feature, in bit order.
            pub const ALL: &'static [Feature] = &[ $( Feature::$variant, )* ];

            /// The name used in override strings (`movbe`, `sse4_2`, ...).
            pub const fn name(self) -> &'static str {
                match self { $( Feature::$variant => $name, )* }
            }

            const fn source(self) -> Src {
                match self { $( Feature::$variant => $src, )* }
            }

            /// Features that cannot be usable unless this one is.
            const fn requires(self) -> &'static [Feature] {
                match self { $( Feature::$variant => &[$(Feature::$dep),*], )* }
            }
        }
    };
}

features! {
    /// SSE3.
    Sse3 = 0, "sse3", Src::Cpuid(1, 0, ECX, 0), [];
    /// PCLMULQDQ.
    Pclmulqdq = 1, "pclmulqdq", Src::Cpuid(1, 0, ECX, 1), [];
    /// SSSE3.
    Ssse3 = 2, "ssse3", Src::Cpuid(1, 0, ECX, 9), [Sse3];
    /// FMA3 (needs OS-enabled AVX state).
    Fma = 3, "fma", Src::Cpuid(1, 0, ECX, 12), [Avx];
    /// SSE4.1.
    Sse4_1 = 4, "sse4_1", Src::Cpuid(1, 0, ECX, 19), [Ssse3];
    /// SSE4.2.
    Sse4_2 = 5, "sse4_2", Src::Cpuid(1, 0, ECX, 20), [Sse4_1];
    /// MOVBE (load/store with byte swap).
    Movbe = 6, "movbe", Src::Cpuid(1, 0, ECX, 22), [];
    /// POPCNT.
    Popcnt = 7, "popcnt", Src::Cpuid(1, 0, ECX, 23), [];
    /// AES-NI.
    Aes = 8, "aes", Src::Cpuid(1, 0, ECX, 25), [];
    /// XSAVE, enabled by the OS (CPUID.1:ECX.OSXSAVE).
    Xsave = 9, "xsave", Src::Cpuid(1, 0, ECX, 27), [];
    /// AVX, only when the OS enabled YMM state in XCR0.
    Avx = 10, "avx", Src::Cpuid(1, 0, ECX, 28), [Xsave];
    /// F16C (needs OS-enabled AVX state).
    F16c = 11, "f16c", Src::Cpuid(1, 0, ECX, 29), [Avx];
    /// RDRAND.
    Rdrand = 12, "rdrand", Src::Cpuid(1, 0, ECX, 30), [];
    /// Running under a hypervisor (CPUID.1:ECX\[31\]).
    Hypervisor = 13, "hypervisor", Src::Cpuid(1, 0, ECX, 31), [];
    /// BMI1.
    Bmi1 = 14, "bmi1", Src::Cpuid(7, 0, EBX, 3), [];
    /// AVX2, only when the OS enabled YMM state.
    Avx2 = 15, "avx2", Src::Cpuid(7, 0, EBX, 5), [Avx];
    /// BMI2.
    Bmi2 = 16, "bmi2", Src::Cpuid(7, 0, EBX, 8), [];
    /// Enhanced `rep movsb`/`rep stosb`.
    Erms = 17, "erms", Src::Cpuid(7, 0, EBX, 9), [];
    /// AVX-512 Foundation, only when the OS enabled opmask and ZMM state.
    Avx512f = 18, "avx512f", Src::Cpuid(7, 0, EBX, 16), [Avx];
    /// AVX-512 DQ.
    Avx512dq = 19, "avx512dq", Src::Cpuid(7, 0, EBX, 17), [Avx512f];
    /// RDSEED.
    Rdseed = 20, "rdseed", Src::Cpuid(7, 0, EBX, 18), [];
    /// ADX.
    Adx = 21, "adx", Src::Cpuid(7, 0, EBX, 19), [];
    /// CLFLUSHOPT.
    Clflushopt = 22, "clflushopt", Src::Cpuid(7, 0, EBX, 23), [];
    /// CLWB.
    Clwb = 23, "clwb", Src::Cpuid(7, 0, EBX, 24), [];
    /// SHA extensions.
    Sha = 24, "sha", Src::Cpuid(7, 0, EBX, 29), [];
    /// AVX-512 BW.
    Avx512bw = 25, "avx512bw", Src::Cpuid(7, 0, EBX, 30), [Avx512f];
    /// AVX-512 VL.
    Avx512vl = 26, "avx512vl", Src::Cpuid(7, 0, EBX, 31), [Avx512f];
    /// RDPID.
    Rdpid = 27, "rdpid", Src::Cpuid(7, 0, ECX, 22), [];
    /// Fast short `rep movsb`.
    Fsrm = 28, "fsrm", Src::Cpuid(7, 0, EDX, 4), [];
    /// MD_CLEAR: `verw` flushes microarchitectural buffers.
    MdClear = 29, "md_clear", Src::Cpuid(7, 0, EDX, 10), [];
    /// SERIALIZE instruction.
    Serialize = 30, "serialize", Src::Cpuid(7, 0, EDX, 14), [];
    /// IBRS (Intel SPEC_CTRL, CPUID.7.0:EDX\[26\]; AMD CPUID.80000008:EBX\[14\]).
    Ibrs = 31, "ibrs", Src::Cpuid(7, 0, EDX, 26), [];
    /// IBPB (Intel CPUID.7.0:EDX\[26\]; AMD CPUID.80000008:EBX\[12\]).
    Ibpb = 32, "ibpb", Src::Derived, [];
    /// STIBP (Intel CPUID.7.0:EDX\[27\]; AMD CPUID.80000008:EBX\[15\]).
    Stibp = 33, "stibp", Src::Cpuid(7, 0, EDX, 27), [];
    /// `IA32_ARCH_CAPABILITIES` MSR present (CPUID.7.0:EDX\[29\]).
    ArchCapabilities = 34, "arch_capabilities", Src::Cpuid(7, 0, EDX, 29), [];
    /// Speculative store bypass disable (Intel CPUID.7.0:EDX\[31\]; AMD CPUID.80000008:EBX\[24\]).
    Ssbd = 35, "ssbd", Src::Cpuid(7, 0, EDX, 31), [];
    /// LZCNT (ABM).
    Lzcnt = 36, "lzcnt", Src::Cpuid(0x8000_0001, 0, ECX, 5), [];
    /// RDTSCP.
    Rdtscp = 37, "rdtscp", Src::Cpuid(0x8000_0001, 0, EDX, 27), [];
    /// AMD Automatic IBRS (CPUID.80000021:EAX\[8\]).
    AutoIbrs = 38, "auto_ibrs", Src::Cpuid(0x8000_0021, 0, EAX, 8), [];
    /// Intel enhanced IBRS (`IA32_ARCH_CAPABILITIES.IBRS_ALL`); only known when
    /// the [`CpuidSource`] can read that MSR.
    Eibrs = 39, "eibrs", Src::Derived, [];
    /// Synthetic: `lfence` is dispatch-serializing (always on Intel; on AMD
    /// when CPUID.80000021:EAX\[2\] says so, or when the OS set `DE_CFG\[1\]`, as
    /// Linux does on family 10h and later).
    LfenceSerializing = 48, "lfence_serializing", Src::Synthetic, [];
    /// Synthetic: indirect branches need a retpoline (or another Spectre v2
    /// mitigation) because the CPU has neither enhanced IBRS nor AMD
    /// Automatic IBRS. Conservative: unknown CPUs count as needing it.
    RetpolineNeeded = 49, "retpoline_needed", Src::Synthetic, [];
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Feature {
    /// The feature named `name`. `.` and `-` are accepted for `_`
    /// (`sse4.2`, `sse4-2`), and matching ignores ASCII case.
    ///
    /// ```
    /// use altpatch::cpu::Feature;
    /// assert_eq!(Feature::from_name("sse4.2"), Some(Feature::Sse4_2));
    /// assert_eq!(Feature::from_name("MOVBE"), Some(Feature::Movbe));
    /// assert_eq!(Feature::from_name("nosuch"), None);
    /// ```
    pub fn from_name(name: &str) -> Option<Feature> {
        let norm = |c: u8| match c {
            b'.' | b'-' => b'_',
            c => c.to_ascii_lowercase(),
        };
        Feature::ALL.iter().copied().find(|f| {
            let n = f.name().as_bytes();
            n.len() == name.len() && n.iter().zip(name.bytes()).all(|(&a, b)| a == norm(b))
        })
    }

    /// Whether this bit is computed from other features (and recomputed when
    /// overrides change them) rather than read from the hardware.
    pub fn is_synthetic(self) -> bool {
        matches!(self.source(), Src::Synthetic)
    }

    const fn mask(self) -> u64 {
        1u64 << self as u8
    }
}

/// The CPU vendor, from the CPUID leaf 0 string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Vendor {
    /// `GenuineIntel`.
    Intel,
    /// `AuthenticAMD` (and Hygon's `HygonGenuine`, which follows AMD's
    /// CPUID layout).
    Amd,
    /// Anything else (`CentaurHauls`, `  Shanghai  `, emulators...).
    Other,
}

impl fmt::Display for Vendor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Vendor::Intel => "Intel",
            Vendor::Amd => "AMD",
            Vendor::Other => "other",
        })
    }
}

/// A snapshot of the CPU's features: cheap to copy, compare and pass around.
///
/// Take it once ([`Features::detect`], or [`Features::from_source`] for a
/// recorded CPU), adjust it with [`Overrides`](super::Overrides), and hand
/// it explicitly to every mechanism. Nothing in the crate reads a global
/// snapshot behind your back, except where no argument can carry it —
/// lazily resolved ifuncs and C ifunc resolvers — which read the one you
/// [`publish`](super::publish).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Features {
    bits: u64,
    vendor: Vendor,
    family: u16,
    model: u16,
    stepping: u8,
}

impl Features {
    /// A snapshot with no features and an unknown ("other") vendor; useful
    /// with [`Features::with`] to force a particular set in tests.
    pub const fn none() -> Features {
        Features {
            bits: 0,
            vendor: Vendor::Other,
            family: 0,
            model: 0,
            stepping: 0,
        }
    }

    /// The CPU this code runs on, with the OS facts a process can observe
    /// (XCR0; on Linux, that the kernel made `lfence` serializing on AMD).
    /// No overrides are applied; see [`Features::detect_with_env`].
    pub fn detect() -> Features {
        #[allow(unused_mut)]
        let mut f = Features::from_source(&super::HostCpuid::new());
        #[cfg(all(feature = "std", target_os = "linux"))]
        {
            // Linux sets DE_CFG[1] ("LFENCE is dispatch serializing") at boot
            // on every AMD family from 10h on (arch/x86/kernel/cpu/amd.c), so
            // a process may rely on it even where CPUID does not advertise it.
            if f.vendor == Vendor::Amd && f.family >= 0x10 {
                f.bits |= Feature::LfenceSerializing.mask();
            }
        }
        f
    }

    /// [`Features::detect`], then the overrides in the `ALTPATCH` environment
    /// variable (same syntax as [`Overrides::parse`](super::Overrides::parse)).
    #[cfg(feature = "std")]
    pub fn detect_with_env() -> Result<Features, super::OverrideError> {
        Ok(Features::detect().with_overrides(&super::Overrides::from_env()?))
    }

    /// Reads the snapshot from `source`.
    pub fn from_source(source: &dyn CpuidSource) -> Features {
        let cpuid = raw_cpuid::CpuId::with_cpuid_reader(Reader(source));
        let vendor = match cpuid.get_vendor_info() {
            Some(v) => match v.as_str() {
                "GenuineIntel" => Vendor::Intel,
                "AuthenticAMD" | "HygonGenuine" => Vendor::Amd,
                _ => Vendor::Other,
            },
            None => Vendor::Other,
        };
        let (family, model, stepping) = match cpuid.get_feature_info() {
            Some(fi) => (
                fi.family_id() as u16,
                fi.model_id() as u16,
                fi.stepping_id(),
            ),
            None => (0, 0, 0),
        };
        let max_basic = source.cpuid(0, 0).eax;
        let max_ext = source.cpuid(0x8000_0000, 0).eax;
        let leaf_present = |leaf: u32| {
            if leaf >= 0x8000_0000 {
                (0x8000_0000..0x8001_0000).contains(&max_ext) && leaf <= max_ext
            } else {
                leaf <= max_basic
            }
        };
        let read = |leaf: u32, sub: u32, reg: u8, bit: u8| -> bool {
            if !leaf_present(leaf) {
                return false;
            }
            let r = source.cpuid(leaf, sub);
            let v = [r.eax, r.ebx, r.ecx, r.edx][reg as usize];
            v & (1 << bit) != 0
        };

        let mut bits = 0u64;
        for &f in Feature::ALL {
            if let Src::Cpuid(leaf, sub, reg, bit) = f.source()
                && read(leaf, sub, reg, bit)
            {
                bits |= f.mask();
            }
        }

        // AMD reports the speculation controls in leaf 80000008 instead.
        if read(0x8000_0008, 0, EBX, 14) {
            bits |= Feature::Ibrs.mask();
        }
        if read(0x8000_0008, 0, EBX, 15) {
            bits |= Feature::Stibp.mask();
        }
        if read(0x8000_0008, 0, EBX, 24) {
            bits |= Feature::Ssbd.mask();
        }
        if read(7, 0, EDX, 26) || read(0x8000_0008, 0, EBX, 12) {
            bits |= Feature::Ibpb.mask();
        }

        // Vector state is only usable when the OS enabled it in XCR0; the
        // CPUID bits say only that the CPU implements it.
        let xcr0 = if bits & Feature::Xsave.mask() != 0 {
            source.xcr0().unwrap_or(0)
        } else {
            0
        };
        if xcr0 & XCR0_AVX != XCR0_AVX {
            bits &= !(Feature::Avx.mask()
                | Feature::Avx2.mask()
                | Feature::Fma.mask()
                | Feature::F16c.mask());
        }
        if xcr0 & XCR0_AVX512 != XCR0_AVX512 {
            bits &= !(Feature::Avx512f.mask()
                | Feature::Avx512dq.mask()
                | Feature::Avx512bw.mask()
                | Feature::Avx512vl.mask());
        }

        if bits & Feature::ArchCapabilities.mask() != 0 {
            const IBRS_ALL: u64 = 1 << 1;
            if source.msr(MSR_ARCH_CAPABILITIES).unwrap_or(0) & IBRS_ALL != 0 {
                bits |= Feature::Eibrs.mask();
            }
        }

        // LFENCE_ALWAYS_SERIALIZING on AMD (CPUID 80000021:EAX[2]).
        let amd_lfence = read(0x8000_0021, 0, EAX, 2);
        let mut f = Features {
            bits,
            vendor,
            family,
            model,
            stepping,
        };
        if vendor == Vendor::Intel || (vendor == Vendor::Amd && amd_lfence) {
            f.bits |= Feature::LfenceSerializing.mask();
        }
        f.recompute_retpoline_needed();
        f
    }

    fn recompute_retpoline_needed(&mut self) {
        let immune = self.has(Feature::Eibrs) || self.has(Feature::AutoIbrs);
        if immune {
            self.bits &= !Feature::RetpolineNeeded.mask();
        } else {
            self.bits |= Feature::RetpolineNeeded.mask();
        }
    }

    /// Whether `feature` is present (and, for vector extensions, enabled by
    /// the OS).
    pub const fn has(&self, feature: Feature) -> bool {
        self.bits & feature.mask() != 0
    }

    /// This snapshot with `feature` added. Its prerequisites are not added:
    /// forcing a feature on is a claim about the CPU the caller must make good.
    pub const fn with(mut self, feature: Feature) -> Features {
        self.bits |= feature.mask();
        self
    }

    /// This snapshot with `feature` removed, together with every feature that
    /// depends on it (removing `avx` also removes `avx2`, `fma`, `avx512f`...).
    ///
    /// ```
    /// use altpatch::cpu::{Feature, Features};
    /// let f = Features::none().with(Feature::Avx).with(Feature::Avx2).with(Feature::Movbe);
    /// let g = f.without(Feature::Avx);
    /// assert!(!g.has(Feature::Avx2) && g.has(Feature::Movbe));
    /// ```
    pub fn without(mut self, feature: Feature) -> Features {
        let mut clear = feature.mask();
        // Transitive closure over the small dependency table.
        loop {
            let before = clear;
            for &f in Feature::ALL {
                if f.requires().iter().any(|d| clear & d.mask() != 0) {
                    clear |= f.mask();
                }
            }
            if clear == before {
                break;
            }
        }
        self.bits &= !clear;
        self
    }

    pub(crate) fn set_bits(&mut self, set: u64, clear: u64) {
        for &f in Feature::ALL {
            if clear & f.mask() != 0 {
                *self = self.without(f);
            }
        }
        self.bits |= set;
    }

    pub(crate) fn refresh_synthetic(&mut self) {
        self.recompute_retpoline_needed();
    }

    /// With the vendor set (for tests that force a snapshot).
    pub const fn with_vendor(mut self, vendor: Vendor, family: u16, model: u16) -> Features {
        self.vendor = vendor;
        self.family = family;
        self.model = model;
        self
    }

    /// The vendor.
    pub const fn vendor(&self) -> Vendor {
        self.vendor
    }

    /// Display family (base family plus extended family where the base is 0xF).
    pub const fn family(&self) -> u16 {
        self.family
    }

    /// Display model (base model plus extended model for families 6 and 0xF).
    pub const fn model(&self) -> u16 {
        self.model
    }

    /// Stepping.
    pub const fn stepping(&self) -> u8 {
        self.stepping
    }

    /// The features present, in bit order.
    pub fn iter(&self) -> impl Iterator<Item = Feature> + '_ {
        Feature::ALL.iter().copied().filter(|&f| self.has(f))
    }

    /// The raw bitset (bit `n` is the feature with discriminant `n`).
    pub const fn bits(&self) -> u64 {
        self.bits
    }
}

impl fmt::Display for Features {
    /// One line: `vendor=Intel family=0x6 model=0x1a stepping=3 sse3 ssse3 ...`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "vendor={} family={:#x} model={:#x} stepping={}",
            self.vendor, self.family, self.model, self.stepping
        )?;
        for feat in self.iter() {
            write!(f, " {}", feat.name())?;
        }
        Ok(())
    }
}

impl fmt::Debug for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Features({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_unique_and_names_parse_back() {
        let mut seen = 0u64;
        for &f in Feature::ALL {
            assert_eq!(seen & f.mask(), 0, "{f:?} shares a bit");
            seen |= f.mask();
            assert_eq!(Feature::from_name(f.name()), Some(f));
        }
    }

    #[test]
    fn dependencies_point_backwards() {
        // Every prerequisite must itself be a feature: closure terminates.
        for &f in Feature::ALL {
            for d in f.requires() {
                assert_ne!(*d, f);
            }
        }
    }
}
