//! The vocabulary of retpoline settings: the modes and the `retpoline=`
//! value an override string can name.
//!
//! It lives below the `retpoline` mechanism (which re-exports both types as
//! `retpoline::Mode` and `retpoline::Setting`) because the override parser
//! in this module must name them, and `cpu` is under every mechanism in the
//! layer map (`ARCHITECTURE.md`).

use core::fmt;

/// How indirect branches through the thunks are executed (see the
/// retpoline module docs (`altpatch::retpoline`) for what each protects against).
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
    /// Choose from the feature snapshot (`altpatch::retpoline::Policy::auto`).
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
