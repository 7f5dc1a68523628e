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

/// Reads `json` as a script does: Python's `json` module parses it, its
/// `"format"` is 2, every hex string in it (`"0x..."`) reads back exactly
/// (`hex(int(s, 16)) == s`), and no number in it is one a double would
/// round. Returns how many hex strings it checked; panics otherwise.
pub fn python_reads(json: &str) -> usize {
    const SCRIPT: &str = r#"
import json, sys
d = json.load(sys.stdin)
assert d["format"] == 2, d.get("format")
n = 0
def walk(v):
    global n
    if isinstance(v, dict):
        for x in v.values(): walk(x)
    elif isinstance(v, list):
        for x in v: walk(x)
    elif isinstance(v, str) and v.startswith("0x"):
        assert hex(int(v, 16)) == v, v
        n += 1
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
        assert abs(v) < 2**53, v
walk(d)
print(n)
"#;
    use std::io::Write as _;
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (CI installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(json.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python3 could not read the JSON: {}\n{json}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// C source defining every indirect thunk as a weak `jmp *%reg` and the
/// return thunk as `ret`: what the small freestanding images of the CLI
/// tests link their thunk sites against.
pub const WEAK_THUNKS_C: &str = r#"
__asm__(".irp reg, rax, rcx, rdx, rbx, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15\n"
        ".weak __x86_indirect_thunk_\\reg\n__x86_indirect_thunk_\\reg: jmp *%\\reg\n"
        ".endr\n"
        ".weak __x86_return_thunk\n__x86_return_thunk: ret\n");
"#;

/// GCC flags for the small freestanding images the CLI tests link.
pub const FREESTANDING: [&str; 7] = [
    "-O2",
    "-ffreestanding",
    "-nostdlib",
    "-static",
    "-fno-pic",
    "-no-pie",
    "-fcf-protection=none",
];

/// A freestanding image of `body` (C) after [`WEAK_THUNKS_C`], built with
/// external thunks (every indirect branch and return through them, unless
/// the code says otherwise) and its relocations kept.
pub fn thunk_extern_image(name: &str, body: &str) -> std::path::PathBuf {
    let mut args = FREESTANDING.to_vec();
    args.extend([
        "-mindirect-branch=thunk-extern",
        "-mfunction-return=thunk-extern",
        "-Wl,--emit-relocs",
    ]);
    crate::common::gcc(name, &format!("{WEAK_THUNKS_C}{body}"), &args)
}
