//! What the trampoline tests share: child processes, their scenarios, and
//! reading /proc/self/maps.

use std::ffi::c_void;
use std::os::unix::process::ExitStatusExt;

use altpatch::trampoline::{Closure, Pool, Source, TrampolineError};

/// How a child ended.
pub struct Outcome {
    pub status: std::process::ExitStatus,
    pub signal: Option<i32>,
    pub out: String,
}

impl Outcome {
    /// Exited 0 having printed the scenario's success line.
    pub fn ok(&self, scenario: &str) -> bool {
        self.status.success() && self.out.contains(&format!("CHILD-OK {scenario}"))
    }
}

const CHILD_ARGS: [&str; 5] = [
    "child",
    "--exact",
    "--ignored",
    "--nocapture",
    "--test-threads=1",
];

fn finish(out: std::process::Output) -> Outcome {
    Outcome {
        status: out.status,
        signal: out.status.signal(),
        out: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Runs `scenario` in a child process of this test binary.
pub fn run(scenario: &str, env: &[(&str, &str)]) -> Outcome {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(CHILD_ARGS)
        .env("TRAMPOLINE_CHILD", scenario)
        .env_remove("ALTPATCH_TRAMPOLINE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    finish(cmd.output().unwrap())
}

/// Whether tools the environment may lack must be present (CI sets it).
fn required() -> bool {
    std::env::var_os("ALTPATCH_REQUIRE_HOSTILE").is_some()
}

/// One line of /proc/self/maps.
pub struct Vma {
    pub start: usize,
    pub end: usize,
    pub perms: String,
    /// (device, inode); inode 0 for anonymous memory.
    pub inode: (String, u64),
    pub path: String,
    pub line: String,
}

pub fn vmas() -> Vec<Vma> {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_ascii_whitespace().collect();
            let (a, b) = f.first()?.split_once('-')?;
            Some(Vma {
                start: usize::from_str_radix(a, 16).ok()?,
                end: usize::from_str_radix(b, 16).ok()?,
                perms: f.get(1)?.to_string(),
                inode: (f.get(3)?.to_string(), f.get(4)?.parse().ok()?),
                path: f.get(5..).map(|p| p.join(" ")).unwrap_or_default(),
                line: l.to_string(),
            })
        })
        .collect()
}

/// The mapping containing `addr`.
pub fn mapping_of(addr: usize) -> Option<Vma> {
    vmas().into_iter().find(|m| m.start <= addr && addr < m.end)
}

/// The (device, inode) of this test binary's text.
pub fn exe_inode() -> (String, u64) {
    mapping_of(exe_inode as *const () as usize).unwrap().inode
}

/// Every writable view of code: a mapping both writable and executable, or
/// a writable shared mapping of a file that is also mapped executable
/// (private writable mappings, such as a binary's `.data`, are copies).
pub fn writable_code() -> Vec<String> {
    let v = vmas();
    let exec: std::collections::HashSet<(String, u64)> = v
        .iter()
        .filter(|m| m.perms.as_bytes()[2] == b'x' && m.inode.1 != 0)
        .map(|m| m.inode.clone())
        .collect();
    v.iter()
        .filter(|m| {
            let p = m.perms.as_bytes();
            p[1] == b'w' && (p[2] == b'x' || (p[3] == b's' && exec.contains(&m.inode)))
        })
        .map(|m| m.line.clone())
        .collect()
}

pub fn assert_no_writable_code(after: &str) {
    let w = writable_code();
    assert!(w.is_empty(), "after {after}: writable code: {w:#?}");
}

type Cmp = unsafe extern "C" fn(*const c_void, *const c_void) -> i32;

/// What each source does in this process: `Ok` after `exercise` ran on it,
/// or the refusal.
fn each_source(exercise: fn(&Pool, usize)) -> Vec<(Source, Result<(), TrampolineError>)> {
    [Source::OwnFile, Source::Memfd, Source::TmpFile]
        .into_iter()
        .map(|s| {
            let pool = Pool::with_source(s);
            let r = pool.prepare().map(|_| exercise(&pool, 10_000));
            println!("{s:?}: {r:?}");
            (s, r)
        })
        .collect()
}

/// The scenarios children run.
pub fn run_child(scenario: &str, exercise: fn(&Pool, usize)) {
    match scenario {
        "mdwe" => {
            const PR_SET_MDWE: libc::c_int = 65;
            // SAFETY: prctl with constant arguments.
            let r = unsafe { libc::prctl(PR_SET_MDWE, 1, 0, 0, 0) };
            assert_eq!(r, 0, "PR_SET_MDWE: {}", std::io::Error::last_os_error());
            let all = each_source(exercise);
            // MDWE refuses W+X and exec gained later, not fresh read+exec
            // file mappings: every source works.
            assert!(all.iter().all(|(_, r)| r.is_ok()), "under MDWE");
            assert_no_writable_code("MDWE");
        }
        "hardened" => {
            let v = std::fs::read_to_string("/proc/sys/vm/memfd_noexec").unwrap();
            assert_eq!(v.trim(), "2", "not in a memfd_noexec=2 namespace");
            let all = each_source(exercise);
            assert!(all[0].1.is_ok(), "the own file must work");
            let memfd = all[1]
                .1
                .as_ref()
                .expect_err("memfd_noexec=2 refuses exec memfds");
            // memfd_create(MFD_EXEC) itself is refused, or (older
            // kernels) mapping the memfd executable.
            let TrampolineError::NoSource { refusals } = memfd else {
                panic!("{memfd}")
            };
            assert!(
                refusals.len() == 1 && matches!(refusals[0].errno, libc::EACCES | libc::EPERM),
                "{memfd}"
            );
            if std::env::var_os("HARDENED_MOUNTS").is_some() {
                assert!(all[2].1.is_err(), "noexec mounts refuse the temporary file");
            }
            assert_eq!(Pool::new().prepare(), Ok(Source::OwnFile));
            assert_no_writable_code("memfd_noexec=2");
        }
        "panic" => {
            let c = Closure::<Cmp>::new(|_: *const c_void, _: *const c_void| -> i32 {
                panic!("closure panicked in qsort")
            })
            .unwrap();
            let mut v = [2u32, 1];
            // SAFETY: a valid array; the comparator aborts the process.
            unsafe { libc::qsort(v.as_mut_ptr().cast(), 2, 4, Some(c.code())) };
        }
        "after_free" => {
            let c = Closure::<unsafe extern "C" fn() -> u32>::new(|| 1).unwrap();
            let f = c.code();
            drop(c);
            // SAFETY: deliberately not: the freed trampoline must abort.
            unsafe { f() };
        }
        "fork" => fork_scenario(),
        "env" => match Pool::global().prepare() {
            Ok(s) => println!("source {s:?}"),
            Err(e) => {
                println!("{e:?}");
                std::process::exit(3);
            }
        },
        other => panic!("unknown scenario {other:?}"),
    }
    println!("CHILD-OK {scenario}");
}

/// Forks 20 times while another thread allocates and frees without pause:
/// each child calls a closure of the parent and allocates its own, within
/// a deadline (a lock held at fork would hang it).
fn fork_scenario() {
    let k = 11u32;
    let parent = Closure::<unsafe extern "C" fn(u32) -> u32>::new(move |x| x * k).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let v: Vec<_> = (0..200u32)
                    .map(|i| Closure::<unsafe extern "C" fn() -> u32>::new(move || i).unwrap())
                    .collect();
                drop(v);
            }
        })
    };
    for _ in 0..20 {
        // SAFETY: the child only calls async-signal-safe functions and
        // code that takes no lock (the pool), then _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: `parent` is alive in the child's copy of memory.
            let a = unsafe { parent.code()(3) };
            let mine = Closure::<unsafe extern "C" fn(u32) -> u32>::new(|x| x + 1);
            let ok = a == 33 && mine.is_ok_and(|m| unsafe { m.code()(1) } == 2);
            // SAFETY: leaving the child without running the parent's atexit.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut status = 0;
        loop {
            // SAFETY: waiting for our own child.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if r == pid {
                break;
            }
            if std::time::Instant::now() > deadline {
                // SAFETY: killing our own hung child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                panic!("a forked child hung allocating a trampoline");
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child status {status:#x}"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    churn.join().unwrap();
}

/// The parent side of `hardened`: `unshare` a pid namespace, set
/// `vm.memfd_noexec=2` there (the machine is untouched), run the child;
/// again with `/dev/shm`, `/tmp` and `/var/tmp` mounted `noexec`.
pub fn in_hardened_namespace() {
    let exe = std::env::current_exe().unwrap();
    for mounts in [false, true] {
        // The test binary is opened before the mounts and run through its
        // descriptor: it may itself live under /tmp (a CI clone).
        let mut script =
            String::from("echo 2 > /proc/sys/vm/memfd_noexec || exit 97\nexec 3< \"$1\"\nshift\n");
        if mounts {
            for d in ["/dev/shm", "/tmp", "/var/tmp"] {
                script += &format!("mount -t tmpfs -o noexec tmpfs {d} || exit 98\n");
            }
        }
        script += "exec /proc/self/fd/3 \"$@\"\n";
        let mut cmd = std::process::Command::new("unshare");
        cmd.args(["--pid", "--fork", "--mount-proc", "sh", "-c", &script, "sh"])
            .arg(&exe)
            .args(CHILD_ARGS)
            .env("TRAMPOLINE_CHILD", "hardened")
            .env_remove("ALTPATCH_TRAMPOLINE");
        if mounts {
            cmd.env("HARDENED_MOUNTS", "1");
        }
        let o = match cmd.output() {
            Ok(out) => finish(out),
            Err(e) => {
                assert!(!required(), "unshare (util-linux) is required: {e}");
                eprintln!("SKIPPED: no unshare: {e}");
                return;
            }
        };
        let no_namespace =
            matches!(o.status.code(), Some(97 | 98)) || o.out.contains("unshare failed");
        if !o.ok("hardened") && no_namespace && !required() {
            eprintln!("SKIPPED: cannot make a pid namespace here:\n{}", o.out);
            return;
        }
        assert!(
            o.ok("hardened"),
            "hardened child (mounts: {mounts}):\n{}",
            o.out
        );
    }
}
