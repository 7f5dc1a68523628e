//! Site discovery on a generated image with more than 100 000 relocations
//! in its code: 120 000 branches to thunks (calls, jumps, conditional
//! jumps, return-thunk jumps) and 40 000 ordinary calls, assembled and
//! linked with `--emit-relocs` by GCC.
//!
//! Reports the time per 100 000 relocations and the heap the reader
//! allocates (peak), per site found; then the rest of start-up: the
//! retpoline plan for every site, its validation and its writes (plain
//! mode, into a private read+write copy of the image's text).
//!
//! The same image carries a reserved site table (`reserve_site_table!`'s
//! layout); `altpatch::elf::embed` fills it, and the embedded path is
//! measured too: reading the table in place (no file, no relocations)
//! then the same plan, validation and writes.
//!
//! A second image has a `cs` prefix on every call through `%r8`..`%r15`
//! (GCC's `-mindirect-branch-cs-prefix`): discovery proves each by decoding
//! its function from the start, and the plan uses all six bytes.
//!
//! `SITES_COUNT=read|apply|embedded|read_cs|apply_cs|apply_its` runs one phase once and exits: a driver for
//! `valgrind --tool=callgrind --toggle-collect=...`, which counts the
//! instructions per site exactly (see BENCHMARKS.md).

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write as _;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use criterion::{Criterion, criterion_group};

/// Counts live and peak heap bytes.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only adds counters.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Branches to thunks; every third is followed by an ordinary call, for
/// 160 000 relocations in all.
const SITES: usize = 120_000;

/// Generates the image once; with `cs`, every call and jmp through
/// `%r8`..`%r15` has a `cs` prefix (GCC's `-mindirect-branch-cs-prefix`,
/// what the kernel builds with): 6-byte sites, each proven by decoding.
fn image(cs: bool) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-data");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(if cs {
        "many-relocs-cs"
    } else {
        "many-relocs-table"
    });
    if out.exists() {
        return out;
    }
    let regs = [
        "rax", "rcx", "rdx", "rbx", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13",
        "r14", "r15",
    ];
    let mut s = String::new();
    // Thunks in their own section, as compilers place functions: branches
    // to them then keep their relocations (the assembler would resolve, or
    // shorten, branches within one section).
    s.push_str(".section .text.thunks,\"ax\",@progbits\n");
    for r in regs {
        let _ = writeln!(
            s,
            ".globl __x86_indirect_thunk_{r}\n__x86_indirect_thunk_{r}: jmp *%{r}"
        );
    }
    s.push_str(".globl __x86_return_thunk\n__x86_return_thunk: ret\n");
    s.push_str(".globl plain_fn\nplain_fn: ret\n");
    s.push_str(".text\n");
    s.push_str(".globl _start\n.type _start,@function\n_start:\n");
    for i in 0..SITES {
        let r = regs[i % regs.len()];
        // r8..r15 are the last eight; calls are `i % 4` 0 and 1.
        if cs && i % 4 < 2 && i % regs.len() >= 7 {
            s.push_str(".byte 0x2e\n");
        }
        match i % 4 {
            0 | 1 => {
                let _ = writeln!(s, "call __x86_indirect_thunk_{r}");
            }
            2 => {
                let _ = writeln!(s, "jne __x86_indirect_thunk_{r}");
            }
            _ => s.push_str("jmp __x86_return_thunk\n"),
        }
        if i % 3 == 0 {
            s.push_str("call plain_fn\n");
        }
    }
    s.push_str(".size _start, . - _start\n");
    // Room for every site in the embedded table (filled by `embed`).
    let _ = writeln!(
        s,
        ".section altpatch_v1_sitetab,\"a\",@progbits\n.balign 8\n.ascii \"ALTPSITE\"\n\
         .short 1, 12\n.long {SITES}, 0, 0\n.zero 12 * {SITES}"
    );
    let src = dir.join(if cs {
        "many-relocs-cs.s"
    } else {
        "many-relocs.s"
    });
    std::fs::write(&src, s).unwrap();
    let ok = std::process::Command::new("gcc")
        .args(["-nostdlib", "-static", "-no-pie", "-Wl,--emit-relocs", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .unwrap()
        .success();
    assert!(ok, "gcc failed to build the benchmark image");
    out
}

/// The image's text copied into read+write memory (never executed), with
/// the sites moved to it: what `retpoline::apply` patches in the bench.
struct TextCopy {
    buf: memmap2::MmapMut,
    text_len: usize,
    original: Vec<u8>,
    sites: Vec<altpatch::sites::Site>,
}

/// `.text` and the site table copied into one read+write mapping at their
/// link-time distance from each other (the table's entries are relative to
/// their own addresses): the mapping, `.text`'s link-time address and
/// length, and the table's range in the mapping.
fn load(data: &[u8]) -> (memmap2::MmapMut, usize, usize, std::ops::Range<usize>) {
    use object::{Object, ObjectSection};
    let file = object::File::parse(data).unwrap();
    let text = file.section_by_name(".text").unwrap();
    let table = file.section_by_name("altpatch_v1_sitetab").unwrap();
    let (t0, tab0) = (text.address() as usize, table.address() as usize);
    assert!(tab0 > t0, "the table follows the text");
    let (tb, tabb) = (text.data().unwrap(), table.data().unwrap());
    let mut buf = memmap2::MmapMut::map_anon(tab0 - t0 + tabb.len()).unwrap();
    buf[..tb.len()].copy_from_slice(tb);
    let at = tab0 - t0;
    buf[at..at + tabb.len()].copy_from_slice(tabb);
    (buf, t0, tb.len(), at..at + tabb.len())
}

impl TextCopy {
    fn new(data: &[u8], sites: &[altpatch::sites::Site]) -> TextCopy {
        let (buf, text_addr, text_len, _) = load(data);
        let bias = (buf.as_ptr() as usize).wrapping_sub(text_addr);
        TextCopy {
            original: buf[..text_len].to_vec(),
            sites: sites.iter().map(|s| s.biased(bias)).collect(),
            buf,
            text_len,
        }
    }

    /// The copy of an image with a filled table, its sites read from the
    /// table in place (their addresses are the copy's).
    fn from_table(embedded: &[u8]) -> TextCopy {
        let (buf, _, text_len, table) = load(embedded);
        let mut copy = TextCopy {
            original: buf[..text_len].to_vec(),
            sites: Vec::new(),
            buf,
            text_len,
        };
        copy.sites = count_embedded(&copy.buf[table]);
        copy
    }

    /// Plans, validates and writes plain mode for every site, from the
    /// original bytes.
    fn apply(&mut self) -> usize {
        self.reset();
        self.apply_in_place()
    }

    /// Puts the original bytes back (the scaffolding of a repeated run,
    /// not part of what start-up does).
    fn reset(&mut self) {
        self.buf[..self.text_len].copy_from_slice(&self.original);
    }

    /// Plans, validates and writes plain mode for every site.
    fn apply_in_place(&mut self) -> usize {
        use altpatch::retpoline::{self, Mode, Policy};
        let range = self.buf.as_ptr() as usize..self.buf.as_ptr() as usize + self.text_len;
        // SAFETY: the copy is mapped read+write for as long as the image is
        // used, and nothing executes it.
        let image = unsafe { altpatch::Image::builder("bench copy").text(range) }.build();
        // SAFETY: the memory is writable at its own address; serializing
        // after the writes is harmless (nothing runs it).
        let mut poke = unsafe { altpatch::DirectPoke::new(altpatch::SyncMethod::Cpuid) };
        // `SITES_COUNT=apply_its`: as on a CPU Indirect Target Selection
        // affects (every thunk site's address decides: the general path).
        let its = std::env::var("SITES_COUNT").is_ok_and(|p| p == "apply_its");
        let policy = Policy::new(Mode::Plain, "bench").with_its(its, "bench");
        // SAFETY: as above: plain memory, no thread runs it.
        let report = unsafe { retpoline::apply(&image, &policy, &self.sites, &mut poke) }.unwrap();
        report.sites.len()
    }
}

fn bench(c: &mut Criterion) {
    let data = std::fs::read(image(false)).unwrap();
    let with_cs = std::fs::read(image(true)).unwrap();
    let mut embedded = data.clone();
    altpatch::elf::embed(&mut embedded).unwrap();
    if let Ok(phase) = std::env::var("SITES_COUNT") {
        if phase == "embedded" {
            let mut copy = TextCopy::from_table(&embedded);
            assert_eq!(count_apply(&mut copy), SITES);
            return;
        }
        let image = if phase.ends_with("_cs") {
            &with_cs
        } else {
            &data
        };
        let found = count_read(image);
        if phase.starts_with("apply") {
            let mut copy = TextCopy::new(image, &found);
            assert_eq!(count_apply(&mut copy), SITES);
        }
        return;
    }
    let found = altpatch::elf::read_sites(&data).unwrap();
    assert_eq!(found.sites.len(), SITES);
    assert!(found.relocations >= 100_000);
    let relocs = found.relocations;
    // The prefixed image: the same sites, those with `cs` one byte earlier
    // and one longer.
    let found_cs = altpatch::elf::read_sites(&with_cs).unwrap();
    let six = found_cs
        .sites
        .iter()
        .filter(|s| s.len == 6 && s.form == altpatch::x86::BranchKind::Call)
        .count();
    assert_eq!((found_cs.sites.len(), six), (SITES, SITES / 2 * 8 / 15));

    let mut g = c.benchmark_group("sites");
    g.sample_size(20);
    g.throughput(criterion::Throughput::Elements(relocs as u64));
    g.bench_function("read_sites", |b| {
        b.iter(|| altpatch::elf::read_sites(black_box(&data)).unwrap())
    });
    g.bench_function("read_sites_cs", |b| {
        b.iter(|| altpatch::elf::read_sites(black_box(&with_cs)).unwrap())
    });
    let mut copy_cs = TextCopy::new(&with_cs, &found_cs.sites);
    g.bench_function("plan_validate_write_cs", |b| b.iter(|| copy_cs.apply()));
    g.throughput(criterion::Throughput::Elements(SITES as u64));
    let mut copy = TextCopy::new(&data, &found.sites);
    g.bench_function("plan_validate_write", |b| b.iter(|| copy.apply()));
    let mut from_table = TextCopy::from_table(&embedded);
    assert_eq!(
        from_table.sites,
        copy.sites
            .iter()
            .map(|s| s.biased(
                (from_table.buf.as_ptr() as usize).wrapping_sub(copy.buf.as_ptr() as usize)
            ))
            .collect::<Vec<_>>()
    );
    let table = load(&embedded).3;
    g.bench_function("embedded_table_read", |b| {
        b.iter(|| count_embedded(black_box(&from_table.buf[table.clone()])))
    });
    g.bench_function("embedded_total", |b| {
        b.iter(|| {
            from_table.sites = count_embedded(&from_table.buf[table.clone()]);
            from_table.apply()
        })
    });
    g.finish();

    // Heap: what the reader allocates beyond the input it is given.
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let f = altpatch::elf::read_sites(&data).unwrap();
    let peak = PEAK.load(Ordering::Relaxed) - base;
    let kept = f.sites.capacity() * std::mem::size_of::<altpatch::sites::Site>();
    drop(f);
    println!(
        "\nimage: {} bytes, {relocs} relocations in code, {SITES} sites",
        data.len()
    );
    println!(
        "heap: peak {peak} bytes during discovery = {:.1} bytes per site; the site list itself {kept} bytes",
        peak as f64 / SITES as f64
    );
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    if let Ok(text) = std::fs::read_to_string(format!(
        "{target}/criterion/sites/read_sites/new/estimates.json"
    )) && let Some(ns) = mean(&text)
    {
        println!(
            "time: {:.2} ms per read, {:.2} ms per 100 000 relocations",
            ns / 1e6,
            ns / 1e6 * 100_000.0 / relocs as f64
        );
    }
    for (name, what) in [
        (
            "read_sites_cs",
            "discovery, a third of the sites cs-prefixed",
        ),
        ("plan_validate_write", "plan + validate + write"),
        (
            "plan_validate_write_cs",
            "plan + validate + write, a third cs-prefixed",
        ),
        ("embedded_table_read", "embedded table read"),
        (
            "embedded_total",
            "embedded: table read + plan + validate + write",
        ),
    ] {
        if let Ok(text) = std::fs::read_to_string(format!(
            "{target}/criterion/sites/{name}/new/estimates.json"
        )) && let Some(ns) = mean(&text)
        {
            println!(
                "{what}: {:.2} ms for {SITES} sites, {:.0} ns per site",
                ns / 1e6,
                ns / SITES as f64
            );
        }
    }
}

/// Discovery, alone (a named function for callgrind's `--toggle-collect`).
#[inline(never)]
fn count_read(data: &[u8]) -> Vec<altpatch::sites::Site> {
    altpatch::elf::read_sites(black_box(data)).unwrap().sites
}

/// Reading the embedded table in place into a site list (for
/// `--toggle-collect`): what `elf::image_sites` does when the table is filled (one pass: each
/// entry checked as it is decoded).
#[inline(never)]
fn count_embedded(table: &[u8]) -> Vec<altpatch::sites::Site> {
    altpatch::sites::EmbeddedTable::read_sites(black_box(table))
        .unwrap()
        .expect("a filled table")
}

/// Plan, validation and writes, alone (for `--toggle-collect`; the copy
/// holds the original bytes).
#[inline(never)]
fn count_apply(copy: &mut TextCopy) -> usize {
    copy.apply_in_place()
}

fn mean(text: &str) -> Option<f64> {
    let rest = &text[text.find("\"mean\"")?..];
    let p = rest.find("\"point_estimate\":")? + "\"point_estimate\":".len();
    let end = rest[p..].find([',', '}'])?;
    rest[p..p + end].trim().parse().ok()
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
