//! `init`: the running program's ifuncs, live.

use core::fmt;

use super::{IrelativeError, PltSitesReport, Report, apply, apply_plt_sites};
use crate::cpu::{Features, OverrideError};
use crate::image::Image;
use crate::os::{Process, ProcessBackend};
use crate::poke::PokeError;

/// What [`init`] did.
#[derive(Clone, Debug)]
pub struct InitReport {
    /// The snapshot used (and published).
    pub features: Features,
    /// The `ifunc!` functions.
    pub ifuncs: Report,
    /// The call sites of ELF ifunc symbols (`__attribute__((ifunc))`) made
    /// direct.
    pub plt: PltSitesReport,
    /// Why no call site could be rewritten, if the program's sites are
    /// unavailable (linked without `-Wl,--emit-relocs` and no embedded
    /// table): the stubs were still rewritten.
    pub sites_unavailable: Option<crate::elf::SitesError>,
}

impl fmt::Display for InitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.ifuncs, f)?;
        writeln!(
            f,
            "ELF ifunc call sites: {} made direct, {} already direct",
            self.plt.rewritten.len(),
            self.plt.already_direct
        )?;
        if let Some(e) = &self.sites_unavailable {
            writeln!(f, "call sites unavailable ({e}): stubs only")?;
        }
        Ok(())
    }
}

/// Why [`init`] failed. Nothing was written by the step that failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum InitError {
    /// `ALTPATCH` could not be parsed.
    Overrides(OverrideError),
    /// No live poke.
    Poke(PokeError),
    /// The `ifunc!` batch.
    Ifunc(super::Error),
    /// The ELF ifunc call sites (the `ifunc!` batch was applied).
    Plt(IrelativeError),
}

impl fmt::Display for InitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InitError::Overrides(e) => write!(f, "ALTPATCH: {e}"),
            InitError::Poke(e) => fmt::Display::fmt(e, f),
            InitError::Ifunc(e) => fmt::Display::fmt(e, f),
            InitError::Plt(e) => fmt::Display::fmt(e, f),
        }
    }
}

impl InitError {
    /// The address of the site the error is about, where it names one
    /// (see [`crate::Error::site`]).
    pub fn site(&self) -> Option<usize> {
        match self {
            InitError::Overrides(_) => None,
            InitError::Poke(e) => e.site(),
            InitError::Ifunc(e) => e.site(),
            InitError::Plt(e) => e.site(),
        }
    }
}

impl std::error::Error for InitError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            InitError::Overrides(e) => Some(e),
            // Transparent: these display as the error they hold.
            InitError::Poke(e) => std::error::Error::source(e),
            InitError::Ifunc(e) => std::error::Error::source(e),
            InitError::Plt(e) => std::error::Error::source(e),
        }
    }
}

/// Resolves every ifunc of the running program with
/// [`Features::detect_with_env`] and makes every call direct, live (other
/// threads may be calling them): the `ifunc!` stubs and call sites (see
/// [`apply`]), then the call sites of ELF ifunc symbols, whose GOT slots
/// the dynamic loader (or a static program's start-up code) filled (see
/// [`apply_plt_sites`]). Call sites come from the program's relocations
/// (`-Wl,--emit-relocs`) or embedded table. Calling it again changes
/// nothing.
///
/// ```
/// altpatch::ifunc! {
///     fn two() -> u32 = pick;
/// }
/// extern "C" fn two_impl() -> u32 { 2 }
/// fn pick(_: &altpatch::cpu::Features) -> extern "C" fn() -> u32 { two_impl }
///
/// fn main() -> Result<(), Box<dyn std::error::Error>> {
///     let report = altpatch::ifunc::init()?;
///     assert!(two::ifunc().is_applied());
///     assert_eq!(two(), 2);
///     print!("{report}");
///     Ok(())
/// }
/// ```
pub fn init() -> Result<InitReport, InitError> {
    let features = Features::detect_with_env().map_err(InitError::Overrides)?;
    let image = Image::current();
    let (sites, sites_unavailable) = match crate::elf::current_sites() {
        Ok(s) => (s, None),
        Err(e) => (&[][..], Some(e)),
    };
    // The calls `ifunc!`'s functions recorded need no relocation.
    let ifunc_sites = crate::static_call::with_recorded(sites, crate::sites::SiteKind::Ifunc);
    let mut poke = Process::start_up_poke().map_err(InitError::Poke)?;
    // SAFETY: the start-up poke stores in place only while no other thread
    // exists, else publishes pages atomically (or runs the INT3 protocol);
    // every edit is one instruction for one.
    let ifuncs =
        unsafe { apply(&image, &features, &ifunc_sites, &mut poke) }.map_err(InitError::Ifunc)?;
    // SAFETY: as above; the loader filled the GOT slots before main.
    let plt = unsafe { apply_plt_sites(&image, sites, None, &mut poke) }.map_err(InitError::Plt)?;
    Ok(InitReport {
        features,
        ifuncs,
        plt,
        sites_unavailable,
    })
}
