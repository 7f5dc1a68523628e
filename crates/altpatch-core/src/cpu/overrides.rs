//! Feature overrides from a boot-argument-like string.

use alloc::string::String;
use core::fmt;

use super::{Feature, Features};

/// Adjustments to a [`Features`] snapshot, parsed from a string such as
/// `"nomovbe,noavx2,+erms"`.
///
/// Syntax: comma-separated items, surrounding whitespace ignored.
///
/// | item | meaning |
/// |---|---|
/// | `noNAME` or `-NAME` | treat feature `NAME` (and everything that depends on it) as absent |
/// | `+NAME` or `NAME` | treat `NAME` as present (a claim about the CPU: use with care) |
/// | `retpoline=MODE` | retpoline mode: `auto`, `generic`, `lfence`, `plain` or `off` (see `altpatch::retpoline`) |
/// | `startup=off` | nothing is patched when an object is loaded nor on an ifunc's first call: every site keeps its default, ifuncs take their lazy path (see `altpatch::ifunc`); `startup=on` is the default |
///
/// Names are [`Feature::name`]s; `.` and `-` may stand for `_` (`nosse4.2`).
/// The same string is accepted from a kernel command line
/// (`altpatch=nomovbe,noavx2`, see [`Overrides::from_cmdline`]) and, with the
/// `std` feature, from the `ALTPATCH` environment variable
/// ([`Overrides::from_env`]).
///
/// Synthetic bits (`retpoline_needed`, `lfence_serializing`) are recomputed
/// after the other overrides apply, then overridden themselves if named.
///
/// ```
/// use altpatch::cpu::{Feature, Features, Overrides};
///
/// let cpu = Features::none().with(Feature::Movbe).with(Feature::Avx).with(Feature::Avx2);
/// let o = Overrides::parse("nomovbe, noavx2, +erms").unwrap();
/// let f = cpu.with_overrides(&o);
/// assert!(!f.has(Feature::Movbe) && !f.has(Feature::Avx2));
/// assert!(f.has(Feature::Avx) && f.has(Feature::Erms));
///
/// let err = Overrides::parse("nomovbee").unwrap_err();
/// assert!(err.to_string().contains("movbee"));
/// assert!(err.to_string().contains("valid names: sse3,"));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Overrides {
    set: u64,
    clear: u64,
    retpoline: Option<crate::cpu::mitigation::Setting>,
    startup: Option<bool>,
}

/// Why an override string was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum OverrideError {
    /// An item named no known feature.
    UnknownFeature {
        /// The item as written.
        item: String,
        /// The name that was looked up.
        name: String,
    },
    /// An item of the form `key=value` with an unknown key.
    UnknownOption {
        /// The key.
        key: String,
    },
    /// A known option with a value it does not accept.
    BadValue {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// The accepted values.
        valid: &'static str,
    },
    /// The `ALTPATCH` environment variable is not valid UTF-8.
    NotUnicode,
    /// A safe entry point was asked to add an instruction-set feature the
    /// CPU does not have (`+avx2` on a CPU without AVX2): code trusting the
    /// snapshot would then run instructions the CPU lacks. Only removals
    /// (and the derived or synthetic facts, `eibrs`, `retpoline_needed`,
    /// ...) apply there; apply an addition yourself with
    /// [`Features::with_overrides`], as your own claim.
    Unverified {
        /// The feature claimed.
        name: &'static str,
    },
}

impl fmt::Display for OverrideError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OverrideError::UnknownFeature { item, name } => {
                write!(
                    f,
                    "unknown CPU feature `{name}` in override `{item}`; valid names: "
                )?;
                for (i, feat) in Feature::ALL.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    f.write_str(feat.name())?;
                }
                f.write_str(" (prefix `no` or `-` to remove, `+` to add)")
            }
            OverrideError::UnknownOption { key } => {
                write!(
                    f,
                    "unknown override option `{key}=`; valid options: retpoline=, startup="
                )
            }
            OverrideError::BadValue { key, value, valid } => {
                write!(f, "bad value `{value}` for `{key}=`; valid values: {valid}")
            }
            OverrideError::NotUnicode => f.write_str("ALTPATCH is not valid UTF-8"),
            OverrideError::Unverified { name } => write!(
                f,
                "override `+{name}`: this CPU does not have {name}, and code trusting the \
                 snapshot would run its instructions; only removals apply here (use \
                 Features::with_overrides to make the claim yourself)"
            ),
        }
    }
}

impl core::error::Error for OverrideError {}

/// Why one item was rejected, borrowing the text (no allocation).
#[derive(Clone, Copy, Debug)]
pub(crate) enum ItemError<'a> {
    UnknownFeature { item: &'a str, name: &'a str },
    UnknownOption { key: &'a str },
    BadValue { key: &'a str, value: &'a str },
}

impl ItemError<'_> {
    fn into_owned(self) -> OverrideError {
        match self {
            ItemError::UnknownFeature { item, name } => OverrideError::UnknownFeature {
                item: item.into(),
                name: name.into(),
            },
            ItemError::UnknownOption { key } => OverrideError::UnknownOption { key: key.into() },
            ItemError::BadValue { key, value } => OverrideError::BadValue {
                key: key.into(),
                value: value.into(),
                valid: if key.trim_ascii() == "startup" {
                    "on, off"
                } else {
                    crate::cpu::mitigation::Setting::NAMES
                },
            },
        }
    }
}

impl Overrides {
    /// No adjustments.
    pub const fn none() -> Overrides {
        Overrides {
            set: 0,
            clear: 0,
            retpoline: None,
            startup: None,
        }
    }

    /// The `retpoline=` setting, if one was given.
    pub fn retpoline(&self) -> Option<crate::cpu::mitigation::Setting> {
        self.retpoline
    }

    /// The `startup=` setting, if one was given: whether objects are
    /// patched when loaded and ifuncs' stubs on their first call.
    ///
    /// ```
    /// use altpatch::cpu::Overrides;
    /// assert_eq!(Overrides::parse("startup=off").unwrap().startup(), Some(false));
    /// assert_eq!(Overrides::parse("nomovbe").unwrap().startup(), None);
    /// ```
    pub fn startup(&self) -> Option<bool> {
        self.startup
    }

    /// Parses an override string (syntax on the type). An empty string is
    /// valid and changes nothing.
    pub fn parse(s: &str) -> Result<Overrides, OverrideError> {
        let mut o = Overrides::none();
        for raw in split_at_ascii(s, b',') {
            o.apply_item(raw).map_err(ItemError::into_owned)?;
        }
        Ok(o)
    }

    /// [`parse`](Self::parse) without building an error: `None` if the
    /// string is invalid. Allocation-free, for code that runs before the
    /// allocator may be used (C ifunc resolvers inside the dynamic loader).
    pub(crate) fn parse_quiet(s: &str) -> Option<Overrides> {
        let mut o = Overrides::none();
        for raw in split_at_ascii(s, b',') {
            o.apply_item(raw).ok()?;
        }
        Some(o)
    }

    /// Applies one comma-separated item (surrounding ASCII whitespace
    /// allowed; empty items change nothing). Parsing item by item gives exactly what
    /// [`parse`](Self::parse) gives for the whole string.
    pub(crate) fn apply_item<'a>(&mut self, raw: &'a str) -> Result<(), ItemError<'a>> {
        let item = raw.trim_ascii();
        if item.is_empty() {
            return Ok(());
        }
        if let Some(eq) = item.bytes().position(|b| b == b'=') {
            // An ASCII byte is a character boundary.
            let (key, value) = (&item[..eq], &item[eq + 1..]);
            return match key.trim_ascii() {
                "retpoline" => {
                    let setting = crate::cpu::mitigation::Setting::parse(value.trim_ascii())
                        .ok_or(ItemError::BadValue { key, value })?;
                    self.retpoline = Some(setting);
                    Ok(())
                }
                "startup" => {
                    self.startup = Some(match value.trim_ascii() {
                        "on" => true,
                        "off" => false,
                        _ => return Err(ItemError::BadValue { key, value }),
                    });
                    Ok(())
                }
                _ => Err(ItemError::UnknownOption { key }),
            };
        }
        let (enable, name) = if let Some(n) = item.strip_prefix('+') {
            (true, n)
        } else if let Some(n) = item.strip_prefix('-') {
            (false, n)
        } else if Feature::from_name(item).is_some() {
            (true, item)
        } else if let Some(n) = item.strip_prefix("no") {
            (false, n)
        } else {
            (true, item)
        };
        let feat = Feature::from_name(name).ok_or(ItemError::UnknownFeature { item, name })?;
        let m = 1u64 << feat as u8;
        if enable {
            self.set |= m;
            self.clear &= !m;
        } else {
            self.clear |= m;
            self.set &= !m;
        }
        Ok(())
    }

    /// Finds every `altpatch=...` word in a kernel command line and parses
    /// their values (later words win).
    ///
    /// ```
    /// use altpatch::cpu::{Feature, Features, Overrides};
    /// let o = Overrides::from_cmdline("console=ttyS0 altpatch=nomovbe quiet").unwrap();
    /// assert!(!Features::none().with(Feature::Movbe).with_overrides(&o).has(Feature::Movbe));
    /// ```
    pub fn from_cmdline(cmdline: &str) -> Result<Overrides, OverrideError> {
        let mut o = Overrides::none();
        for word in cmdline.split_ascii_whitespace() {
            if let Some(v) = word.strip_prefix("altpatch=") {
                o = o.then(&Overrides::parse(v)?);
            }
        }
        Ok(o)
    }

    /// Parses the `ALTPATCH` environment variable; unset means no overrides.
    #[cfg(feature = "std")]
    pub fn from_env() -> Result<Overrides, OverrideError> {
        match std::env::var("ALTPATCH") {
            Ok(v) => Overrides::parse(&v),
            Err(std::env::VarError::NotPresent) => Ok(Overrides::none()),
            Err(std::env::VarError::NotUnicode(_)) => Err(OverrideError::NotUnicode),
        }
    }

    /// The first instruction-set feature this adds that `detected` does not
    /// have (derived and synthetic facts are not instruction sets and are
    /// never reported).
    ///
    /// ```
    /// use altpatch::cpu::{Feature, Features, Overrides};
    /// let cpu = Features::none().with(Feature::Sse3);
    /// let o = Overrides::parse("+avx2,nosse3,+eibrs").unwrap();
    /// assert_eq!(o.unverified(&cpu), Some(Feature::Avx2));
    /// assert_eq!(Overrides::parse("+sse3,+eibrs").unwrap().unverified(&cpu), None);
    /// ```
    pub fn unverified(&self, detected: &Features) -> Option<Feature> {
        Feature::ALL
            .iter()
            .copied()
            .find(|&f| self.set & f.mask() != 0 && f.is_instruction_set() && !detected.has(f))
    }

    /// `self` followed by `later`: where both name a feature, `later` wins.
    pub fn then(&self, later: &Overrides) -> Overrides {
        Overrides {
            set: (self.set & !later.clear) | later.set,
            clear: (self.clear & !later.set) | later.clear,
            retpoline: later.retpoline.or(self.retpoline),
            startup: later.startup.or(self.startup),
        }
    }

    /// Whether this changes nothing.
    pub fn is_empty(&self) -> bool {
        self.set == 0 && self.clear == 0 && self.retpoline.is_none() && self.startup.is_none()
    }
}

impl fmt::Display for Overrides {
    /// The canonical string form, which parses back to the same value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for &feat in Feature::ALL {
            let m = 1u64 << feat as u8;
            let prefix = if self.clear & m != 0 {
                "no"
            } else if self.set & m != 0 {
                "+"
            } else {
                continue;
            };
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{prefix}{}", feat.name())?;
        }
        if let Some(r) = self.retpoline {
            if !first {
                f.write_str(",")?;
            }
            write!(f, "retpoline={}", r.name())?;
            first = false;
        }
        if let Some(on) = self.startup {
            if !first {
                f.write_str(",")?;
            }
            f.write_str(if on { "startup=on" } else { "startup=off" })?;
        }
        Ok(())
    }
}

impl Features {
    /// [`Features::detect`], then the overrides in the `ALTPATCH` environment
    /// variable (same syntax as [`Overrides::parse`]).
    ///
    /// An environment variable must not make safe code unsound: adding an
    /// instruction-set feature the CPU lacks (`ALTPATCH=+avx2` without AVX2)
    /// is refused with [`OverrideError::Unverified`],
    /// since code choosing an implementation from the snapshot would run
    /// instructions the CPU does not have. Removals, and additions the CPU
    /// already has, apply; so do the derived and synthetic facts.
    #[cfg(feature = "std")]
    pub fn detect_with_env() -> Result<Features, OverrideError> {
        let detected = Features::detect();
        let o = Overrides::from_env()?;
        if let Some(f) = o.unverified(&detected) {
            return Err(OverrideError::Unverified { name: f.name() });
        }
        Ok(detected.with_overrides(&o))
    }

    /// This snapshot adjusted by `overrides`: removals first (with their
    /// dependents), then additions, then the synthetic bits are recomputed,
    /// then synthetic bits named in `overrides` are applied.
    pub fn with_overrides(&self, overrides: &Overrides) -> Features {
        let synthetic: u64 = Feature::ALL
            .iter()
            .filter(|f| f.is_synthetic())
            .fold(0, |m, &f| m | (1u64 << f as u8));
        let mut f = *self;
        f.set_bits(overrides.set & !synthetic, overrides.clear & !synthetic);
        f.refresh_synthetic();
        f.set_bits(overrides.set & synthetic, overrides.clear & synthetic);
        f
    }
}

/// The pieces of `s` between the bytes `sep` (an ASCII character), as
/// `str::split` gives them — without its searcher, which the parse of
/// `ALTPATCH` would bring into every program that patches at load.
fn split_at_ascii(s: &str, sep: u8) -> impl Iterator<Item = &str> {
    debug_assert!(sep.is_ascii());
    s.as_bytes().split(move |&b| b == sep).map(|piece| {
        // SAFETY: `s` is UTF-8 and is cut only at an ASCII byte, which is
        // never inside a multi-byte character, so each piece is UTF-8.
        unsafe { core::str::from_utf8_unchecked(piece) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn round_trips_through_display() {
        let o = Overrides::parse("nomovbe,+erms,-avx2,sse4.2,retpoline=off").unwrap();
        assert_eq!(Overrides::parse(&o.to_string()).unwrap(), o);
    }

    #[test]
    fn later_items_win() {
        let o = Overrides::parse("nomovbe,+movbe").unwrap();
        assert!(Features::none().with_overrides(&o).has(Feature::Movbe));
        let o = Overrides::parse("+movbe,nomovbe").unwrap();
        let f = Features::none().with(Feature::Movbe).with_overrides(&o);
        assert!(!f.has(Feature::Movbe));
    }

    #[test]
    fn rejects_unknown_names_and_options() {
        let e = Overrides::parse("noavx3").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("`avx3`"), "{msg}");
        for f in Feature::ALL {
            assert!(msg.contains(f.name()), "{msg} lacks {}", f.name());
        }
        assert!(matches!(
            Overrides::parse("frobnicate=1"),
            Err(OverrideError::UnknownOption { .. })
        ));
        let e = Overrides::parse("retpoline=fast").unwrap_err();
        assert!(
            e.to_string().contains("auto, generic, lfence, plain, off"),
            "{e}"
        );
        assert!(Overrides::parse("").unwrap().is_empty());
        assert!(Overrides::parse(" , ,").unwrap().is_empty());
    }

    #[test]
    fn synthetic_bits_follow_facts_unless_named() {
        let cpu = Features::none().with(Feature::Eibrs);
        let mut cpu = cpu;
        cpu.refresh_synthetic();
        assert!(!cpu.has(Feature::RetpolineNeeded));
        let f = cpu.with_overrides(&Overrides::parse("noeibrs").unwrap());
        assert!(f.has(Feature::RetpolineNeeded));
        let f = cpu.with_overrides(&Overrides::parse("noeibrs,noretpoline_needed").unwrap());
        assert!(!f.has(Feature::RetpolineNeeded));
    }
}
