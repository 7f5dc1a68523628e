//! Per-call benchmarks whose ratios measure the mechanism, not the code
//! layout (included by the per-call benches with `#[macro_use] #[path]`).
//!
//! * **One target, placed on purpose.** Every call variant ends in the
//!   same body, `lea 1(%rdi,%rdi,2), %rax; ret`, of which there are three
//!   byte-identical copies: at the start of a 64-byte block
//!   ([`target`]`(0)`), 16 bytes in and 32 bytes in. A variant is measured
//!   at each of the three and its ratio is taken against the baseline at
//!   the same placement.
//! * **One loop shape.** [`call_loop!`] writes a loop in assembly whose head
//!   starts a 64-byte block and whose call starts 3 bytes into it; variants
//!   differ only in that call instruction. `shape.rs` decodes the loops
//!   at run time and proves it before anything is timed.
//! * **A count beside each time.** [`instructions_per_call`] runs this
//!   bench again under `valgrind --tool=callgrind` once per variant (when
//!   valgrind is installed) and counts the instructions of `REPS` loops
//!   exactly: a patched site that *is* the direct call counts the same.
#![allow(dead_code)]

use std::hint::black_box;

/// Calls per loop.
pub const N: u64 = 1000;
/// Where in its 64-byte block the target starts.
pub const OFFSETS: [usize; 3] = [0, 16, 32];
/// Loops run per counted measurement.
pub const REPS: u64 = 1000;
/// Set (to a variant's name) in the counting child.
pub const COUNT_ENV: &str = "ALTPATCH_BENCH_COUNT";

/// A call target.
pub type Target = extern "C" fn(u64) -> u64;
/// A loop of `n` calls (`n` ≥ 1) starting from `x`.
pub type Loop = unsafe extern "C" fn(x: u64, n: u64) -> u64;

/// The body every variant ends in (what `x.wrapping_mul(3) + 1` compiles
/// to).
pub fn reference(x: u64) -> u64 {
    x.wrapping_mul(3).wrapping_add(1)
}

/// The label of an assembly function `$name` the rest of the bench links
/// to (global, hidden).
#[macro_export]
macro_rules! asm_fn_label {
    ($name:literal) => {
        concat!(
            ".globl ",
            $name,
            "\n",
            ".hidden ",
            $name,
            "\n",
            ".type ",
            $name,
            ", @function\n",
            $name,
            ":\n",
        )
    };
}

/// A loop named `$name` around one `$call` (AT&T syntax; may use operands
/// of the enclosing `global_asm!`): `%rdi` = x, `%rsi` = n ≥ 1; each
/// iteration moves x to `%rdi`, runs `$call`, takes `%rax` as the new x.
/// The function and the loop head start 64-byte blocks; the call starts 3
/// bytes into the head's block.
#[macro_export]
macro_rules! call_loop {
    ($name:literal, $call:expr) => {
        concat!(
            ".pushsection .text.bench_loops,\"ax\",@progbits\n",
            ".balign 64\n",
            asm_fn_label!($name),
            // One push re-aligns the stack for the call.
            "push %rbx\n",
            "mov %rsi, %rbx\n",
            "mov %rdi, %rax\n",
            // Multi-byte NOPs, run once per loop: the head starts a block.
            ".balign 64\n",
            "1:\n",
            "mov %rax, %rdi\n",
            $call,
            "\n",
            "dec %rbx\n",
            "jnz 1b\n",
            "pop %rbx\n",
            "ret\n",
            ".size ",
            $name,
            ", . - ",
            $name,
            "\n",
            ".popsection\n"
        )
    };
}

macro_rules! bench_target {
    ($name:literal, $skip:literal) => {
        concat!(
            ".balign 64\n",
            ".skip ",
            $skip,
            ", 0xcc\n",
            asm_fn_label!($name),
            "lea 1(%rdi,%rdi,2), %rax\n",
            "ret\n",
            ".size ",
            $name,
            ", . - ",
            $name,
            "\n",
        )
    };
}

core::arch::global_asm!(
    ".pushsection .text.bench_targets,\"ax\",@progbits",
    bench_target!("bench_target_0", "0"),
    bench_target!("bench_target_16", "16"),
    bench_target!("bench_target_32", "32"),
    ".popsection",
    options(att_syntax)
);

unsafe extern "C" {
    fn bench_target_0(x: u64) -> u64;
    fn bench_target_16(x: u64) -> u64;
    fn bench_target_32(x: u64) -> u64;
}

/// The copy of the target `off` bytes into its 64-byte block (`off` one of
/// [`OFFSETS`]).
pub fn target(off: usize) -> Target {
    let f: unsafe extern "C" fn(u64) -> u64 = match off {
        0 => bench_target_0,
        16 => bench_target_16,
        32 => bench_target_32,
        _ => panic!("no target at +{off}"),
    };
    // SAFETY: the copies are `lea; ret` under the C ABI: nothing about
    // calling them is unsafe, only their declaration as foreign functions.
    unsafe { std::mem::transmute::<unsafe extern "C" fn(u64) -> u64, Target>(f) }
}

core::arch::global_asm!(
    call_loop!("bench_direct_0", "call bench_target_0"),
    call_loop!("bench_direct_16", "call bench_target_16"),
    call_loop!("bench_direct_32", "call bench_target_32"),
    options(att_syntax)
);

unsafe extern "C" {
    fn bench_direct_0(x: u64, n: u64) -> u64;
    fn bench_direct_16(x: u64, n: u64) -> u64;
    fn bench_direct_32(x: u64, n: u64) -> u64;
}

/// The baseline: the loop of direct calls of [`target`]`(off)`.
pub fn direct(off: usize) -> Loop {
    match off {
        0 => bench_direct_0,
        16 => bench_direct_16,
        32 => bench_direct_32,
        _ => panic!("no target at +{off}"),
    }
}

/// Runs `f` from `x = 1` for `N` calls.
pub fn run(f: Loop) -> u64 {
    // SAFETY: `call_loop!` loops take any x and n ≥ 1; their calls reach
    // targets that follow the C ABI.
    unsafe { f(black_box(1), N) }
}

/// The expected result of `N` calls from 1.
pub fn expected() -> u64 {
    (0..N).fold(1, |x, _| reference(x))
}

/// In the counting child: the variant to count, from [`COUNT_ENV`].
pub fn count_request() -> Option<String> {
    std::env::var(COUNT_ENV).ok()
}

/// Runs `f` [`REPS`] times: the function callgrind counts (its name is
/// what `--toggle-collect` matches).
#[inline(never)]
pub fn counted(f: &dyn Fn(u64) -> u64) -> u64 {
    let mut x = 1;
    for _ in 0..REPS {
        x = f(black_box(x));
    }
    x
}

/// Instructions per call of each variant (a loop of `N` calls per
/// `REPS`), counted by running this executable under callgrind once per
/// variant with [`COUNT_ENV`] set; `None` everywhere when valgrind is not
/// installed or `ALTPATCH_BENCH_NO_COUNT` is set.
pub fn instructions_per_call(variants: &[&str]) -> Vec<Option<f64>> {
    let none = vec![None; variants.len()];
    if std::env::var_os("ALTPATCH_BENCH_NO_COUNT").is_some() {
        return none;
    }
    let Ok(exe) = std::env::current_exe() else {
        return none;
    };
    let dir = std::env::temp_dir();
    variants
        .iter()
        .map(|v| {
            let out = dir.join(format!(
                "altpatch-bench-{}-{v}.callgrind",
                std::process::id()
            ));
            let status = std::process::Command::new("valgrind")
                .arg("--tool=callgrind")
                .arg(format!("--callgrind-out-file={}", out.display()))
                .arg("--toggle-collect=*aligned::counted*")
                .arg(&exe)
                .env(COUNT_ENV, v)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .ok()?;
            let text = std::fs::read_to_string(&out).ok();
            let _ = std::fs::remove_file(&out);
            if !status.success() {
                eprintln!("callgrind of {v} failed: {status}");
                return None;
            }
            let total: f64 = text?
                .lines()
                .find_map(|l| l.strip_prefix("summary:"))?
                .trim()
                .parse()
                .ok()?;
            Some(total / (REPS * N) as f64)
        })
        .collect()
}

/// How a row of [`print_table`] was measured.
#[derive(Clone, Copy)]
pub enum Placement {
    /// At each of [`OFFSETS`] (bench ids `group/name/<off>`).
    Aligned,
    /// Once, where the compiler put it (bench id `group/name/any`).
    Uncontrolled,
}

impl Placement {
    /// The placements measured.
    pub fn offsets(&self) -> &'static [usize] {
        match self {
            Placement::Aligned => &OFFSETS,
            Placement::Uncontrolled => &[0],
        }
    }

    /// The criterion id of `name` at `off`.
    pub fn id(&self, name: &str, off: usize) -> criterion::BenchmarkId {
        match self {
            Placement::Aligned => criterion::BenchmarkId::new(name, off),
            Placement::Uncontrolled => criterion::BenchmarkId::new(name, "any"),
        }
    }

    fn key(&self, off: usize) -> String {
        match self {
            Placement::Aligned => off.to_string(),
            Placement::Uncontrolled => "any".into(),
        }
    }
}

/// Rounds of a paired measurement.
const ROUNDS: usize = 201;
/// Loops per timed stretch of a round (~0.2–2 ms).
const STRETCH: u64 = 200;

/// The median of `time(variant) / time(base)` over [`ROUNDS`] rounds that
/// each time both, alternating which goes first. On a shared machine the
/// speed drifts over seconds (neighbours, frequency); criterion times
/// variants one after another, so a ratio of its means carries that drift.
/// Interleaving at the millisecond scale cancels it.
pub fn paired_ratio(base: &dyn Fn() -> u64, variant: &dyn Fn() -> u64) -> f64 {
    let time = |f: &dyn Fn() -> u64| {
        let t = std::time::Instant::now();
        for _ in 0..STRETCH {
            black_box(f());
        }
        t.elapsed().as_secs_f64()
    };
    for _ in 0..10 {
        black_box((base(), variant()));
    }
    let mut r: Vec<f64> = (0..ROUNDS)
        .map(|k| {
            if k % 2 == 0 {
                let b = time(base);
                time(variant) / b
            } else {
                let v = time(variant);
                v / time(base)
            }
        })
        .collect();
    r.sort_by(f64::total_cmp);
    r[ROUNDS / 2]
}

/// One row of [`print_table`].
pub struct Row {
    /// The variant (its criterion function name).
    pub name: &'static str,
    /// Where its target was.
    pub placement: Placement,
    /// [`paired_ratio`] against the baseline at each placement.
    pub ratios: Vec<f64>,
    /// [`instructions_per_call`].
    pub count: Option<f64>,
}

/// The rows of a table: for each variant, the instructions per call
/// (callgrind) and, at each of its placements, the paired ratio
/// `ratio(name, off)` measures.
pub fn rows(
    variants: &[(&'static str, Placement)],
    mut ratio: impl FnMut(&'static str, usize) -> f64,
) -> Vec<Row> {
    let names: Vec<&str> = variants.iter().map(|(n, _)| *n).collect();
    let counts = instructions_per_call(&names);
    variants
        .iter()
        .zip(counts)
        .map(|((name, placement), count)| Row {
            name,
            ratios: placement
                .offsets()
                .iter()
                .map(|&off| ratio(name, off))
                .collect(),
            placement: *placement,
            count,
        })
        .collect()
}

/// Prints the markdown table of a group: per variant the mean time per
/// call (criterion) over the placements with its spread, the paired ratio
/// against the baseline at matched placements (mean and range), and the
/// instructions per call.
pub fn print_table(group: &str, base: &str, rows: &[Row]) {
    println!(
        "\n| {group} | ns per call | spread over placements | vs {base}, paired (range) | instructions per call |"
    );
    println!("|---|---:|---:|---:|---:|");
    for row in rows {
        let times: Vec<f64> = row
            .placement
            .offsets()
            .iter()
            .filter_map(|o| {
                crate::estimates::mean_ns(&format!(
                    "{group}/{}/{}",
                    row.name,
                    row.placement.key(*o)
                ))
            })
            .map(|t| t / N as f64)
            .collect();
        let Some(t) = mean(&times) else { continue };
        let spread = match row.placement {
            Placement::Aligned => format!("{:.3}–{:.3}", min(&times), max(&times)),
            Placement::Uncontrolled => "not controlled".into(),
        };
        let ratio = match mean(&row.ratios) {
            Some(r) if row.ratios.len() > 1 => {
                format!("{r:.3}x ({:.3}–{:.3})", min(&row.ratios), max(&row.ratios))
            }
            Some(r) => format!("{r:.3}x"),
            None => "–".into(),
        };
        let count = row.count.map_or("–".into(), |c| format!("{c:.3}"));
        println!("| {} | {t:.3} | {spread} | {ratio} | {count} |", row.name);
    }
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

#[multiversion::multiversion(targets("x86_64+avx2+bmi2", "x86_64+sse4.2"))]
fn mv_step(x: u64) -> u64 {
    x.wrapping_mul(3).wrapping_add(1)
}

/// The `multiversion` crate's dispatch of the reference body, callable
/// from a [`call_loop!`] (the crate's functions have the Rust ABI; its
/// dispatcher is inlined here, so this is the dispatch itself).
pub extern "C" fn multiversion_step(x: u64) -> u64 {
    mv_step(x)
}
