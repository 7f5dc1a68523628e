//! Indirect Target Selection (Intel, 2025): on affected CPUs, an indirect
//! branch whose last byte is in the lower half of a 64-byte cache line may
//! be predicted from an unrelated branch's target. Linux's answer, which
//! this follows (`arch/x86/kernel/alternative.c`): where `plain` (or
//! `lfence`) would put `call/jmp *%reg` so that it ends in a lower half,
//! the site keeps a direct branch to a thunk whose `jmp *%reg` ends in an
//! upper half.
//!
//! Which CPUs are affected is Linux's rule too
//! (`arch/x86/kernel/cpu/common.c`, `vulnerable_to_its`).

use super::Mode;
use super::form::original_form;
use crate::arch::x86_64::{Encoded, Reg};
use crate::cpu::{Feature, Features, Vendor};
use crate::sites::{Site, SiteKind};

/// Why `features` make this CPU one Indirect Target Selection affects
/// (Linux's rule), or `None`:
///
/// 1. `IA32_ARCH_CAPABILITIES.ITS_NO` → not affected;
/// 2. not Intel → not affected;
/// 3. bus lock detection (no affected CPU has it) → not affected;
/// 4. under a hypervisor that did not say `ITS_NO` → affected: the guest
///    may be on, or migrate to, affected hardware;
/// 5. family 6 models Skylake-X from stepping 6 (Cascade Lake), Kaby Lake
///    from stepping 0xc (mobile) or 0xd, Ice Lake (client, server, D),
///    Comet Lake, Tiger Lake, Rocket Lake → affected.
///
/// A process cannot read the MSR, so it cannot see `ITS_NO` and may count
/// a fixed CPU as affected; it asks the kernel first ([`super::Policy::decide`]).
///
/// ```
/// use altpatch::cpu::{Feature, Features, Vendor};
/// use altpatch::retpoline::its_affected;
/// let icelake = Features::none().with_vendor(Vendor::Intel, 6, 0x6a);
/// assert!(its_affected(&icelake).is_some());
/// assert!(its_affected(&icelake.with(Feature::ItsNo)).is_none());
/// let alder = Features::none().with_vendor(Vendor::Intel, 6, 0x97);
/// assert!(its_affected(&alder).is_none());
/// assert!(its_affected(&alder.with(Feature::Hypervisor)).is_some());
/// ```
pub fn its_affected(features: &Features) -> Option<&'static str> {
    if features.has(Feature::ItsNo) || features.vendor() != Vendor::Intel {
        return None;
    }
    if features.has(Feature::BusLockDetect) {
        return None;
    }
    if features.has(Feature::Hypervisor) {
        return Some(
            "under a hypervisor that does not report ITS_NO, the guest may run on affected \
             hardware",
        );
    }
    let (model, stepping) = (features.model(), features.stepping());
    let listed = features.family() == 6
        && match model {
            0x55 => stepping > 5,       // Cascade Lake / Cooper Lake
            0x8e => stepping > 0xb,     // Kaby Lake (mobile), Whiskey/Amber Lake
            0x9e => stepping > 0xc,     // Coffee Lake refresh
            0x7e | 0x6a | 0x6c => true, // Ice Lake client, server, D
            0xa5 | 0xa6 => true,        // Comet Lake
            0x8c | 0x8d | 0xa7 => true, // Tiger Lake, Rocket Lake
            _ => false,
        };
    listed.then_some("an Intel model Linux lists as affected")
}

/// Bytes per ITS thunk slot: a cache line, so each `jmp *%reg` can sit in
/// its upper half.
pub const ITS_SLOT: usize = 64;

/// Where in its slot an ITS thunk's `jmp *%reg` starts: the upper half.
const ITS_ENTRY: usize = 32;

/// One ITS thunk: `int3` up to the upper half, `jmp *%reg`, `int3` to
/// the end of the line. The jump is recorded as intended (the audit then
/// does not report it), the record kept only with the array.
macro_rules! its_slot {
    ($reg:literal) => {
        concat!(
            ".fill 32, 1, 0xcc\n",
            "2: jmp *%",
            $reg,
            "\n",
            ".pushsection ",
            altpatch_core::__altpatch_section!(indirect_ok),
            ",\"ao\",@progbits,",
            its_array_symbol!(),
            "\n.balign 4\n.long 2b - .\n.popsection\n",
            ".balign 64, 0xcc\n"
        )
    };
}

/// The ITS thunk array's symbol, with this copy's tag (named as its
/// record sections are: `altpatch_v1_<tag>_its_thunk_array`).
macro_rules! its_array_symbol {
    () => {
        altpatch_core::__altpatch_section!(its_thunk_array)
    };
}

core::arch::global_asm!(
    concat!(
        ".pushsection .text.altpatch_its_thunks,\"ax\",@progbits\n",
        ".balign 64, 0xcc\n",
        ".globl ",
        its_array_symbol!(),
        "\n.hidden ",
        its_array_symbol!(),
        "\n",
        its_array_symbol!(),
        ":\n",
        its_slot!("rax"),
        its_slot!("rcx"),
        its_slot!("rdx"),
        its_slot!("rbx"),
        // %rsp is never a thunk register: its slot traps.
        ".fill 64, 1, 0xcc\n",
        its_slot!("rbp"),
        its_slot!("rsi"),
        its_slot!("rdi"),
        its_slot!("r8"),
        its_slot!("r9"),
        its_slot!("r10"),
        its_slot!("r11"),
        its_slot!("r12"),
        its_slot!("r13"),
        its_slot!("r14"),
        its_slot!("r15"),
        ".popsection\n"
    ),
    options(att_syntax)
);

unsafe extern "C" {
    #[link_name = its_array_symbol!()]
    static ITS_THUNK_ARRAY: [u8; 0];
}

/// The entry of this copy's ITS thunk for `reg` (`jmp *%reg`, ending in
/// the upper half of its cache line); `None` for `%rsp`.
///
/// ```
/// use altpatch::retpoline::its_thunk;
/// use altpatch::x86::Reg;
/// for r in Reg::ALL.into_iter().filter(|&r| r != Reg::Rsp) {
///     let entry = its_thunk(r).unwrap();
///     let len = if (r as u8) < 8 { 2 } else { 3 };
///     // The jump's last byte is in the upper half of its line.
///     assert_ne!((entry + len - 1) & 0x20, 0);
/// }
/// assert_eq!(its_thunk(Reg::Rsp), None);
/// ```
pub fn its_thunk(reg: Reg) -> Option<usize> {
    let array = (&raw const ITS_THUNK_ARRAY) as usize;
    (reg != Reg::Rsp).then(|| array + reg as usize * ITS_SLOT + ITS_ENTRY)
}

/// Where the `call/jmp *%reg` in `form` (a site's inline form) ends: the
/// offset of its last byte, the ModRM after the form's one `ff` byte (its
/// fillers, `cs` prefixes, short `jcc` and `int3`s have none).
pub(super) fn branch_end(form: &[u8]) -> Option<usize> {
    form.iter().position(|&b| b == 0xff).map(|k| k + 1)
}

/// Whether the `call/jmp *%reg` in `form`, a site's inline form at `addr`,
/// ends in the lower half of its cache line: where an affected CPU may
/// mispredict it (Linux: `cpu_wants_indirect_its_thunk_at`).
pub(super) fn branch_in_lower_half(addr: usize, form: &[u8]) -> bool {
    branch_end(form).is_some_and(|end| (addr + end) & 0x20 == 0)
}

/// The ITS thunk for a thunk site's register (`None` for other sites).
pub(super) fn thunk_for(s: &Site) -> Option<usize> {
    match s.kind {
        SiteKind::IndirectThunk(r) => its_thunk(r),
        _ => None,
    }
}

/// `s`'s own branch (opcode and `cs` prefixes) to the ITS thunk for its
/// register: what a site routed for Indirect Target Selection holds.
pub(super) fn routed_form(s: &Site) -> Option<Encoded> {
    original_form(&Site {
        target: thunk_for(s)?,
        ..*s
    })
}

/// Why a site that Indirect Target Selection keeps off its inline form is
/// left on its thunk: the aligned thunk is this copy's, and a site in
/// another object (a library mapped far from it) may not reach it.
pub(super) const ITS_OUT_OF_REACH: &str = "Indirect Target Selection: the inline branch would end \
     in the lower half of a cache line, and this copy's aligned thunk is out of rel32 reach \
     of the site: left on its thunk";

/// For a site inlined (`plain` or `lfence`) on a CPU affected by Indirect
/// Target Selection (`its`) whose inline branch would end in the lower half
/// of a cache line: its [`routed_form`] (one instruction for one, as the
/// original is), or why there is none ([`ITS_OUT_OF_REACH`]); `None` where
/// the inline form may stay. As in Linux, `lfence` mode is routed too (the
/// thunk has no `lfence`): both modes put the branch at the same place in a
/// site, so they route the same sites and switching between them stays one
/// instruction for one.
pub(super) fn its_form(
    s: &Site,
    inline: &Result<Encoded, &'static str>,
    mode: Mode,
    its: bool,
) -> Option<Result<Encoded, &'static str>> {
    match inline {
        Ok(b) if its && mode != Mode::Generic && branch_in_lower_half(s.addr, b) => {
            Some(routed_form(s).ok_or(ITS_OUT_OF_REACH))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::BranchKind;

    /// A site whose inline branch ends in a lower half goes to the ITS
    /// thunk where it reaches it, and stays on its thunk where it does not
    /// (a library mapped far from this copy); an upper-half one is inlined.
    #[test]
    fn routes_within_reach_and_refuses_beyond() {
        let thunk = its_thunk(Reg::Rax).unwrap();
        let site = |addr: usize| Site {
            addr,
            len: 5,
            form: BranchKind::Call,
            kind: SiteKind::IndirectThunk(Reg::Rax),
            target: thunk,
        };
        // `nopl (%rax); call *%rax`: the branch ends 4 bytes in.
        let lower = (thunk & !63) + 0x1000;
        let form = |s: &Site| super::super::form::inline_form(s, Mode::Plain);
        let near = site(lower);
        assert!(branch_in_lower_half(near.addr, &form(&near).unwrap()));
        let routed = its_form(&near, &form(&near), Mode::Plain, true)
            .unwrap()
            .unwrap();
        assert_eq!(routed, routed_form(&near).unwrap());
        let far = site(lower.wrapping_add(3 << 30));
        assert_eq!(
            its_form(&far, &form(&far), Mode::Plain, true),
            Some(Err(ITS_OUT_OF_REACH))
        );
        let upper = site(lower + 32);
        assert_eq!(its_form(&upper, &form(&upper), Mode::Plain, true), None);
        assert_eq!(its_form(&near, &form(&near), Mode::Plain, false), None);
        assert_eq!(its_form(&near, &form(&near), Mode::Generic, true), None);
    }
}
