//! What the running Linux kernel says about Spectre v2: its mitigation
//! verdict (`/sys/devices/system/cpu/vulnerabilities/spectre_v2`) and the
//! CPU flags and bugs it lists in `/proc/cpuinfo`.
//!
//! A process cannot read `IA32_ARCH_CAPABILITIES` (an MSR), so CPUID alone
//! cannot show enhanced IBRS; and CPUID only says the CPU *supports*
//! enhanced or Automatic IBRS, not that the kernel turned it on. The kernel
//! knows both, and says so. Parsing is plain string work (no `std`), so the
//! rules are testable with any verdict text; [`KernelView::read`] (`std`)
//! reads this machine's.

use alloc::string::String;

/// The kernel's Spectre v2 mitigation, as
/// `/sys/devices/system/cpu/vulnerabilities/spectre_v2` names it (Linux
/// `arch/x86/kernel/cpu/bugs.c`, `spectre_v2_strings`, and the older
/// spellings of 4.15–5.x).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KernelMitigation {
    /// "Not affected".
    NotAffected,
    /// "Mitigation: Retpolines" (older: "Full generic retpoline",
    /// "Full AMD retpoline", "Full retpoline").
    Retpolines,
    /// "Mitigation: Enhanced / Automatic IBRS" (older: "Enhanced IBRS").
    Eibrs,
    /// "Mitigation: Enhanced / Automatic IBRS + LFENCE".
    EibrsLfence,
    /// "Mitigation: Enhanced / Automatic IBRS + Retpolines".
    EibrsRetpolines,
    /// "Vulnerable: eIBRS with unprivileged eBPF" (and the `+LFENCE ... and
    /// SMT` form): enhanced IBRS is on; the kernel's worry is eBPF.
    EibrsUnprivilegedEbpf,
    /// "Mitigation: IBRS": IBRS set on kernel entry only (no enhanced
    /// IBRS), which does not cover user space.
    Ibrs,
    /// "Vulnerable: LFENCE" (older: "Mitigation: LFENCE"): Linux calls the
    /// LFENCE retpoline vulnerable.
    Lfence,
    /// "Vulnerable" (`mitigations=off`, `spectre_v2=off`) or another
    /// "Vulnerable: ..." form.
    Vulnerable,
    /// A text this parser does not know.
    Unknown,
}

impl KernelMitigation {
    /// Whether the kernel runs with enhanced or Automatic IBRS on, which
    /// restricts indirect branch prediction in hardware for user space too.
    ///
    /// ```
    /// use altpatch::retpoline::KernelMitigation;
    /// assert!(KernelMitigation::EibrsLfence.hardware_restricts());
    /// assert!(!KernelMitigation::Ibrs.hardware_restricts());
    /// ```
    pub fn hardware_restricts(self) -> bool {
        matches!(
            self,
            KernelMitigation::Eibrs
                | KernelMitigation::EibrsLfence
                | KernelMitigation::EibrsRetpolines
                | KernelMitigation::EibrsUnprivilegedEbpf
        )
    }
}

/// The `spectre_v2` file: its mitigation and its text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelVerdict {
    /// What the mitigation is.
    pub mitigation: KernelMitigation,
    /// The file's first line, trimmed (for reasons and reports).
    pub text: String,
}

impl KernelVerdict {
    /// Parses the contents of `spectre_v2`. The mitigation is the text
    /// before the first `;` (or, in kernels before 5.16 or so, `,`); the
    /// rest (`IBPB: ...; STIBP: ...; RSB filling; BHI: ...`) is kept in
    /// `text` only.
    ///
    /// ```
    /// use altpatch::retpoline::{KernelMitigation, KernelVerdict};
    /// let v = KernelVerdict::parse(
    ///     "Mitigation: Enhanced / Automatic IBRS; IBPB: conditional; RSB filling; \
    ///      PBRSB-eIBRS: SW sequence; BHI: BHI_DIS_S\n",
    /// );
    /// assert_eq!(v.mitigation, KernelMitigation::Eibrs);
    /// assert!(v.text.starts_with("Mitigation: Enhanced / Automatic IBRS;"));
    /// ```
    pub fn parse(contents: &str) -> KernelVerdict {
        let text = contents.lines().next().unwrap_or("").trim();
        let head = text.split([';', ',']).next().unwrap_or("").trim();
        use KernelMitigation as K;
        let mitigation = match head {
            "Not affected" => K::NotAffected,
            "Mitigation: Retpolines"
            | "Mitigation: Full generic retpoline"
            | "Mitigation: Full AMD retpoline"
            | "Mitigation: Full retpoline" => K::Retpolines,
            "Mitigation: Enhanced / Automatic IBRS" | "Mitigation: Enhanced IBRS" => K::Eibrs,
            "Mitigation: Enhanced / Automatic IBRS + LFENCE"
            | "Mitigation: Enhanced IBRS + LFENCE" => K::EibrsLfence,
            "Mitigation: Enhanced / Automatic IBRS + Retpolines"
            | "Mitigation: Enhanced IBRS + Retpolines" => K::EibrsRetpolines,
            "Mitigation: IBRS" => K::Ibrs,
            "Vulnerable: LFENCE" | "Mitigation: LFENCE" => K::Lfence,
            h if h.starts_with("Vulnerable: eIBRS") => K::EibrsUnprivilegedEbpf,
            h if h == "Vulnerable" || h.starts_with("Vulnerable") => K::Vulnerable,
            _ => K::Unknown,
        };
        KernelVerdict {
            mitigation,
            text: text.into(),
        }
    }
}

/// What `/proc/cpuinfo` says that matters here (its first `flags` and
/// `bugs` lines).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuinfoFlags {
    /// `ibrs_enhanced`: the kernel found enhanced IBRS (Intel
    /// `IA32_ARCH_CAPABILITIES.IBRS_ALL`, or AMD AutoIBRS which Linux
    /// reports under the same flag).
    pub ibrs_enhanced: bool,
    /// `autoibrs`: the CPU has AMD Automatic IBRS.
    pub autoibrs: bool,
    /// `sev_snp`: this is an SEV-SNP host, where Linux does not use
    /// Automatic IBRS (it slows host user space indirect branches).
    pub sev_snp: bool,
    /// The `bugs` line lists `retbleed`.
    pub retbleed: bool,
}

impl CpuinfoFlags {
    /// Parses `/proc/cpuinfo` (the first CPU's lines are enough).
    ///
    /// ```
    /// use altpatch::retpoline::CpuinfoFlags;
    /// let f = CpuinfoFlags::parse("flags\t\t: fpu sse2 ibrs_enhanced\nbugs\t\t: spectre_v2 retbleed\n");
    /// assert!(f.ibrs_enhanced && f.retbleed && !f.autoibrs);
    /// ```
    pub fn parse(cpuinfo: &str) -> CpuinfoFlags {
        let field = |name: &str| {
            cpuinfo
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    (k.trim() == name).then_some(v)
                })
                .unwrap_or("")
        };
        let flags = field("flags");
        let bugs = field("bugs");
        let has = |list: &str, word: &str| list.split_ascii_whitespace().any(|w| w == word);
        CpuinfoFlags {
            ibrs_enhanced: has(flags, "ibrs_enhanced"),
            autoibrs: has(flags, "autoibrs"),
            sev_snp: has(flags, "sev_snp"),
            retbleed: has(bugs, "retbleed"),
        }
    }
}

/// Everything the running kernel says; `None` where a file was unreadable
/// (not Linux, `/sys` or `/proc` not mounted, a sandbox).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelView {
    /// The Spectre v2 verdict.
    pub spectre_v2: Option<KernelVerdict>,
    /// The `/proc/cpuinfo` flags.
    pub cpuinfo: Option<CpuinfoFlags>,
    /// The Indirect Target Selection verdict
    /// (`/sys/devices/system/cpu/vulnerabilities/indirect_target_selection`,
    /// Linux 6.15 and the stable kernels it was backported to), its first
    /// line: "Not affected", "Vulnerable", "Mitigation: Aligned
    /// branch/return thunks", ...
    pub its: Option<String>,
}

impl KernelView {
    /// Nothing known: the CPUID-only rules apply.
    pub const NONE: KernelView = KernelView {
        spectre_v2: None,
        cpuinfo: None,
        its: None,
    };

    /// What this machine's kernel says (`std`).
    ///
    /// ```
    /// let view = altpatch::retpoline::KernelView::read();
    /// if let Some(v) = &view.spectre_v2 {
    ///     println!("the kernel says: {}", v.text);
    /// }
    /// ```
    #[cfg(feature = "std")]
    pub fn read() -> KernelView {
        // What the kernel publishes, through the OS contract (Linux: sysfs
        // and /proc/cpuinfo).
        use crate::host::Current;
        use crate::host::Host;
        KernelView {
            spectre_v2: Current::vulnerability("spectre_v2").map(|s| KernelVerdict::parse(&s)),
            cpuinfo: Current::cpu_info().map(|s| CpuinfoFlags::parse(&s)),
            its: Current::vulnerability("indirect_target_selection")
                .map(|s| s.lines().next().unwrap_or("").trim().into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use KernelMitigation as K;

    /// Every real form named in the issue, with the suffixes kernels print.
    #[test]
    fn verdict_strings() {
        for (text, want) in [
            (
                "Mitigation: Retpolines; IBPB: conditional; IBRS_FW; STIBP: disabled; RSB filling; PBRSB-eIBRS: Not affected; BHI: Not affected",
                K::Retpolines,
            ),
            (
                "Mitigation: Enhanced / Automatic IBRS; IBPB: conditional; RSB filling; PBRSB-eIBRS: SW sequence; BHI: BHI_DIS_S",
                K::Eibrs,
            ),
            (
                "Mitigation: Enhanced / Automatic IBRS + Retpolines; IBPB: conditional; RSB filling; PBRSB-eIBRS: SW sequence; BHI: Retpoline",
                K::EibrsRetpolines,
            ),
            (
                "Mitigation: Enhanced / Automatic IBRS + LFENCE; IBPB: conditional; RSB filling; BHI: Not affected",
                K::EibrsLfence,
            ),
            (
                "Mitigation: IBRS; IBPB: conditional; STIBP: always-on; RSB filling; PBRSB-eIBRS: Not affected; BHI: Not affected",
                K::Ibrs,
            ),
            (
                "Vulnerable; IBPB: disabled; STIBP: disabled; PBRSB-eIBRS: Not affected; BHI: Not affected",
                K::Vulnerable,
            ),
            (
                "Vulnerable: LFENCE; IBPB: conditional; STIBP: disabled; RSB filling",
                K::Lfence,
            ),
            (
                "Vulnerable: eIBRS with unprivileged eBPF",
                K::EibrsUnprivilegedEbpf,
            ),
            (
                "Vulnerable: eIBRS+LFENCE with unprivileged eBPF and SMT",
                K::EibrsUnprivilegedEbpf,
            ),
            ("Not affected", K::NotAffected),
            // Kernels 4.15–5.15 separate with commas.
            (
                "Mitigation: Full generic retpoline, IBPB: conditional, IBRS_FW, STIBP: disabled, RSB filling",
                K::Retpolines,
            ),
            (
                "Mitigation: Full AMD retpoline, IBPB: conditional, STIBP: disabled, RSB filling",
                K::Retpolines,
            ),
            (
                "Mitigation: Enhanced IBRS, IBPB: conditional, RSB filling",
                K::Eibrs,
            ),
            ("Mitigation: Something new", K::Unknown),
            ("", K::Unknown),
        ] {
            let v = KernelVerdict::parse(&alloc::format!("{text}\n"));
            assert_eq!(v.mitigation, want, "{text:?}");
            assert_eq!(v.text, text);
        }
    }

    #[test]
    fn cpuinfo_takes_the_first_cpu_and_whole_words() {
        let f = CpuinfoFlags::parse(
            "processor\t: 0\nflags\t\t: fpu autoibrs sev_snp\nbugs\t\t: sysret_ss_attrs retbleed_like\n\
             processor\t: 1\nflags\t\t: fpu ibrs_enhanced\n",
        );
        assert_eq!(
            f,
            CpuinfoFlags {
                ibrs_enhanced: false,
                autoibrs: true,
                sev_snp: true,
                retbleed: false,
            }
        );
    }
}
