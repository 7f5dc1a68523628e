//! What the trampoline tests share: child processes, their scenarios, and
//! reading /proc/self/maps.

use altpatch::trampoline::{Closure, Pool, Source, TrampolineError};
use std::ffi::c_void;

use super::common::child::{CHILD_ARGS, finish};
pub use super::common::child::{
    Outcome, Vma, assert_no_writable_view, vmas, writable_views_of_code,
};

/// Runs `scenario` in a child process of this test binary.
pub fn run(scenario: &str, env: &[(&str, &str)]) -> Outcome {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(CHILD_ARGS)
        .env("TRAMPOLINE_CHILD", scenario)
        .env_remove("ALTPATCH_TRAMPOLINE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    finish(cmd.output().unwrap(), "CHILD-OK")
}

/// The mapping containing `addr`.
pub fn mapping_of(addr: usize) -> Option<Vma> {
    vmas().into_iter().find(|m| m.start <= addr && addr < m.end)
}

/// This process's descriptors open on the file with `inode` (device
/// `major:minor` as /proc/self/maps prints it, in hex).
pub fn descriptors_of(inode: &(String, u64)) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt;
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let fd: i32 = e.file_name().to_str()?.parse().ok()?;
        let md = std::fs::metadata(e.path()).ok()?;
        let dev = format!(
            "{:02x}:{:02x}",
            libc::major(md.dev()),
            libc::minor(md.dev())
        );
        (md.ino() == inode.1 && dev == inode.0).then_some(fd)
    })
    .collect()
}

/// The (device, inode) of this test binary's text.
pub fn exe_inode() -> (String, u64) {
    mapping_of(exe_inode as *const () as usize).unwrap().inode
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
            // What the environment allows without MDWE (a hardened host
            // may refuse executable memfds, vm.memfd_noexec=2, or noexec
            // temporary directories): the baseline MDWE must not shrink.
            let before: Vec<bool> = each_source(exercise)
                .iter()
                .map(|(_, r)| r.is_ok())
                .collect();
            const PR_SET_MDWE: libc::c_int = 65;
            // SAFETY: prctl with constant arguments.
            let r = unsafe { libc::prctl(PR_SET_MDWE, 1, 0, 0, 0) };
            assert_eq!(r, 0, "PR_SET_MDWE: {}", std::io::Error::last_os_error());
            let all = each_source(exercise);
            // MDWE refuses W+X and exec gained later, not fresh read+exec
            // file mappings: every source the environment allows works.
            assert!(all[0].1.is_ok(), "the own file under MDWE: {:?}", all[0].1);
            for ((s, r), ok) in all.iter().zip(before) {
                if ok {
                    assert!(r.is_ok(), "{s:?} works without MDWE, not under it: {r:?}");
                } else {
                    println!("SKIPPED {s:?}: refused by this environment, with or without MDWE");
                }
            }
            assert_no_writable_view("MDWE");
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
            assert_no_writable_view("memfd_noexec=2");
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
        "rlimit_as" => {
            // A 2 GiB address-space limit refuses the 4 GiB reservation:
            // the pool must take a smaller one and still work.
            let lim = libc::rlimit {
                rlim_cur: 2 << 30,
                rlim_max: 2 << 30,
            };
            // SAFETY: setrlimit with a valid struct.
            assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) }, 0);
            exercise(Pool::global(), 10_000);
        }
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

/// The parent side of `hardened`: a pid namespace with
/// `vm.memfd_noexec=2`, then also `noexec` temporary directories.
pub fn in_hardened_namespace() {
    super::common::child::in_hardened_namespace("TRAMPOLINE_CHILD", "CHILD-OK");
}
