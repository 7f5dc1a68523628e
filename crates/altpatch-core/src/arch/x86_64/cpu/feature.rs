//! The table of features: each one's number, name, where CPUID reports it
//! and what it depends on.

use core::fmt;

/// Where a feature bit lives in CPUID.
#[derive(Clone, Copy)]
pub(super) enum Src {
    /// `cpuid(leaf, subleaf).reg` bit `bit`; reg 0..=3 = eax, ebx, ecx, edx.
    Cpuid(u32, u32, u8, u8),
    /// A hardware fact read from more than one place (vendor-specific
    /// leaves, an MSR); set during detection.
    Derived,
    /// Computed from other facts after detection and after overrides.
    Synthetic,
}

pub(super) const EAX: u8 = 0;
pub(super) const EBX: u8 = 1;
pub(super) const ECX: u8 = 2;
pub(super) const EDX: u8 = 3;

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

            pub(super) const fn source(self) -> Src {
                match self { $( Feature::$variant => $src, )* }
            }

            /// Features that cannot be usable unless this one is.
            pub(crate) const fn requires(self) -> &'static [Feature] {
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
    /// the [`CpuidSource`](super::CpuidSource) can read that MSR.
    Eibrs = 39, "eibrs", Src::Derived, [];
    /// Bus lock detection (CPUID.7.0:ECX\[24\]): no CPU affected by
    /// Indirect Target Selection has it (Linux uses it to tell a guest on
    /// unaffected hardware).
    BusLockDetect = 40, "bus_lock_detect", Src::Cpuid(7, 0, ECX, 24), [];
    /// `IA32_ARCH_CAPABILITIES.ITS_NO` (bit 62): the CPU is not affected by
    /// Indirect Target Selection; only known when the
    /// [`CpuidSource`](super::CpuidSource) can read that MSR.
    ItsNo = 41, "its_no", Src::Derived, [];
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

    /// Whether this bit is read from CPUID (an instruction set or hardware
    /// capability) rather than derived or synthetic.
    pub fn is_instruction_set(self) -> bool {
        matches!(self.source(), Src::Cpuid(..))
    }

    pub(crate) const fn mask(self) -> u64 {
        1u64 << self as u8
    }
}
