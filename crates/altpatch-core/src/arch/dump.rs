//! The text form shared by the recorded CPU dumps of every architecture
//! (x86-64's CPUID dumps, aarch64's ID-register dumps): one record per
//! line, `#` starts a comment, blank lines are skipped.

/// The records of `text`: each non-blank line without its comment, trimmed,
/// with its 1-based line number (for errors).
pub(crate) fn dump_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().filter_map(|(i, raw)| {
        let line = raw.split('#').next().unwrap_or("").trim();
        (!line.is_empty()).then_some((i + 1, line))
    })
}
