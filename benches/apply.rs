//! Applying plans of 1e2..1e5 five-byte edits to an RX region, validation
//! included, against a raw copy of the same bytes into a RW buffer measured
//! in the same run.
//!
//! Each iteration applies one plan: iterations alternate between the plan
//! that turns every NOP5 into `jmp .+5` and its inverse, so every apply
//! really writes `n` edits. After the criterion run a table of per-edit
//! times and ratios (apply / raw copy) is printed; BENCHMARKS.md records it.

use std::hint::black_box;
use std::time::{Duration, Instant};

use altpatch::{Edit, LinuxPoke, Plan, Publish};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};

#[path = "support/estimates.rs"]
mod estimates;
use estimates::mean_ns;

const SIZES: [usize; 4] = [100, 1_000, 10_000, 100_000];
/// Sites every 16 bytes: a 1e5-edit plan spans 1.6 MB (391 pages).
const STRIDE: usize = 16;
const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
const JMP0: [u8; 5] = [0xe9, 0x00, 0x00, 0x00, 0x00];

/// An RX region of `n` NOP5 sites (never executed by the bench).
fn rx_region(n: usize) -> memmap2::Mmap {
    let mut m = memmap2::MmapMut::map_anon(n * STRIDE + 4096).unwrap();
    for unit in m.chunks_mut(STRIDE) {
        let k = unit.len().min(5);
        unit[..k].copy_from_slice(&NOP5[..k]);
    }
    m.make_exec().unwrap()
}

struct Fixture {
    _region: memmap2::Mmap,
    forward: Plan,
    back: Plan,
    poke: LinuxPoke,
    applies: u64,
}

fn fixture(n: usize, publish: Publish) -> Fixture {
    let region = rx_region(n);
    let base = region.as_ptr() as usize;
    // SAFETY: the region stays mapped for the fixture's lifetime.
    let mut forward = unsafe { Plan::with_text(base..base + region.len()) };
    for i in 0..n {
        forward.push(Edit::replace(base + i * STRIDE, &NOP5, &JMP0).site("bench"));
    }
    let mut poke = LinuxPoke::with_publish(publish).unwrap();
    // Validate once so the inverse knows the old bytes.
    forward.validate(&poke).unwrap();
    let back = forward.inverse().unwrap();
    // First touch: moves the pages onto the poke's memfd (not measured).
    // SAFETY: nothing executes the region.
    unsafe { forward.apply(&mut poke) }.unwrap();
    // SAFETY: as above.
    unsafe { back.clone().apply(&mut poke) }.unwrap();
    Fixture {
        _region: region,
        forward,
        back,
        poke,
        applies: 0,
    }
}

impl Fixture {
    fn apply_once(&mut self) {
        let plan = if self.applies & 1 == 0 {
            &mut self.forward
        } else {
            &mut self.back
        };
        // SAFETY: nothing executes the region.
        let r = unsafe { plan.apply(&mut self.poke) }.unwrap();
        debug_assert_eq!(r.written, plan.len());
        self.applies += 1;
    }
}

/// The baseline: the same bytes copied from a list of (offset, bytes) to
/// the same offsets of a RW buffer, with no validation or synchronization.
fn raw_copy(buf: &mut [u8], edits: &[(usize, [u8; 5])]) {
    for (off, bytes) in edits {
        buf[*off..*off + 5].copy_from_slice(bytes);
    }
}

fn bench_apply(c: &mut Criterion) {
    let mut group = c.benchmark_group("apply");
    group.sample_size(20);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(3));
    for n in SIZES {
        group.throughput(Throughput::Elements(n as u64));
        for (name, publish) in [("in_place", Publish::InPlace), ("remap", Publish::Remap)] {
            let mut fx = fixture(n, publish);
            group.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter(|| fx.apply_once())
            });
        }
        let mut buf = vec![0u8; n * STRIDE + 4096];
        let lists: [Vec<(usize, [u8; 5])>; 2] = [
            (0..n).map(|i| (i * STRIDE, JMP0)).collect(),
            (0..n).map(|i| (i * STRIDE, NOP5)).collect(),
        ];
        let mut flip = 0;
        group.bench_with_input(BenchmarkId::new("raw_copy", n), &n, |b, _| {
            b.iter(|| {
                flip ^= 1;
                raw_copy(black_box(&mut buf), black_box(&lists[flip]));
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_apply);

/// Counts the `mmap` publications one apply of `n` edits makes.
fn remaps_per_apply(n: usize, publish: Publish) -> (f64, f64) {
    let mut fx = fixture(n, publish);
    let before = fx.poke.remaps();
    let rounds = 20;
    let t = Instant::now();
    for _ in 0..rounds {
        fx.apply_once();
    }
    let per = t.elapsed().as_secs_f64() * 1e9 / rounds as f64;
    ((fx.poke.remaps() - before) as f64 / rounds as f64, per)
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    println!();
    println!(
        "| edits | pages | in-place ns/edit | remap ns/edit | raw copy ns/edit | in-place / raw | remap / raw | mmaps per remap apply |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for n in SIZES {
        let (remaps, _) = remaps_per_apply(n, Publish::Remap);
        let (inplace_remaps, _) = remaps_per_apply(n, Publish::InPlace);
        assert_eq!(
            inplace_remaps, 0.0,
            "in-place applies make no mmap after homing"
        );
        let pages = (n * STRIDE).div_ceil(4096);
        let per = |id| mean_ns(&format!("apply/{id}/{n}")).map(|t| t / n as f64);
        match (per("in_place"), per("remap"), per("raw_copy")) {
            (Some(i), Some(m), Some(r)) => println!(
                "| {n} | {pages} | {i:.1} | {m:.1} | {r:.2} | {:.1}x | {:.1}x | {remaps:.0} |",
                i / r,
                m / r
            ),
            _ => println!("| {n} | {pages} | (run without a filter for the table) |"),
        }
    }
}
