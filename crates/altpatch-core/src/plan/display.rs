//! The dry-run listing of a plan.

#[cfg(feature = "std")]
use crate::arch::disasm;
use core::fmt;

use super::edit::State;
use super::{Edit, Plan};

impl fmt::Display for Plan {
    /// One line per edit, in address order once validated:
    ///
    /// ```text
    /// altpatch plan: 1 edit
    ///   [write] 0x000055d0c0a01234 ret_one: b8 01 00 00 00 -> b8 02 00 00 00  (return 2)
    ///           mov $0x1,%eax -> mov $0x2,%eax
    /// ```
    ///
    /// The status is `check` before validation, `write` for an edit that will
    /// be written, `wrote` for one the last apply wrote, `done` for one whose
    /// new bytes were already in place. The second
    /// line, a disassembly, is printed with the `std` feature.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "altpatch plan: {} edit{}",
            self.edits.len(),
            if self.edits.len() == 1 { "" } else { "s" }
        )?;
        for e in &self.edits {
            fmt_edit(e, f)?;
        }
        Ok(())
    }
}

/// A plan listed by reason: how many edits each reason has and the first
/// few of each ([`Plan::summary`]). What `ALTPATCH_DEBUG=1` prints; a plan
/// of 13 000 retpoline sites is a dozen lines instead of 26 000.
pub struct PlanSummary<'a> {
    plan: &'a Plan,
    first: usize,
}

impl Plan {
    /// This plan grouped by reason, listing the `first` edits of each.
    ///
    /// ```
    /// use altpatch::{Edit, Plan};
    /// // SAFETY: the plan is listed, never validated or applied.
    /// let mut plan = unsafe { Plan::with_text(0x1000..0x2000) };
    /// for i in 0..10 {
    ///     plan.push(Edit::replace(0x1000 + i * 8, &[0x90], &[0xc3]).reason("return early"));
    /// }
    /// let text = plan.summary(2).to_string();
    /// assert!(text.contains("10 x return early"), "{text}");
    /// assert!(text.contains("... 8 more"), "{text}");
    /// ```
    pub fn summary(&self, first: usize) -> PlanSummary<'_> {
        PlanSummary { plan: self, first }
    }
}

impl fmt::Display for PlanSummary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let edits = &self.plan.edits;
        writeln!(
            f,
            "altpatch plan: {} edit{}",
            edits.len(),
            if edits.len() == 1 { "" } else { "s" }
        )?;
        // Groups in order of first appearance: by reason, or for edits
        // without one by shape (the disassembly, addresses left out).
        let mut groups: alloc::vec::Vec<(alloc::string::String, alloc::vec::Vec<&Edit>)> =
            alloc::vec::Vec::new();
        for e in edits {
            let key = group_key(e);
            match groups.iter_mut().find(|(g, _)| *g == key) {
                Some((_, v)) => v.push(e),
                None => groups.push((key, alloc::vec![e])),
            }
        }
        for (key, group) in &groups {
            writeln!(f, "  {} x {key}:", group.len())?;
            for e in group.iter().take(self.first) {
                fmt_edit(e, f)?;
            }
            if group.len() > self.first {
                writeln!(f, "  ... {} more", group.len() - self.first)?;
            }
        }
        Ok(())
    }
}

/// What groups an edit in a summary: its reason, else its shape.
fn group_key(e: &Edit) -> alloc::string::String {
    if !e.reason_text().is_empty() {
        return e.reason_text().into();
    }
    #[cfg(feature = "std")]
    {
        let strip = |t: std::string::String| {
            t.split(' ')
                .map(|w| match (w.starts_with("0x"), w.ends_with(';')) {
                    (true, true) => "X;",
                    (true, false) => "X",
                    _ => w,
                })
                .collect::<std::vec::Vec<_>>()
                .join(" ")
        };
        let before = e.old_bytes().map(|o| strip(disasm(o, e.addr)));
        let after = strip(disasm(&e.new, e.addr));
        return match before {
            Some(b) => alloc::format!("{b} -> {after}"),
            None => alloc::format!("-> {after}"),
        };
    }
    #[allow(unreachable_code)]
    "(no reason)".into()
}

fn fmt_edit(e: &Edit, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let status = match e.state {
        State::Unchecked | State::Observed => "check",
        State::Pending => "write",
        State::Written => "wrote",
        State::Done => "done",
    };
    let site = if e.site_name().is_empty() {
        "-"
    } else {
        e.site_name()
    };
    write!(f, "  [{status:5}] {:#018x} {site}: ", e.addr)?;
    match e.old_bytes() {
        Some(old) => write!(f, "{}", crate::hex::HexBytes(old))?,
        None => write!(f, "{}", e.expect)?,
    }
    write!(f, " -> {}", crate::hex::HexBytes(&e.new))?;
    if !e.reason_text().is_empty() {
        write!(f, "  ({})", e.reason_text())?;
    }
    writeln!(f)?;
    #[cfg(feature = "std")]
    {
        let before = e.old_bytes().map(|o| disasm(o, e.addr));
        let after = disasm(&e.new, e.addr);
        match before {
            Some(b) => writeln!(f, "          {b} -> {after}")?,
            None => writeln!(f, "          -> {after}")?,
        }
    }
    Ok(())
}
