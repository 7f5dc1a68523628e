//! Choosing a retpoline mode.

use alloc::borrow::Cow;
use core::fmt;

use super::verdict::{KernelMitigation, KernelView};
use super::{Mode, Setting};
use crate::cpu::{Feature, Features, Vendor};

/// What return-thunk sites (`jmp __x86_return_thunk`, `jcc` to it) become.
///
/// ```
/// use altpatch::retpoline::{Mode, Policy, ReturnSites};
/// let p = Policy::new(Mode::Plain, "example");
/// assert_eq!(p.returns, ReturnSites::Ret);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReturnSites {
    /// `ret` (this crate's `__x86_return_thunk` is a plain return, so this
    /// changes nothing but the cost). The default.
    Ret,
    /// A direct `jmp`/`jcc` to the return thunk at this address, which the
    /// embedder supplies (a kernel with its own Retbleed or SRSO thunk). It
    /// must lie in the image's text, within reach of every site.
    Thunk(usize),
}

/// A mode and why it was chosen.
///
/// ```
/// use altpatch::cpu::{Feature, Features, Overrides, Vendor};
/// use altpatch::retpoline::{Mode, Policy};
///
/// let intel = Features::none().with_vendor(Vendor::Intel, 6, 0x55);
/// assert_eq!(Policy::auto(&intel).mode, Mode::Generic);
/// assert_eq!(Policy::auto(&intel.with(Feature::Eibrs)).mode, Mode::Plain);
/// let forced = Policy::choose(&intel, &Overrides::parse("retpoline=lfence").unwrap());
/// assert_eq!(forced.mode, Mode::Lfence);
/// assert!(forced.reason.contains("retpoline=lfence"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The mode.
    pub mode: Mode,
    /// Why, in a sentence.
    pub reason: Cow<'static, str>,
    /// What return-thunk sites become ([`ReturnSites::Ret`] unless set with
    /// [`Policy::with_return_thunk`]).
    pub returns: ReturnSites,
    /// Whether the CPU is affected by Indirect Target Selection: in `plain`
    /// (and `lfence`) mode, a site whose `call/jmp *%reg` would end in the
    /// lower half of a cache line keeps a direct branch to an aligned thunk
    /// instead
    /// ([`its_thunk`](super::its_thunk)). Set by [`Policy::auto`],
    /// [`Policy::decide`] and [`Policy::choose`] from the CPU (Linux's rule,
    /// [`its_affected`](super::its_affected)) or the kernel's verdict; a
    /// kernel that read `IA32_ARCH_CAPABILITIES` itself may set it with
    /// [`Policy::with_its`].
    pub its: bool,
}

impl Policy {
    /// `mode`, for `reason`, with return sites made `ret`.
    ///
    /// ```
    /// use altpatch::retpoline::{Mode, Policy};
    /// let p = Policy::new(Mode::Generic, "forced by the test");
    /// assert_eq!(p.to_string(), "generic (forced by the test)");
    /// ```
    pub fn new(mode: Mode, reason: impl Into<Cow<'static, str>>) -> Policy {
        Policy {
            mode,
            reason: reason.into(),
            returns: ReturnSites::Ret,
            its: false,
        }
    }

    /// The same policy, with every return-thunk site routed to the return
    /// thunk at `addr` (see [`ReturnSites::Thunk`]).
    ///
    /// ```
    /// use altpatch::retpoline::{Mode, Policy, ReturnSites};
    /// let p = Policy::new(Mode::Plain, "example").with_return_thunk(0x1000);
    /// assert_eq!(p.returns, ReturnSites::Thunk(0x1000));
    /// ```
    pub fn with_return_thunk(mut self, addr: usize) -> Policy {
        self.returns = ReturnSites::Thunk(addr);
        self
    }

    /// The same policy, routing (or not) inlined sites whose branch would
    /// end in the lower half of a cache line through aligned thunks,
    /// because the CPU is (or is not) affected by Indirect Target
    /// Selection; `why` is added to the reason when `affected`.
    ///
    /// ```
    /// use altpatch::retpoline::{Mode, Policy};
    /// let p = Policy::new(Mode::Plain, "example").with_its(true, "ITS_NO clear");
    /// assert!(p.its && p.reason.contains("ITS_NO clear"));
    /// ```
    pub fn with_its(mut self, affected: bool, why: &str) -> Policy {
        self.its = affected;
        if affected {
            self.reason.to_mut().push_str(&alloc::format!(
                "; Indirect Target Selection: {why}: an inlined site whose branch would end in \
                 the lower half of a cache line calls an aligned thunk instead"
            ));
        }
        self
    }

    /// [`Policy::with_its`] from `features` alone (Linux's rule).
    fn with_its_of(self, features: &Features) -> Policy {
        match super::its_affected(features) {
            Some(why) => self.with_its(true, why),
            None => self,
        }
    }

    /// The mode `features` call for, from CPUID (and the MSR a kernel
    /// reads) alone: `plain` when the CPU restricts indirect branch
    /// prediction itself (enhanced IBRS, AMD Automatic IBRS), else the full
    /// retpoline. A process should use [`Policy::for_process`], which
    /// asks the kernel first: a process cannot read the MSR that shows
    /// enhanced IBRS. `lfence` is never chosen automatically: it is
    /// not sufficient on AMD since 2022 and never was on Intel.
    pub fn auto(features: &Features) -> Policy {
        Policy::cpu_only(features).with_its_of(features)
    }

    /// [`Policy::auto`]'s mode and reason, before Indirect Target
    /// Selection.
    fn cpu_only(features: &Features) -> Policy {
        let (mode, reason) = if features.has(Feature::Eibrs) {
            (
                Mode::Plain,
                "auto: enhanced IBRS (IA32_ARCH_CAPABILITIES.IBRS_ALL) restricts indirect branch \
                 prediction in hardware, so indirect branches need no retpoline",
            )
        } else if features.has(Feature::AutoIbrs) {
            (
                Mode::Plain,
                "auto: AMD Automatic IBRS restricts indirect branch prediction in hardware, so \
                 indirect branches need no retpoline",
            )
        } else {
            match features.vendor() {
                Vendor::Intel => (
                    Mode::Generic,
                    if features.has(Feature::ArchCapabilities) {
                        "auto: Intel CPU without enhanced IBRS (or IA32_ARCH_CAPABILITIES not \
                         readable here): full retpoline"
                    } else {
                        "auto: Intel CPU without enhanced IBRS: full retpoline"
                    },
                ),
                Vendor::Amd => (
                    Mode::Generic,
                    "auto: AMD CPU without Automatic IBRS: full retpoline (lfence; jmp is not \
                     sufficient on AMD, CVE-2021-26401)",
                ),
                _ => (
                    Mode::Generic,
                    "auto: unknown vendor: full retpoline, to be safe",
                ),
            }
        };
        let mut reason = Cow::Borrowed(reason);
        if features.has(Feature::Hypervisor) && mode == Mode::Generic {
            reason
                .to_mut()
                .push_str("; running under a hypervisor, which may not pass enhanced or Automatic IBRS through");
        }
        Policy {
            mode,
            reason,
            returns: ReturnSites::Ret,
            its: false,
        }
    }

    /// The mode for a process on Linux: what the running kernel decided
    /// (`kernel`, see [`KernelView`]), then what the CPU says. Rules, in
    /// order, each following Linux (`arch/x86/kernel/cpu/bugs.c`):
    ///
    /// 1. A Spectre v2 verdict with enhanced / Automatic IBRS on (any of
    ///    its forms) → `plain`: the hardware restriction covers user space.
    ///    "Not affected" → `plain`. Every other verdict → `generic`:
    ///    "Retpolines" (no enhanced IBRS, or not enabled), "IBRS" (set on
    ///    kernel entry only), "Vulnerable: LFENCE" (Linux labels the LFENCE
    ///    retpoline vulnerable, so `lfence` is never chosen), "Vulnerable"
    ///    (mitigations off: the kernel's choice, not proof of safety).
    /// 2. No verdict, `/proc/cpuinfo` readable: `ibrs_enhanced` → `plain`;
    ///    `autoibrs` → `plain`, except on an SEV-SNP host (`sev_snp`), where
    ///    Linux does not use Automatic IBRS.
    /// 3. Neither readable: [`Policy::auto`] (CPUID), said in the reason.
    ///
    /// When the result is `generic` on a CPU affected by Retbleed (the
    /// kernel's `retbleed` bug, or Skylake-era Intel and AMD families
    /// 0x15–0x17 from CPUID), the reason adds that the generic retpoline
    /// does not stop return-based attacks.
    ///
    /// ```
    /// use altpatch::cpu::{Feature, Features, Vendor};
    /// use altpatch::retpoline::{KernelVerdict, KernelView, Mode, Policy};
    ///
    /// // An Intel CPU with enhanced IBRS, seen from a process: CPUID shows
    /// // IA32_ARCH_CAPABILITIES exists but the MSR itself is unreadable.
    /// let cpu = Features::none()
    ///     .with_vendor(Vendor::Intel, 6, 0xcf)
    ///     .with(Feature::ArchCapabilities);
    /// assert_eq!(Policy::decide(&cpu, &KernelView::NONE).mode, Mode::Generic);
    /// let kernel = KernelView {
    ///     spectre_v2: Some(KernelVerdict::parse("Mitigation: Enhanced / Automatic IBRS; IBPB: conditional")),
    ///     cpuinfo: None,
    ///     its: None,
    /// };
    /// let p = Policy::decide(&cpu, &kernel);
    /// assert_eq!(p.mode, Mode::Plain);
    /// assert!(p.reason.contains("Mitigation: Enhanced / Automatic IBRS"));
    /// ```
    pub fn decide(features: &Features, kernel: &KernelView) -> Policy {
        use KernelMitigation as K;
        let flags = kernel.cpuinfo.unwrap_or_default();
        let mut policy = if let Some(v) = &kernel.spectre_v2 {
            let (mode, why) = match v.mitigation {
                m if m.hardware_restricts() => (
                    Mode::Plain,
                    "enhanced / Automatic IBRS is on, which restricts indirect branch prediction \
                     in hardware for user space too",
                ),
                K::NotAffected => (Mode::Plain, "this CPU is not affected by Spectre v2"),
                K::Retpolines => (
                    Mode::Generic,
                    "the kernel itself relies on retpolines (no enhanced IBRS in use): full \
                     retpoline",
                ),
                K::Ibrs => (
                    Mode::Generic,
                    "IBRS is set on kernel entry only, which does not cover user space: full \
                     retpoline",
                ),
                K::Lfence => (
                    Mode::Generic,
                    "Linux labels the LFENCE retpoline vulnerable: full retpoline",
                ),
                K::Vulnerable => (
                    Mode::Generic,
                    "the kernel runs without Spectre v2 mitigation (mitigations=off?), which \
                     is its choice, not proof the CPU is safe: full retpoline (retpoline=plain \
                     follows the kernel)",
                ),
                _ => (
                    Mode::Generic,
                    "a verdict this version does not know: full retpoline",
                ),
            };
            let mut reason = alloc::format!("auto: the kernel reports \"{}\": {why}", v.text);
            if mode == Mode::Generic && (features.has(Feature::AutoIbrs) || flags.ibrs_enhanced) {
                reason.push_str(
                    "; the CPU supports enhanced or Automatic IBRS but the kernel does not use it",
                );
            }
            Policy::new(mode, reason)
        } else if let Some(f) = kernel.cpuinfo {
            if f.ibrs_enhanced {
                Policy::new(
                    Mode::Plain,
                    Cow::Borrowed(
                        "auto: /proc/cpuinfo lists ibrs_enhanced (spectre_v2 verdict unreadable): \
                         indirect branch prediction is restricted in hardware",
                    ),
                )
            } else if f.autoibrs && f.sev_snp {
                Policy::new(
                    Mode::Generic,
                    Cow::Borrowed(
                        "auto: Automatic IBRS is not used on an SEV-SNP host (Linux), and the \
                         spectre_v2 verdict is unreadable: full retpoline",
                    ),
                )
            } else if f.autoibrs {
                Policy::new(
                    Mode::Plain,
                    Cow::Borrowed(
                        "auto: /proc/cpuinfo lists autoibrs (spectre_v2 verdict unreadable): \
                         AMD Automatic IBRS restricts indirect branch prediction in hardware",
                    ),
                )
            } else {
                let mut p = Policy::cpu_only(features);
                p.reason
                    .to_mut()
                    .push_str(" (spectre_v2 verdict unreadable)");
                p
            }
        } else {
            let mut p = Policy::cpu_only(features);
            p.reason.to_mut().push_str(
                " (the kernel's spectre_v2 verdict and /proc/cpuinfo are unreadable: CPUID only)",
            );
            p
        };
        if policy.mode == Mode::Generic && (flags.retbleed || retbleed_cpu(features)) {
            policy.reason.to_mut().push_str(
                "; this CPU is affected by Retbleed: the generic retpoline does not stop \
                 return-based attacks (return thunks are the kernel's business)",
            );
        }
        // Indirect Target Selection: the kernel's verdict, else the CPU's.
        match &kernel.its {
            Some(v) if v.starts_with("Not affected") => policy,
            Some(v) => {
                let why = alloc::format!("the kernel reports \"{v}\"");
                policy.with_its(true, &why)
            }
            None => policy.with_its_of(features),
        }
    }

    /// [`Policy::choose`] for a process on Linux (`std`): `retpoline=` from
    /// `overrides`, else [`Policy::decide`] with what this machine's kernel
    /// says ([`KernelView::read`]).
    ///
    /// ```
    /// use altpatch::cpu::{Features, Overrides};
    /// use altpatch::retpoline::Policy;
    /// let p = Policy::for_process(&Features::detect(), &Overrides::none());
    /// println!("{p}");
    /// ```
    #[cfg(feature = "std")]
    pub fn for_process(features: &Features, overrides: &crate::cpu::Overrides) -> Policy {
        match overrides.retpoline() {
            Some(Setting::Mode(_)) => Policy::choose(features, overrides),
            Some(Setting::Auto) | None => Policy::decide(features, &KernelView::read()),
        }
    }

    /// The mode `overrides` set (`retpoline=<mode>`), else [`Policy::auto`].
    pub fn choose(features: &Features, overrides: &crate::cpu::Overrides) -> Policy {
        match overrides.retpoline() {
            Some(Setting::Mode(m)) => {
                Policy::new(m, alloc::format!("forced by retpoline={}", m.name()))
                    .with_its_of(features)
            }
            Some(Setting::Auto) | None => Policy::auto(features),
        }
    }
}

/// CPUs affected by Retbleed by family and model, for when the kernel's
/// `bugs` line is unreadable (Linux `cpu_vuln_blacklist`, `RETBLEED`
/// entries: Skylake-era Intel cores; AMD families 0x15, 0x16, 0x17 and
/// Hygon's 0x18, which reports as AMD here).
fn retbleed_cpu(f: &Features) -> bool {
    match f.vendor() {
        Vendor::Intel => {
            f.family() == 6
                && matches!(
                    f.model(),
                    0x3d | 0x47
                        | 0x3f
                        | 0x45
                        | 0x46
                        | 0x4e
                        | 0x5e
                        | 0x55
                        | 0x8e
                        | 0x9e
                        | 0x66
                        | 0x7e
                        | 0xa5
                        | 0xa6
                        | 0x8a
                        | 0xa7
                )
        }
        Vendor::Amd => matches!(f.family(), 0x15..=0x18),
        _ => false,
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.mode, self.reason)
    }
}
