//! What the hostile scenarios share: running a child, the patched code the
//! children call, and the checks they make.

use altpatch::static_key::StaticFalseKey;
use altpatch::{static_branch_unlikely, static_call};

pub use super::common::child::{CHILD_ARGS, Outcome, assert_no_writable_view, required};

/// The child test command for `scenario` (not yet run).
pub fn command(scenario: &str, env: &[(&str, &str)]) -> std::process::Command {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(CHILD_ARGS);
    cmd.env("HOSTILE", scenario);
    cmd.env_remove("ALTPATCH_POKE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// How a hostile child ended (success marker `HOSTILE-OK`).
pub fn finish(out: std::process::Output) -> Outcome {
    super::common::child::finish(out, "HOSTILE-OK")
}

/// Runs `scenario` in a child process of this test binary.
pub fn run(scenario: &str, env: &[(&str, &str)]) -> Outcome {
    finish(command(scenario, env).output().unwrap())
}

/// The names of the strategies this machine lets a process use.
pub fn usable_strategies() -> Vec<&'static str> {
    super::common::usable_strategies()
        .into_iter()
        .map(|s| s.name())
        .collect()
}

/// Whether this machine lets a process use the strategy called `name`.
pub fn usable(name: &str) -> bool {
    usable_strategies().contains(&name)
}

pub extern "C" fn add1(x: u64) -> u64 {
    x + 1
}

pub extern "C" fn add2(x: u64) -> u64 {
    x + 2
}

static_call! {
    pub fn hcall(x: u64) -> u64 = add1;
}

pub static HKEY: StaticFalseKey = StaticFalseKey::new();

/// What callers saw: results from the new target (`x + 2`), from neither
/// target, and key hits.
#[derive(Clone, Copy, Debug, Default)]
pub struct Seen {
    pub new: u64,
    pub bad: u64,
    pub hits: u64,
    pub rounds: u64,
}

impl Seen {
    pub fn add(&mut self, o: Seen) {
        self.new += o.new;
        self.bad += o.bad;
        self.hits += o.hits;
        self.rounds += o.rounds;
    }
}

/// 100 call sites of `hcall` and 100 branch sites of `HKEY`.
#[inline(never)]
pub fn hundred(x: u64, seen: &mut Seen) {
    rep10!(rep10!({
        let r = hcall(x);
        if r == x + 2 {
            seen.new += 1;
        } else if r != x + 1 {
            seen.bad += 1;
        }
        if static_branch_unlikely!(HKEY) {
            seen.hits += 1;
        }
    }));
    seen.rounds += 1;
}

/// Ten call sites (for signal handlers); returns how many results were
/// from neither target.
#[inline(never)]
pub fn ten_in_handler(x: u64) -> u64 {
    let mut bad = 0;
    rep10!({
        let r = hcall(x);
        if r != x + 1 && r != x + 2 {
            bad += 1;
        }
    });
    bad
}

/// Re-targets `hcall` and flips `HKEY` `n` times with the high-level APIs.
pub fn updates(n: usize) {
    for i in 0..n {
        let t = if i % 2 == 0 { add2 } else { add1 };
        let r = hcall::update(t).unwrap();
        assert!(r.inlined >= 100, "{r:?}");
        HKEY.toggle().unwrap();
    }
}

/// Makes the crate install its `SIGTRAP` handler: one INT3 batch.
pub fn install_altpatch_handler() {
    use altpatch::Publish;
    altpatch::os::linux::set_live_publication(Publish::Live).unwrap();
    HKEY.enable().unwrap();
    HKEY.disable().unwrap();
    altpatch::os::linux::set_live_publication(Publish::Remap).unwrap();
}

/// Runs `f` on `n` threads until `stop`, then sums what they saw.
pub fn callers<F: Fn(usize) + Send + Clone + 'static>(
    n: usize,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
    setup: F,
) -> Vec<std::thread::JoinHandle<Seen>> {
    (0..n)
        .map(|i| {
            let stop = stop.clone();
            let setup = setup.clone();
            std::thread::spawn(move || {
                setup(i);
                let mut seen = Seen::default();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    hundred(1000 + i as u64, &mut seen);
                }
                seen
            })
        })
        .collect()
}

/// Joins callers; each must have observed the new target and key.
pub fn joined(handles: Vec<std::thread::JoinHandle<Seen>>) -> Seen {
    let mut all = Seen::default();
    for (i, h) in handles.into_iter().enumerate() {
        let s = h.join().expect("a caller thread died");
        assert_eq!(s.bad, 0, "caller {i}: results from neither target");
        assert!(s.rounds > 0, "caller {i} never ran");
        assert!(
            s.new > 0 && s.hits > 0,
            "caller {i} never observed an update: {s:?}"
        );
        all.add(s);
    }
    all
}
