//! Reading the crate's own sources, for the tests that check its structure
//! (`tests/layers.rs`, `tests/seams.rs`; included by path).

use std::path::{Path, PathBuf};

/// The source roots of the crates whose modules are the layers, relative
/// to the workspace root, each with the module its files are in `altpatch`
/// (`altpatch-elf`'s `src/` is `altpatch::elf`; `""`: the crate's modules
/// are the root's, as `altpatch` names the core's at the same paths).
/// Together they form one module tree, and a file's path is given in it
/// (`os/mod.rs`, `elf/mod.rs` for `altpatch-elf`'s `lib.rs`).
#[allow(dead_code)] // not every includer reads every root
pub const SOURCE_ROOTS: &[(&str, &str)] = &[
    ("src", ""),
    ("crates/altpatch-core/src", ""),
    ("crates/altpatch-os/src", "os"),
    ("crates/altpatch-elf/src", "elf"),
    ("crates/altpatch-trampoline/src", "trampoline"),
];

/// A source file of the crates: where it is, its path in the module tree
/// (relative to its source root, under the root's module prefix: a
/// prefixed crate's `lib.rs` is its `mod.rs`; a crate root that is not
/// `altpatch`'s keeps its own path, `crates/altpatch-core/src/lib.rs`), and
/// the prefix of its crate.
#[allow(dead_code)] // tests/seams.rs reads only the tree path
pub struct SourceFile {
    pub file: PathBuf,
    pub tree: String,
    pub prefix: &'static str,
}

/// Every `.rs` file under the crates' source roots ([`SOURCE_ROOTS`]).
pub fn source_files() -> Vec<SourceFile> {
    let mut out = Vec::new();
    for &(root, prefix) in SOURCE_ROOTS {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(root);
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        for file in files {
            let rel = file.strip_prefix(&src).unwrap().display().to_string();
            let tree = match (prefix, rel.as_str()) {
                ("", "lib.rs") if root != "src" => format!("{root}/lib.rs"),
                ("", _) => rel,
                (p, "lib.rs") => format!("{p}/mod.rs"),
                (p, r) => format!("{p}/{r}"),
            };
            out.push(SourceFile { file, tree, prefix });
        }
    }
    out
}

/// Every `.rs` file under `dir`.
pub fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without its comments: whole comment lines and the
/// tail after ` // `.
pub fn code(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .map(|l| l.split(" // ").next().unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every source file of the crates ([`source_files`]): its path in the
/// module tree and its code without comments.
#[allow(dead_code)] // tests/layers.rs reads files its own way
pub fn crate_sources() -> Vec<(String, String)> {
    source_files()
        .into_iter()
        .map(|f| (f.tree, code(&std::fs::read_to_string(&f.file).unwrap())))
        .collect()
}
