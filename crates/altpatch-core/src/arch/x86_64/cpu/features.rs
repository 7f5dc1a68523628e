//! The feature bitset and how it is read from CPUID.

use core::fmt;

pub use super::feature::Feature;
use super::feature::{EAX, EBX, EDX, Src};
use super::source::{CpuidSource, MSR_ARCH_CAPABILITIES, Reader};

/// XCR0 bits that must be enabled by the OS for AVX: SSE and YMM state.
const XCR0_AVX: u64 = 0b110;
/// XCR0 bits for AVX-512: SSE, YMM, opmask, ZMM_Hi256, Hi16_ZMM.
const XCR0_AVX512: u64 = 0b1110_0110;

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
/// recorded CPU), adjust it with [`Overrides`](crate::cpu::Overrides), and hand
/// it explicitly to every mechanism. Nothing in the crate reads a global
/// snapshot behind your back, except where no argument can carry it —
/// lazily resolved ifuncs and C ifunc resolvers — which read the one you
/// [`publish`](crate::cpu::publish).
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

    #[cfg(target_arch = "x86_64")]
    /// The CPU this code runs on, with the OS facts a process can observe
    /// (XCR0; on Linux, that the kernel made `lfence` serializing on AMD).
    /// No overrides are applied; see [`Features::detect_with_env`].
    pub fn detect() -> Features {
        use crate::host::Current;
        use crate::host::Host;
        let mut f = Features::from_source(&super::HostCpuid::new());
        // A kernel that makes LFENCE dispatch-serializing on AMD (Linux
        // does, from family 10h on) lets the code it runs rely on it even
        // where CPUID does not advertise it: the OS contract says.
        if Current::AMD_LFENCE_SERIALIZING && f.vendor == Vendor::Amd && f.family >= 0x10 {
            f.bits |= Feature::LfenceSerializing.mask();
        }
        f
    }

    /// Reads the snapshot from `source`.
    pub fn from_source(source: &dyn CpuidSource) -> Features {
        // Each `cpuid` is a VM exit under a hypervisor (microseconds): every
        // leaf is asked once, however many features it holds.
        let cached = Cached {
            inner: source,
            memo: core::cell::RefCell::new([None; 24]),
        };
        let source: &dyn CpuidSource = &cached;
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
            const ITS_NO: u64 = 1 << 62;
            let caps = source.msr(MSR_ARCH_CAPABILITIES).unwrap_or(0);
            if caps & IBRS_ALL != 0 {
                bits |= Feature::Eibrs.mask();
            }
            if caps & ITS_NO != 0 {
                bits |= Feature::ItsNo.mask();
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

/// A [`CpuidSource`] that asks its inner source each (leaf, subleaf) once
/// (the first 24; later ones pass through).
struct Cached<'a> {
    inner: &'a dyn CpuidSource,
    memo: core::cell::RefCell<[Option<(u32, u32, super::CpuidResult)>; 24]>,
}

impl CpuidSource for Cached<'_> {
    fn cpuid(&self, leaf: u32, subleaf: u32) -> super::CpuidResult {
        let mut memo = self.memo.borrow_mut();
        for slot in memo.iter_mut() {
            match slot {
                Some((l, s, r)) if *l == leaf && *s == subleaf => return *r,
                Some(_) => {}
                None => {
                    let r = self.inner.cpuid(leaf, subleaf);
                    *slot = Some((leaf, subleaf, r));
                    return r;
                }
            }
        }
        self.inner.cpuid(leaf, subleaf)
    }

    fn xcr0(&self) -> Option<u64> {
        self.inner.xcr0()
    }

    fn msr(&self, index: u32) -> Option<u64> {
        self.inner.msr(index)
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
