//! The layer map of `ARCHITECTURE.md`, checked: every top-level module of
//! every crate of the workspace ([`SOURCE_ROOTS`]: `altpatch`'s `src/`,
//! the core, and the crates that are one module of `altpatch`, `os`,
//! `elf`, `trampoline`) imports only modules of its own layer or the
//! layers below, and no two modules import each other, directly or
//! through others. The crates are read as one tree: `altpatch` names the
//! core's modules at the same paths (`crate::plan` is `altpatch_core::plan`
//! re-exported), and a path through `altpatch_core::` counts as one
//! through `crate::`. The compiler already keeps each crate from naming
//! the crates above it; this test keeps the layers inside them.
//!
//! Run it alone with `cargo test --test layers`; on failure it names each
//! offending import and the file it is in.
//!
//! What counts as an import: any `crate::<module>` path (in a `use`, a
//! type, an expression, a `crate::{a, b}` group) in code; comment lines are
//! skipped, so doc links do not count. A root path (`crate::Error`,
//! `crate::some_macro!`) counts as an import of the module that defines
//! the item: `src/lib.rs`'s `pub use` re-exports and each file's
//! `#[macro_export]` macros say which; a root path that resolves to no
//! module (an item defined in `lib.rs` itself, the façade above every
//! layer) is reported. Macros' `$crate::` paths are the user's expansion,
//! not a module's import, and are not counted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

#[path = "common/source.rs"]
mod source;
use source::{SOURCE_ROOTS, SourceFile, code, source_files};

/// Bottom to top. A module may import modules of its own layer (no
/// cycles) or of lower layers, never of a higher one.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "record layouts and section names, bytes as text, few-byte compares",
        &["records", "hex", "short"],
    ),
    (
        "CPU, the arch seam (encodings, live rules), the update lock, the \
         OS contract's lower half (its names for the altpatch-host crate)",
        &["cpu", "arch", "sync", "host"],
    ),
    (
        "text poking: trait, direct, fault, INT3 protocol",
        &["poke"],
    ),
    ("plans over text ranges", &["plan"]),
    ("images: text ranges + raw tables + origin", &["image"]),
    ("OS backends: loader, W^X pokes, fork", &["os"]),
    ("site discovery", &["sites", "elf"]),
    (
        "mechanisms",
        &[
            "alternative",
            "retpoline",
            "static_call",
            "static_key",
            "ifunc",
            "trampoline",
        ],
    ),
    ("one error type over every layer's", &["error"]),
    ("one patcher for every mechanism", &["patcher"]),
    (
        "the running program: one context, the std one-liners",
        &["process"],
    ),
];

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The module paths a piece of code names through `crate::` (`a::b::C`
/// for `crate::a::b::C`; the first names of a `crate::{a, b::c}` group).
fn imports(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    // `altpatch_core::x` is the core's module `x`, as `crate::x` is in
    // `altpatch` and in the crates above the core.
    let code = code.replace("altpatch_core::", " crate::");
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().next_back();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| is_ident(c) || c == '$') {
            continue; // `$crate::` (a macro) or part of a longer name
        }
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a, b::c, d::{e, f}}`: the names at depth 0.
            let (mut depth, mut name, mut at_start) = (0, String::new(), true);
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.insert(std::mem::take(&mut name));
                        at_start = true;
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 && at_start {
                    if is_ident(c) {
                        name.push(c);
                    } else if !name.is_empty() {
                        at_start = false;
                    }
                }
            }
            found.insert(name);
        } else {
            let path: String = rest
                .chars()
                .take_while(|&c| is_ident(c) || c == ':')
                .collect();
            found.insert(path.trim_end_matches(':').to_string());
        }
    }
    found.retain(|n| !n.is_empty() && n != "self");
    found
}

/// The layer map's unit a module path belongs to: the longest unit of
/// `LAYERS` it starts with (a listed `a::b` is a unit of its own, apart
/// from the rest of `a`), else its top-level module.
fn unit_of(path: &str) -> String {
    let listed = LAYERS
        .iter()
        .flat_map(|(_, ms)| ms.iter())
        .filter(|u| path == **u || path.starts_with(&format!("{u}::")))
        .max_by_key(|u| u.len());
    match listed {
        Some(u) => u.to_string(),
        None => path.split("::").next().unwrap().to_string(),
    }
}

/// The unit a file belongs to, from its path in the module tree
/// ([`SourceFile::tree`]): its module path (`os/linux/mod.rs` is `os::linux`,
/// `os/linux/trap.rs` is `os::linux::trap`), mapped by [`unit_of`]; a
/// crate root (`lib.rs`, `crates/altpatch-core/src/lib.rs`) is `lib`.
fn module_of(tree: &str) -> String {
    if tree == "lib.rs" || tree.starts_with("crates/") {
        return "lib".to_string();
    }
    let mut parts: Vec<&str> = tree.split('/').map(|c| c.trim_end_matches(".rs")).collect();
    if parts.len() > 1 && parts.last() == Some(&"mod") {
        parts.pop();
    }
    unit_of(&parts.join("::"))
}

/// The names a `use` tree brings in, each with the first segment of its
/// path: `a::b::{C, d::E as F}` gives `C` and `F`, both from `a`.
fn use_tree_names(tree: &str) -> Vec<(String, String)> {
    fn walk(tree: &str, first: Option<&str>, out: &mut Vec<(String, String)>) {
        // Split at the top-level commas.
        let (mut depth, mut start) = (0, 0);
        let mut parts = Vec::new();
        for (i, c) in tree.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&tree[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&tree[start..]);
        for part in parts.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
            let head = part.split("::").next().unwrap().trim();
            let first = first.unwrap_or(head).to_string();
            if let Some(open) = part.find('{') {
                let inner = &part[open + 1..part.rfind('}').unwrap()];
                walk(inner, Some(&first), out);
            } else {
                let leaf = part.rsplit("::").next().unwrap();
                let name = leaf.rsplit(" as ").next().unwrap().trim();
                out.push((name.to_string(), first));
            }
        }
    }
    let mut out = Vec::new();
    walk(tree, None, &mut out);
    out
}

/// Root paths and the module that defines each: the `pub use` re-exports
/// of `altpatch`'s and the core's `lib.rs` and every `#[macro_export]`
/// macro (the core's macros, which `altpatch` re-exports, resolve to the
/// core module defining them).
fn root_items(files: &[SourceFile]) -> BTreeMap<String, String> {
    let mut items = BTreeMap::new();
    for (root, _) in SOURCE_ROOTS.iter().filter(|(_, prefix)| prefix.is_empty()) {
        let lib = std::fs::read_to_string(root_dir(root).join("lib.rs")).unwrap();
        let lib = code(&lib);
        let mut rest = lib.as_str();
        while let Some(i) = rest.find("pub use ") {
            rest = &rest[i + "pub use ".len()..];
            let end = rest.find(';').unwrap();
            for (name, module) in use_tree_names(&rest[..end]) {
                items.insert(name, module);
            }
            rest = &rest[end..];
        }
    }
    for f in files {
        let module = module_of(&f.tree);
        let text = code(&std::fs::read_to_string(&f.file).unwrap());
        let mut exported = false;
        for line in text.lines().map(str::trim) {
            if line.starts_with("#[macro_export]") {
                exported = true;
            } else if let Some(name) = line.strip_prefix("macro_rules! ") {
                if exported {
                    let name: String = name.chars().take_while(|&c| is_ident(c)).collect();
                    items.insert(name, module.clone());
                }
                exported = false;
            } else if !line.starts_with("#[") && !line.is_empty() {
                exported = false;
            }
        }
    }
    items
}

/// A source root's directory.
fn root_dir(root: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(root)
}

/// module -> (imported module -> files that import it). Root paths are
/// resolved to their modules; one that resolves to none is listed under
/// the module `lib.rs`.
fn graph() -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let files = source_files();
    let roots = root_items(&files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(&f.tree)).collect();
    let mut graph: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for f in files {
        let module = module_of(&f.tree);
        // The crate root re-exports and the CLI binary sit above every layer.
        if module == "lib" || module == "bin" {
            continue;
        }
        let text = std::fs::read_to_string(&f.file).unwrap();
        let entry = graph.entry(module.clone()).or_default();
        for path in imports(&code(&text)) {
            let used = unit_of(&path);
            let first = path.split("::").next().unwrap();
            let used = if modules.contains(&used) {
                used
            } else if !f.prefix.is_empty() {
                // A crate that is one module of `altpatch` (`altpatch-elf`
                // is `elf`) names the core's modules or its own items.
                f.prefix.to_string()
            } else {
                roots.get(first).cloned().unwrap_or_else(|| "lib.rs".into())
            };
            if used != module {
                entry.entry(used).or_default().insert(f.tree.clone());
            }
        }
    }
    graph
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|(_, ms)| ms.contains(&module))
}

#[test]
fn the_import_parser_reads_every_form() {
    let got = imports(
        "use crate::a::B;\nlet x = crate::b::f();\nuse crate::{c, d::E, e::{F, G}, self};\n\
         $crate::macro_only!();\nmy_crate::not_ours();",
    );
    let want: BTreeSet<String> = ["a", "b", "c", "d", "e"].map(String::from).into();
    let firsts: BTreeSet<String> = got
        .iter()
        .map(|p| p.split("::").next().unwrap().to_string())
        .collect();
    assert_eq!(firsts, want);
    // Whole paths are kept, for units below the top level.
    assert!(got.contains("a::B") && got.contains("b::f"), "{got:?}");
    assert!(
        code("// crate::hidden\nx(); // crate::also_hidden")
            .find("crate::")
            .is_none()
    );
}

#[test]
fn root_paths_resolve_to_the_module_that_defines_them() {
    let names = use_tree_names("poke::{DirectPoke, live::{Step as S, run}}, Error");
    let want = [
        ("DirectPoke", "poke"),
        ("S", "poke"),
        ("run", "poke"),
        ("Error", "Error"),
    ];
    assert_eq!(
        names,
        want.map(|(a, b)| (a.to_string(), b.to_string())).to_vec()
    );
    let roots = root_items(&source_files());
    assert_eq!(roots.get("Error").map(String::as_str), Some("error"));
    assert_eq!(roots.get("TextPoke").map(String::as_str), Some("poke"));
    assert_eq!(
        roots.get("alternative_call").map(String::as_str),
        Some("alternative")
    );
    // An item `lib.rs` defines sits above every layer: no module may
    // name it.
    let upward: Vec<String> = graph()
        .into_iter()
        .filter_map(|(m, used)| used.get("lib.rs").map(|f| format!("{m} in {f:?}")))
        .collect();
    assert!(
        upward.is_empty(),
        "root paths to items lib.rs defines (move them into a layer):\n{}",
        upward.join("\n")
    );
}

#[test]
fn every_crate_of_the_workspace_is_read() {
    // A crate left out of SOURCE_ROOTS would be checked by nothing; the
    // host crate is below every layer and names none of them.
    let manifest = std::fs::read_to_string(root_dir("Cargo.toml")).unwrap();
    let members = manifest
        .lines()
        .find_map(|l| l.strip_prefix("members = "))
        .expect("Cargo.toml lists its members");
    for member in members.trim_matches(|c| c == '[' || c == ']').split(',') {
        let member = member.trim().trim_matches('"');
        let root = if member == "." {
            "src".to_string()
        } else {
            format!("{member}/src")
        };
        if member == "crates/altpatch-host" {
            continue;
        }
        assert!(
            SOURCE_ROOTS.iter().any(|(r, _)| *r == root),
            "{member} is a member of the workspace but not in SOURCE_ROOTS (tests/common/source.rs)"
        );
    }
}

#[test]
fn every_module_is_in_the_layer_map() {
    let unknown: Vec<String> = graph()
        .into_keys()
        .filter(|m| layer_of(m).is_none())
        .collect();
    assert!(
        unknown.is_empty(),
        "modules missing from LAYERS in tests/layers.rs (and from ARCHITECTURE.md): {unknown:?}"
    );
}

#[test]
fn imports_go_down_the_layer_map() {
    let mut upward = Vec::new();
    for (module, used) in graph() {
        let Some(mine) = layer_of(&module) else {
            continue;
        };
        for (target, files) in used {
            match layer_of(&target) {
                Some(theirs) if theirs > mine => upward.push(format!(
                    "{module} ({}) imports {target} ({}) in {files:?}",
                    LAYERS[mine].0, LAYERS[theirs].0
                )),
                _ => {}
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports up the layer map:\n{}",
        upward.join("\n")
    );
}

#[test]
fn no_module_is_on_an_import_cycle() {
    let graph = graph();
    // A depth-first search from every module; a back edge is a cycle.
    fn visit<'g>(
        m: &'g str,
        graph: &'g BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
        path: &mut Vec<&'g str>,
        done: &mut BTreeSet<&'g str>,
        cycles: &mut Vec<String>,
    ) {
        if let Some(at) = path.iter().position(|p| *p == m) {
            cycles.push([&path[at..], &[m]].concat().join(" -> "));
            return;
        }
        if !done.insert(m) {
            return;
        }
        path.push(m);
        for next in graph.get(m).into_iter().flat_map(|u| u.keys()) {
            if graph.contains_key(next) {
                visit(next, graph, path, done, cycles);
            }
        }
        path.pop();
    }
    let mut cycles = Vec::new();
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        visit(m, &graph, &mut Vec::new(), &mut done, &mut cycles);
    }
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}
