//! Choosing a retpoline mode.

use alloc::borrow::Cow;
use core::fmt;

use crate::cpu::{Feature, Features, Vendor};

/// How indirect branches through the thunks are executed (see the
/// [module docs](super) for what each protects against).
///
/// ```
/// use altpatch::retpoline::Mode;
/// assert_eq!(Mode::Lfence.name(), "lfence");
/// assert_eq!(Mode::Plain.to_string(), "plain");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// The full retpoline (the thunks as built).
    Generic,
    /// `lfence; jmp *%reg`.
    Lfence,
    /// `jmp *%reg`: no software mitigation.
    Plain,
}

impl Mode {
    /// The name used in override strings: `generic`, `lfence`, `plain`.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Generic => "generic",
            Mode::Lfence => "lfence",
            Mode::Plain => "plain",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A `retpoline=` setting: a mode, or `auto`.
///
/// ```
/// use altpatch::retpoline::{Mode, Setting};
/// assert_eq!(Setting::parse("off"), Some(Setting::Mode(Mode::Plain)));
/// assert_eq!(Setting::parse("auto"), Some(Setting::Auto));
/// assert_eq!(Setting::parse("fast"), None);
/// assert_eq!(Setting::Mode(Mode::Generic).name(), "generic");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Setting {
    /// Choose from the feature snapshot ([`Policy::auto`]).
    Auto,
    /// This mode.
    Mode(Mode),
}

impl Setting {
    /// The accepted values, for error messages.
    pub const NAMES: &'static str = "auto, generic, lfence, plain, off";

    /// Parses `auto`, `generic`, `lfence`, `plain` or `off` (= `plain`).
    pub fn parse(s: &str) -> Option<Setting> {
        Some(match s {
            "auto" => Setting::Auto,
            "generic" | "retpoline" => Setting::Mode(Mode::Generic),
            "lfence" => Setting::Mode(Mode::Lfence),
            "plain" | "off" => Setting::Mode(Mode::Plain),
            _ => return None,
        })
    }

    /// The canonical name.
    pub fn name(self) -> &'static str {
        match self {
            Setting::Auto => "auto",
            Setting::Mode(m) => m.name(),
        }
    }
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
}

impl Policy {
    /// The mode `features` call for: `plain` when the CPU restricts indirect
    /// branch prediction itself (enhanced IBRS, AMD Automatic IBRS), else
    /// the full retpoline. `lfence` is never chosen automatically: it is
    /// not sufficient on AMD since 2022 and never was on Intel.
    pub fn auto(features: &Features) -> Policy {
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
        Policy { mode, reason }
    }

    /// The mode `overrides` set (`retpoline=<mode>`), else [`Policy::auto`].
    pub fn choose(features: &Features, overrides: &crate::cpu::Overrides) -> Policy {
        match overrides.retpoline() {
            Some(Setting::Mode(m)) => Policy {
                mode: m,
                reason: Cow::Owned(alloc::format!("forced by retpoline={}", m.name())),
            },
            Some(Setting::Auto) | None => Policy::auto(features),
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.mode, self.reason)
    }
}
