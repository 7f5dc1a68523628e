//! When an alternative applies, as encoded in its record.

use core::fmt;

use crate::cpu::{Feature, Features};

/// When an alternative applies: a feature, its negation, always or never.
///
/// Encoded in a record's 16-bit condition field: the feature number in the
/// low byte, flags above it.
///
/// ```
/// use altpatch::alternative::Condition;
/// use altpatch::cpu::{Feature, Features};
/// let f = Features::none().with(Feature::Movbe);
/// assert!(Condition::feature(Feature::Movbe).holds(&f));
/// assert!(!Condition::not(Feature::Movbe).holds(&f));
/// assert!(Condition::ALWAYS.holds(&f) && !Condition::NEVER.holds(&f));
/// assert_eq!(Condition::not(Feature::Avx2).to_string(), "!avx2");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Condition(u16);

const COND_NOT: u16 = 1 << 8;
const COND_ALWAYS: u16 = 1 << 9;
const COND_NEVER: u16 = 1 << 10;

impl Condition {
    /// Always holds.
    pub const ALWAYS: Condition = Condition(COND_ALWAYS);
    /// Never holds (keeps an alternative in the binary, disabled).
    pub const NEVER: Condition = Condition(COND_NEVER);

    /// Holds when `f` is present.
    pub const fn feature(f: Feature) -> Condition {
        Condition(f as u16)
    }

    /// Holds when `f` is absent.
    pub const fn not(f: Feature) -> Condition {
        Condition(f as u16 | COND_NOT)
    }

    /// The record encoding.
    pub const fn bits(self) -> u16 {
        self.0
    }

    /// Decodes a record's condition, refusing unknown feature numbers and
    /// flags.
    pub fn from_bits(bits: u16) -> Option<Condition> {
        match bits {
            COND_ALWAYS | COND_NEVER => Some(Condition(bits)),
            _ if bits & !(COND_NOT | 0xff) != 0 => None,
            _ => {
                let n = (bits & 0xff) as u8;
                Feature::ALL
                    .iter()
                    .any(|&f| f as u8 == n)
                    .then_some(Condition(bits))
            }
        }
    }

    fn feature_of(self) -> Option<Feature> {
        let n = (self.0 & 0xff) as u8;
        Feature::ALL.iter().copied().find(|&f| f as u8 == n)
    }

    /// Whether the condition holds for `features`.
    pub fn holds(&self, features: &Features) -> bool {
        match self.0 {
            COND_ALWAYS => true,
            COND_NEVER => false,
            bits => {
                let has = self.feature_of().is_some_and(|f| features.has(f));
                if bits & COND_NOT != 0 { !has } else { has }
            }
        }
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            COND_ALWAYS => f.write_str("always"),
            COND_NEVER => f.write_str("never"),
            bits => {
                if bits & COND_NOT != 0 {
                    f.write_str("!")?;
                }
                match self.feature_of() {
                    Some(feat) => f.write_str(feat.name()),
                    None => write!(f, "feature#{}", bits & 0xff),
                }
            }
        }
    }
}

// The record's layout is in `records` (a binary format belongs to no
// mechanism); what its condition means is this module's, below the
// alternatives that act on it.
impl crate::records::AlternativeRecord {
    /// The condition, if the record's encoding is valid.
    pub fn condition(&self) -> Option<Condition> {
        Condition::from_bits(self.condition_bits())
    }
}
