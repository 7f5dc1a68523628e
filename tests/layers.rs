//! The layer map of `ARCHITECTURE.md`, checked: every top-level module of
//! `src/` imports only modules of its own layer or the layers below, and no
//! two modules import each other, directly or through others.
//!
//! Run it alone with `cargo test --test layers`; on failure it names each
//! offending import and the file it is in.
//!
//! What counts as an import: any `crate::<module>` path (in a `use`, a
//! type, an expression, a `crate::{a, b}` group) in code; comment lines are
//! skipped, so doc links do not count. Macros' `$crate::` paths are the
//! user's expansion, not a module's import, and are not counted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Bottom to top. A module may import modules of its own layer (no
/// cycles) or of lower layers, never of a higher one.
const LAYERS: &[(&str, &[&str])] = &[
    ("record layouts and section names", &["records"]),
    ("CPU, encodings, the update lock", &["cpu", "x86", "sync"]),
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
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
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
fn code(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .map(|l| l.split(" // ").next().unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The top-level modules a piece of code names through `crate::`.
fn imports(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
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
            found.insert(rest.chars().take_while(|&c| is_ident(c)).collect());
        }
    }
    found.retain(|n| !n.is_empty() && n != "self");
    found
}

/// module -> (imported module -> files that import it).
fn graph() -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_str()
            .unwrap();
        // The crate root re-exports and the CLI binary sit above every layer.
        if first == "lib.rs" || first == "bin" {
            continue;
        }
        let module = first.trim_end_matches(".rs").to_string();
        let text = std::fs::read_to_string(&file).unwrap();
        let entry = graph.entry(module.clone()).or_default();
        for used in imports(&code(&text)) {
            if used != module {
                entry
                    .entry(used)
                    .or_default()
                    .insert(rel.display().to_string());
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
    assert_eq!(got, want);
    assert!(
        code("// crate::hidden\nx(); // crate::also_hidden")
            .find("crate::")
            .is_none()
    );
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
