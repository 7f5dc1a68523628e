//! `altpatch`: list, embed and audit the compiler-generated sites of a
//! linked x86-64 ELF image.

#[path = "cli/objtool.rs"]
mod objtool;
use objtool::{objtool_json, print_objtool};

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use altpatch::elf::{self, EmbedOutcome, FoundSites};
use altpatch::sites::{Site, SiteKind, ThunkNames};
use altpatch::x86::BranchKind;
use clap::{Parser, Subcommand};

/// Finds the sites altpatch patches — calls and jumps to retpoline thunks,
/// the return thunk, static-call trampolines and ifuncs — from the
/// relocations a linked image keeps when linked with `-Wl,--emit-relocs`.
#[derive(Parser)]
#[command(name = "altpatch", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Thunk names beyond the built-in `__x86_indirect_thunk_<reg>`,
/// `__llvm_retpoline_<reg>` and `__x86_return_thunk`.
#[derive(clap::Args)]
struct ThunkArgs {
    /// Symbols named PREFIX<reg> are indirect thunks through <reg> (an
    /// alias such as '__x86_retpoline_'). Repeatable.
    #[arg(long = "thunk-prefix", value_name = "PREFIX")]
    thunk_prefix: Vec<String>,
    /// A symbol that is a return thunk. Repeatable.
    #[arg(long = "return-thunk", value_name = "NAME")]
    return_thunk: Vec<String>,
}

impl ThunkArgs {
    fn names(&self) -> ThunkNames {
        let mut n = ThunkNames::new();
        for p in &self.thunk_prefix {
            n = n.indirect_prefix(p);
        }
        for r in &self.return_thunk {
            n = n.return_thunk(r);
        }
        n
    }
}

#[derive(Subcommand)]
enum Command {
    /// List the sites of IMAGE, one table per kind, and the relocations
    /// against site symbols that are not patchable sites.
    Sites {
        /// A linked x86-64 ELF image, built with -Wl,--emit-relocs.
        image: PathBuf,
        /// Print JSON instead of tables (addresses as hex strings).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        thunks: ThunkArgs,
    },
    /// Fill the site table IMAGE reserves (altpatch::reserve_site_table!)
    /// in place, so the program (or kernel) needs no relocations at run
    /// time. Idempotent; replaces the file atomically.
    Embed {
        /// A linked x86-64 ELF image, built with -Wl,--emit-relocs.
        image: PathBuf,
    },
    /// List every indirect call or jump that does not go through a
    /// retpoline thunk, with where its code came from (compiled, prebuilt,
    /// c, plt) and what it is for (call, jump-table, tail-jump); exit 1 if
    /// any is not allowed. With --cet: list every indirect-branch target
    /// altpatch created (static-call trampolines, ifunc stubs, closure
    /// trampolines) that does not start with endbr64; exit 1 if any.
    Audit {
        /// A linked x86-64 ELF image (with its symbol table).
        image: PathBuf,
        /// Audit for CET indirect-branch tracking instead: every entry
        /// altpatch created must start with endbr64.
        #[arg(long, conflicts_with_all = [
            "allow", "allow_origin", "allow_section", "allow_target", "allow_list",
            "thunk_prefix", "return_thunk",
        ])]
        cet: bool,
        /// Functions allowed to bypass the thunks: a symbol or demangled
        /// name, `*` matching any run of characters ('std::*',
        /// '*::dispatch'). Repeatable.
        #[arg(long = "allow", value_name = "PATTERN")]
        allow: Vec<String>,
        /// Origins allowed to bypass the thunks: compiled, prebuilt (the Rust
        /// standard library and C start-up code), c, plt. Repeatable or
        /// comma-separated.
        #[arg(long = "allow-origin", value_name = "ORIGIN", value_delimiter = ',')]
        allow_origin: Vec<String>,
        /// Sections whose code may bypass the thunks, `*` matching any run
        /// of characters ('.init.text', '.init.*'): a kernel's init code,
        /// built without retpolines on purpose. Repeatable.
        #[arg(long = "allow-section", value_name = "PATTERN")]
        allow_section: Vec<String>,
        /// Branches through memory into a data symbol matching PATTERN
        /// ('pv_ops*' for `call *pv_ops+N(%rip)`): a table the kernel
        /// patches into direct calls itself. Repeatable.
        #[arg(long = "allow-target", value_name = "PATTERN")]
        allow_target: Vec<String>,
        /// A file of link-time addresses of branches annotated as safe (hex,
        /// one per line, '#' comments), for images that do not keep
        /// objtool's annotation sections. Repeatable.
        #[arg(long = "allow-list", value_name = "FILE")]
        allow_list: Vec<PathBuf>,
        /// Print the bypasses as JSON (addresses as hex strings).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        thunks: ThunkArgs,
    },
}

fn main() -> ExitCode {
    // Die quietly when the reader of our output goes away (`| head`), like
    // other command-line tools, instead of panicking on a broken pipe.
    // SAFETY: restoring the default action of SIGPIPE before any thread or
    // output exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("altpatch: {msg}");
            ExitCode::from(2)
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn run(command: Command) -> Result<ExitCode, String> {
    match command {
        Command::Sites {
            image,
            json,
            thunks,
        } => {
            let data = read(&image)?;
            let found = elf::read_sites_with(&data, &thunks.names())
                .map_err(|e| format!("{}: {e}", image.display()))?;
            let objtool = elf::compare_with_objtool(&data, &found)
                .map_err(|e| format!("{}: {e}", image.display()))?;
            if json {
                print_json(&image, &found, &objtool);
            } else {
                print_tables(&image, &found);
                print_objtool(&objtool);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Embed { image } => {
            let outcome =
                elf::embed_file(&image).map_err(|e| format!("{}: {e}", image.display()))?;
            match outcome {
                EmbedOutcome::Written { sites, capacity } => {
                    println!(
                        "{}: embedded {sites} sites (capacity {capacity})",
                        image.display()
                    )
                }
                EmbedOutcome::Unchanged { sites, capacity } => println!(
                    "{}: unchanged, {sites} sites already embedded (capacity {capacity})",
                    image.display()
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit {
            image,
            cet: true,
            json,
            ..
        } => {
            let data = read(&image)?;
            let audit = elf::audit_cet(&data).map_err(|e| format!("{}: {e}", image.display()))?;
            if json {
                print_cet_json(&image, &audit);
            } else {
                print_cet(&image, &audit);
            }
            Ok(if audit.missing().next().is_none() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Audit {
            image,
            allow,
            allow_origin,
            allow_section,
            allow_target,
            allow_list,
            json,
            thunks,
            ..
        } => {
            let data = read(&image)?;
            let mut rules = elf::AuditAllow::default().thunk_names(thunks.names());
            for p in &allow {
                rules = rules.pattern(p);
            }
            for o in &allow_origin {
                let origin = elf::Origin::from_name(o).ok_or_else(|| {
                    format!("--allow-origin {o}: expected compiled, prebuilt, c or plt")
                })?;
                rules = rules.origin(origin);
            }
            for p in &allow_section {
                rules = rules.section(p);
            }
            for p in &allow_target {
                rules = rules.target(p);
            }
            for f in &allow_list {
                let text =
                    std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
                rules = rules
                    .address_list(&text)
                    .map_err(|e| format!("{}: {e}", f.display()))?;
            }
            let audit =
                elf::audit_with(&data, &rules).map_err(|e| format!("{}: {e}", image.display()))?;
            if json {
                print_audit_json(&audit);
            } else {
                print_audit(&image, &audit);
            }
            Ok(if audit.bypasses.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

/// How many targets of each kind, for a summary line.
fn cet_counts(audit: &elf::CetAudit) -> String {
    elf::CetTargetKind::ALL
        .iter()
        .map(|&k| format!("{} {}", audit.count(k), k.name()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_cet(image: &Path, audit: &elf::CetAudit) {
    let missing: Vec<&elf::CetTarget> = audit.missing().collect();
    let counts = cet_counts(audit);
    if missing.is_empty() {
        println!(
            "{}: all {} indirect-branch targets altpatch created start with endbr64 ({counts})",
            image.display(),
            audit.targets.len()
        );
        return;
    }
    println!(
        "{}: {} of {} indirect-branch targets altpatch created lack endbr64 ({counts}):",
        image.display(),
        missing.len(),
        audit.targets.len()
    );
    for t in missing {
        println!("  {t}");
    }
}

/// 64-bit addresses as hex strings ("0x401000"): JSON numbers lose
/// precision above 2^53 in most readers.
fn print_cet_json(image: &Path, audit: &elf::CetAudit) {
    let missing: Vec<String> = audit
        .missing()
        .map(|t| {
            format!(
                "{{\"addr\":\"{:#x}\",\"kind\":\"{}\",\"name\":{},\"first_bytes\":\"{}\"}}",
                t.addr,
                t.kind.name(),
                json_str(&t.name),
                t.first
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            )
        })
        .collect();
    let counts: Vec<String> = elf::CetTargetKind::ALL
        .iter()
        .map(|&k| format!("\"{}\":{}", k.name(), audit.count(k)))
        .collect();
    println!(
        "{{\"format\":{JSON_FORMAT},\"image\":{},\"targets\":{},\"counts\":{{{}}},\"missing_endbr64\":[{}]}}",
        json_str(&image.display().to_string()),
        audit.targets.len(),
        counts.join(","),
        missing.join(",")
    );
}

fn print_audit(image: &std::path::Path, audit: &elf::Audit) {
    let found = &audit.bypasses;
    let extra = format!(
        "{} allowed, {} intended by the code",
        audit.allowed, audit.intended
    );
    if found.is_empty() {
        println!(
            "{}: no indirect branch bypasses the thunks ({extra})",
            image.display()
        );
        return;
    }
    println!(
        "{}: {} indirect branches bypass the thunks ({extra}):",
        image.display(),
        found.len()
    );
    // Counts per origin and use first: where to look, and what to allow.
    let mut groups: std::collections::BTreeMap<(elf::Origin, elf::BranchUse), usize> =
        Default::default();
    for b in found {
        *groups.entry((b.origin, b.kind)).or_default() += 1;
    }
    for ((origin, kind), n) in &groups {
        println!("  {n:6} {} {}", origin.name(), kind.name());
    }
    for b in found {
        println!("  {b}");
    }
}

/// The version of every JSON output's layout, its `"format"` field: 2 since
/// addresses and offsets became hex strings (`"0xffffffff8100024c"`): as
/// JSON numbers, jq and JavaScript read them as doubles and round them.
const JSON_FORMAT: u32 = 2;

/// Addresses as hex strings, as in every JSON output of the tool.
fn print_audit_json(audit: &elf::Audit) {
    let items: Vec<String> = audit
        .bypasses
        .iter()
        .map(|b| {
            format!(
                "{{\"addr\":\"{:#x}\",\"function\":{},\"offset\":\"{:#x}\",\"text\":{},\"origin\":\"{}\",\"kind\":\"{}\",\"section\":{},\"target\":{},\"outside_function\":{}}}",
                b.addr,
                json_str(&b.function),
                b.offset,
                json_str(&b.text),
                b.origin.name(),
                b.kind.name(),
                json_str(&b.section),
                b.target.as_deref().map_or("null".into(), json_str),
                b.outside_function
            )
        })
        .collect();
    println!(
        "{{\"format\":{JSON_FORMAT},\"bypasses\":[{}],\"allowed\":{},\"intended\":{}}}",
        items.join(","),
        audit.allowed,
        audit.intended
    );
}

fn form(s: &Site) -> &'static str {
    match s.form {
        BranchKind::Call => "call",
        BranchKind::Jmp => "jmp",
        BranchKind::Jcc(_) => "jcc",
    }
}

const KINDS: [&str; 4] = ["thunk", "return_thunk", "static_call", "ifunc"];

fn print_tables(image: &Path, found: &FoundSites) {
    println!(
        "{}: {} sites from {} relocations, {} rejected",
        image.display(),
        found.sites.len(),
        found.relocations,
        found.rejected.len()
    );
    for kind in KINDS {
        let sites: Vec<&Site> = found
            .sites
            .iter()
            .filter(|s| s.kind.name() == kind)
            .collect();
        println!("\n{kind} ({}):", sites.len());
        for s in sites {
            let name = found.name_of(s.target).unwrap_or("?");
            println!(
                "  {:#012x}  {:4}  {} bytes  -> {name}",
                s.addr,
                form(s),
                s.len
            );
        }
    }
    if !found.rejected.is_empty() {
        println!("\nrejected ({}), never patched:", found.rejected.len());
        for r in &found.rejected {
            println!("  {r}");
        }
    }
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Addresses (`addr`, `target`) as hex strings ("0xffffffff8100024c"):
/// JSON numbers are doubles to jq and JavaScript, which round 64-bit
/// kernel addresses. Lengths, counts and offsets stay numbers.
fn print_json(image: &Path, found: &FoundSites, objtool: &elf::ObjtoolComparison) {
    let sites: Vec<String> = found
        .sites
        .iter()
        .map(|s| {
            let reg = match s.kind {
                SiteKind::IndirectThunk(r) => json_str(r.name()),
                _ => "null".into(),
            };
            format!(
                "{{\"addr\":\"{:#x}\",\"kind\":\"{}\",\"register\":{reg},\"form\":\"{}\",\"len\":{},\"target\":\"{:#x}\",\"symbol\":{}}}",
                s.addr,
                s.kind.name(),
                form(s),
                s.len,
                s.target,
                json_str(found.name_of(s.target).unwrap_or(""))
            )
        })
        .collect();
    let rejected: Vec<String> = found
        .rejected
        .iter()
        .map(|r| {
            format!(
                "{{\"offset\":\"{:#x}\",\"symbol\":{},\"why\":{}}}",
                r.offset,
                json_str(&r.symbol),
                json_str(r.why)
            )
        })
        .collect();
    println!(
        "{{\"format\":{JSON_FORMAT},\"image\":{},\"relocations\":{},\"sites\":[{}],\"rejected\":[{}],\"objtool\":{}}}",
        json_str(&image.display().to_string()),
        found.relocations,
        sites.join(","),
        rejected.join(","),
        objtool_json(objtool)
    );
}
