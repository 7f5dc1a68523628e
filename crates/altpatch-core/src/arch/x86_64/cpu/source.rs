//! Where CPUID answers come from: the CPU itself, or a recorded dump.

use alloc::vec::Vec;
use core::fmt;

use super::CpuidResult;

/// `IA32_ARCH_CAPABILITIES`, the one MSR detection asks a source for.
pub(crate) const MSR_ARCH_CAPABILITIES: u32 = 0x10a;

/// A source of `cpuid` answers (and the few related registers feature
/// detection needs), injectable so that tests can replay other CPUs.
///
/// ```
/// use altpatch::cpu::{CpuidResult, CpuidSource, Feature, Features};
///
/// /// A CPU that reports only leaf 0 and leaf 1 with MOVBE set.
/// struct Tiny;
/// impl CpuidSource for Tiny {
///     fn cpuid(&self, leaf: u32, _subleaf: u32) -> CpuidResult {
///         match leaf {
///             // "GenuineIntel", max basic leaf 1
///             0 => CpuidResult { eax: 1, ebx: 0x756e_6547, ecx: 0x6c65_746e, edx: 0x4965_6e69 },
///             1 => CpuidResult { eax: 0x000106a5, ebx: 0, ecx: 1 << 22, edx: 0 },
///             _ => CpuidResult { eax: 0, ebx: 0, ecx: 0, edx: 0 },
///         }
///     }
///     fn xcr0(&self) -> Option<u64> { None }
/// }
/// let f = Features::from_source(&Tiny);
/// assert!(f.has(Feature::Movbe));
/// assert_eq!(f.family(), 6);
/// ```
pub trait CpuidSource {
    /// The answer to `cpuid` with `eax = leaf`, `ecx = subleaf`.
    fn cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult;

    /// `XCR0` as read by `xgetbv` with `ecx = 0`, or `None` when the OS has
    /// not enabled XSAVE (CPUID.1:ECX.OSXSAVE clear), in which case `xgetbv`
    /// would fault.
    fn xcr0(&self) -> Option<u64>;

    /// The value of model-specific register `index`, where the source can
    /// read it (ring 0, or a recording). Detection asks only for
    /// `IA32_ARCH_CAPABILITIES` (`0x10a`), and only when CPUID says it exists.
    fn msr(&self, index: u32) -> Option<u64> {
        let _ = index;
        None
    }
}

#[cfg(target_arch = "x86_64")]
/// The CPU this code runs on: the `cpuid` and `xgetbv` instructions.
///
/// Works in `no_std` too. [`HostCpuid::with_msr_reader`] lets a kernel that
/// runs at CPL 0 supply `rdmsr`, so enhanced IBRS can be seen.
#[derive(Clone, Copy, Default)]
pub struct HostCpuid {
    msr: Option<fn(u32) -> Option<u64>>,
}

#[cfg(target_arch = "x86_64")]
impl HostCpuid {
    /// The host CPU, without MSR access.
    pub const fn new() -> Self {
        HostCpuid { msr: None }
    }

    /// The host CPU, reading MSRs through `read` (which must return `None`
    /// rather than fault for an MSR the CPU lacks).
    pub const fn with_msr_reader(read: fn(u32) -> Option<u64>) -> Self {
        HostCpuid { msr: Some(read) }
    }
}

#[cfg(target_arch = "x86_64")]
impl fmt::Debug for HostCpuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostCpuid")
            .field("msr_reader", &self.msr.is_some())
            .finish()
    }
}

#[cfg(target_arch = "x86_64")]
impl CpuidSource for HostCpuid {
    fn cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult {
        raw_cpuid::native_cpuid::cpuid_count(leaf, subleaf)
    }

    fn xcr0(&self) -> Option<u64> {
        const OSXSAVE: u32 = 1 << 27;
        if self.cpuid(1, 0).ecx & OSXSAVE == 0 {
            return None;
        }
        let (lo, hi): (u32, u32);
        // SAFETY: OSXSAVE is set, so the OS enabled XSAVE (CR4.OSXSAVE) and
        // `xgetbv` with ecx = 0 cannot fault; it only reads XCR0 into edx:eax.
        unsafe {
            core::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi,
                options(nomem, nostack, preserves_flags));
        }
        Some(((hi as u64) << 32) | lo as u64)
    }

    fn msr(&self, index: u32) -> Option<u64> {
        self.msr.and_then(|read| read(index))
    }
}

/// Adapts any [`CpuidSource`] to raw-cpuid's reader trait.
#[derive(Clone, Copy)]
pub(crate) struct Reader<'a>(pub &'a dyn CpuidSource);

impl raw_cpuid::CpuIdReader for Reader<'_> {
    fn cpuid2(&self, eax: u32, ecx: u32) -> CpuidResult {
        self.0.cpuid(eax, ecx)
    }
}

/// A CPUID dump recorded from some CPU, replayed as a [`CpuidSource`].
///
/// The text format is line based; `#` starts a comment:
///
/// ```text
/// cpuid <leaf> <subleaf> <eax> <ebx> <ecx> <edx>   (hex, no 0x)
/// xcr0 <value>                                     (hex; absent = OSXSAVE off)
/// msr <index> <value>                              (hex)
/// ```
///
/// [`dump`] writes this format, so a dump taken on one machine (or inside a
/// QEMU guest, as the test fixtures were) can be replayed anywhere. Leaves
/// that were not recorded answer all zeros, like leaves beyond a CPU's
/// maximum.
///
/// ```
/// use altpatch::cpu::{Feature, Features, RecordedCpuid};
///
/// let cpu = RecordedCpuid::parse("
///     cpuid 0 0 00000007 756e6547 6c65746e 49656e69  # GenuineIntel
///     cpuid 1 0 000306c3 00000000 00400000 00000000  # movbe
///     cpuid 7 0 00000000 00000008 00000000 00000000  # bmi1
/// ").unwrap();
/// let f = Features::from_source(&cpu);
/// assert!(f.has(Feature::Movbe) && f.has(Feature::Bmi1) && !f.has(Feature::Avx));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordedCpuid {
    leaves: Vec<(u32, u32, CpuidResult)>,
    xcr0: Option<u64>,
    msrs: Vec<(u32, u64)>,
}

/// A line of a CPUID dump that could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedCpuidError {
    /// 1-based line number.
    pub line: usize,
    /// What was wrong with it.
    pub reason: &'static str,
}

impl fmt::Display for RecordedCpuidError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cpuid dump line {}: {}", self.line, self.reason)
    }
}

impl core::error::Error for RecordedCpuidError {}

fn hex_u32(s: Option<&str>) -> Result<u32, &'static str> {
    let s = s.ok_or("missing field")?;
    u32::from_str_radix(s, 16).map_err(|_| "field is not a 32-bit hex number")
}

fn hex_u64(s: Option<&str>) -> Result<u64, &'static str> {
    let s = s.ok_or("missing field")?;
    u64::from_str_radix(s, 16).map_err(|_| "field is not a 64-bit hex number")
}

impl RecordedCpuid {
    /// Parses a dump in the format described on the type.
    pub fn parse(text: &str) -> Result<Self, RecordedCpuidError> {
        let mut rec = RecordedCpuid::default();
        for (number, line) in crate::arch::dump::dump_lines(text) {
            let err = |reason| RecordedCpuidError {
                line: number,
                reason,
            };
            let mut fields = line.split_whitespace();
            match fields.next() {
                Some("cpuid") => {
                    let leaf = hex_u32(fields.next()).map_err(err)?;
                    let sub = hex_u32(fields.next()).map_err(err)?;
                    let eax = hex_u32(fields.next()).map_err(err)?;
                    let ebx = hex_u32(fields.next()).map_err(err)?;
                    let ecx = hex_u32(fields.next()).map_err(err)?;
                    let edx = hex_u32(fields.next()).map_err(err)?;
                    rec.leaves
                        .push((leaf, sub, CpuidResult { eax, ebx, ecx, edx }));
                }
                Some("xcr0") => rec.xcr0 = Some(hex_u64(fields.next()).map_err(err)?),
                Some("msr") => {
                    let index = hex_u32(fields.next()).map_err(err)?;
                    let value = hex_u64(fields.next()).map_err(err)?;
                    rec.msrs.push((index, value));
                }
                _ => return Err(err("expected `cpuid`, `xcr0` or `msr`")),
            }
            if fields.next().is_some() {
                return Err(err("too many fields"));
            }
        }
        if !rec.leaves.iter().any(|&(l, s, _)| l == 0 && s == 0) {
            return Err(RecordedCpuidError {
                line: 0,
                reason: "dump has no leaf 0",
            });
        }
        Ok(rec)
    }
}

impl CpuidSource for RecordedCpuid {
    fn cpuid(&self, leaf: u32, subleaf: u32) -> CpuidResult {
        self.leaves
            .iter()
            .find(|&&(l, s, _)| l == leaf && s == subleaf)
            .map(|&(_, _, r)| r)
            .unwrap_or(CpuidResult {
                eax: 0,
                ebx: 0,
                ecx: 0,
                edx: 0,
            })
    }

    fn xcr0(&self) -> Option<u64> {
        self.xcr0
    }

    fn msr(&self, index: u32) -> Option<u64> {
        self.msrs
            .iter()
            .find(|&&(i, _)| i == index)
            .map(|&(_, v)| v)
    }
}

/// Leaves whose answer depends on the subleaf in `ecx`, with how many
/// subleaves to record.
fn subleaves(leaf: u32) -> u32 {
    match leaf {
        0x4 | 0x8000_001d => 8,
        0x7 => 3,
        0xb | 0x1f => 4,
        0xd => 20,
        0xf | 0x10 | 0x12 | 0x14 | 0x17 | 0x18 | 0x1d | 0x1e | 0x20 | 0x23 | 0x24 => 4,
        0x8000_0020 | 0x8000_0026 => 4,
        _ => 1,
    }
}

/// Writes a dump of `source` in the [`RecordedCpuid`] text format: every basic
/// leaf up to the maximum, the hypervisor leaves when a hypervisor is
/// present, every extended leaf, XCR0 and `IA32_ARCH_CAPABILITIES` where
/// readable.
///
/// ```
/// use altpatch::cpu::{dump, HostCpuid, RecordedCpuid, Features};
/// let text = dump(&HostCpuid::new()).to_string();
/// let replayed = RecordedCpuid::parse(&text).unwrap();
/// assert_eq!(Features::from_source(&replayed), Features::from_source(&HostCpuid::new()));
/// ```
pub fn dump(source: &dyn CpuidSource) -> impl fmt::Display + '_ {
    struct Dump<'a>(&'a dyn CpuidSource);
    impl fmt::Display for Dump<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let src = self.0;
            writeln!(f, "# altpatch cpuid dump v1")?;
            let mut ranges: [(u32, u32); 3] = [(0, src.cpuid(0, 0).eax.min(0x40)), (0, 0), (0, 0)];
            if src.cpuid(1, 0).ecx & (1 << 31) != 0 {
                let max = src.cpuid(0x4000_0000, 0).eax;
                if (0x4000_0000..0x4000_0100).contains(&max) {
                    ranges[1] = (0x4000_0000, max);
                }
            }
            let ext = src.cpuid(0x8000_0000, 0).eax;
            if (0x8000_0000..0x8000_0100).contains(&ext) {
                ranges[2] = (0x8000_0000, ext);
            }
            for (i, &(lo, hi)) in ranges.iter().enumerate() {
                if i > 0 && lo == 0 {
                    continue;
                }
                for leaf in lo..=hi {
                    for sub in 0..subleaves(leaf) {
                        let r = src.cpuid(leaf, sub);
                        writeln!(
                            f,
                            "cpuid {leaf:08x} {sub:08x} {:08x} {:08x} {:08x} {:08x}",
                            r.eax, r.ebx, r.ecx, r.edx
                        )?;
                    }
                }
            }
            if let Some(x) = src.xcr0() {
                writeln!(f, "xcr0 {x:016x}")?;
            }
            if let Some(v) = src.msr(MSR_ARCH_CAPABILITIES) {
                writeln!(f, "msr {:08x} {v:016x}", MSR_ARCH_CAPABILITIES)?;
            }
            Ok(())
        }
    }
    Dump(source)
}
