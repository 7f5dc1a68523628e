//! Reading criterion's results back, to print ratios against a baseline
//! measured in the same run (included by each bench with `#[path]`).
#![allow(dead_code)]

/// The mean time in nanoseconds criterion recorded for benchmark `id`
/// (`group/function[/parameter]`; a `/` inside a function name is stored
/// as `_`, so pass that form), or `None` if it did not run.
pub fn mean_ns(id: &str) -> Option<f64> {
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let text =
        std::fs::read_to_string(format!("{target}/criterion/{id}/new/estimates.json")).ok()?;
    let rest = &text[text.find("\"mean\"")?..];
    let p = rest.find("\"point_estimate\":")? + "\"point_estimate\":".len();
    let end = rest[p..].find([',', '}'])?;
    rest[p..p + end].trim().parse().ok()
}
