//! Running the `altpatch` tool in the CLI tests (`tests/cli.rs`,
//! `tests/cli_cet.rs`): included by path there only, since the binary
//! exists only with the `cli` feature.
#![allow(dead_code)]

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_altpatch");

/// Runs the tool with `args`.
pub fn altpatch(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run altpatch")
}

/// Its standard output, then its standard error.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A JSON address: a hex string ("0x401000"), never a number (a double to
/// jq and JavaScript, which rounds 64-bit addresses).
pub fn hex_addr(v: &serde_json::Value) -> u64 {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("not a hex string: {v}"));
    let digits = s.strip_prefix("0x").unwrap_or_else(|| panic!("no 0x: {s}"));
    u64::from_str_radix(digits, 16).unwrap_or_else(|e| panic!("{s}: {e}"))
}
