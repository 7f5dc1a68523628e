//! The process around the patcher: fork mid-update, objects unloaded and
//! loaded again, a debugger, hardened kernels, writable views, `ALTPATCH`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use altpatch::cpu::{Feature, Features};
use altpatch::os::linux::{refuse_for_tests, set_live_publication, strategies, strategy};
use altpatch::poke::Strategy;
use altpatch::{Image, LinuxPoke, PokeError, Publish, alternative};

use super::support::*;

/// The shared-object fixture (built once).
pub fn altso() -> std::path::PathBuf {
    super::common::build_fixture("altso", false).join("libaltso.so")
}

altpatch::ifunc! {
    fn hostile_ifunc(x: u64) -> u64 = pick;
}
extern "C" fn times3(x: u64) -> u64 {
    x * 3
}
fn pick(_: &Features) -> extern "C" fn(u64) -> u64 {
    times3
}

#[inline(never)]
fn alt_value() -> u32 {
    let r: u32;
    // SAFETY: each sequence only moves an immediate into `r`.
    unsafe {
        alternative!(
            name: "hostile_alt",
            "mov {r:e}, 1",
            [Sse3 => "mov {r:e}, 2"],
            r = out(reg) r,
            options(nomem, nostack, preserves_flags)
        )
    };
    r
}

/// Where the debugger's breakpoint goes: next to `hostile_gdb_calls`, in
/// the page its call sites are rewritten in (not on a site: a breakpoint
/// there is refused by validation, as any unexpected byte is).
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text.hostile_gdb")]
#[inline(never)]
pub extern "C" fn hostile_gdb_marker(x: u64) -> u64 {
    std::hint::black_box(x)
}

/// Two call sites in one small function, which calls the marker first.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".text.hostile_gdb")]
#[inline(never)]
pub extern "C" fn hostile_gdb_calls(x: u64) -> u64 {
    let x = hostile_gdb_marker(x);
    hcall(x) + hcall(std::hint::black_box(x))
}

pub fn scenario(s: &str) {
    match s {
        "fork_swap" => fork_during(Publish::Remap),
        "fork_int3" => fork_during(Publish::Live),
        "dl_reload" => dl_reload(),
        "no_writable_view" => no_writable_view(),
        "long_env" => long_env(),
        "gdb_child" => gdb_child(),
        "hardened" => hardened(),
        "fallback" => fallback(),
        "closefrom" => closefrom(),
        _ => panic!("unknown scenario {s}"),
    }
}

/// Waits for `pid` up to `limit`; kills it if it is still running.
fn wait_for(pid: libc::pid_t, limit: Duration) -> Result<i32, String> {
    let start = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: reaping our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return Ok(status);
        }
        if start.elapsed() > limit {
            // SAFETY: killing our own hung child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return Err(format!("child {pid} hung for {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A thread updates without pause while the main thread forks 40 times;
/// every child must update its own copy at once and see the result.
fn fork_during(publish: Publish) {
    set_live_publication(publish).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let updater = {
        let (stop, done) = (stop.clone(), done.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                hcall::update(if i.is_multiple_of(2) { add2 } else { add1 }).unwrap();
                HKEY.toggle().unwrap();
                i += 1;
                done.store(i, Ordering::Relaxed);
            }
        })
    };
    while done.load(Ordering::Relaxed) < 2 {
        std::thread::sleep(Duration::from_millis(1));
    }
    for k in 0..40u64 {
        std::thread::sleep(Duration::from_micros(100 * (k % 7)));
        // SAFETY: the child only patches, calls the patched code and
        // leaves with _exit; an alarm ends it if it hangs.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: alarm and _exit are async-signal-safe.
            unsafe { libc::alarm(20) };
            let ok = hcall::update(add2).is_ok()
                && hcall(1) == 3
                && HKEY.enable().is_ok()
                && hcall::update(add1).is_ok()
                && hcall(1) == 2
                && HKEY.disable().is_ok();
            // SAFETY: leaving without running the parent's destructors.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let status = wait_for(pid, Duration::from_secs(30)).unwrap();
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "fork {k}: the child could not update itself (status {status:#x})"
        );
    }
    stop.store(true, Ordering::Relaxed);
    updater.join().unwrap();
    println!(
        "40 children updated themselves; the parent made {} updates",
        done.load(Ordering::Relaxed)
    );
}

/// dlopen -> patch -> dlclose -> dlopen (usually at the same address) ->
/// patch, in place and by page swap: every load is patched for real.
fn dl_reload() {
    let so = std::ffi::CString::new(std::env::var("ALTSO").unwrap()).unwrap();
    let mut bases = Vec::new();
    for publish in [Publish::InPlace, Publish::Remap, Publish::InPlace] {
        for _ in 0..2 {
            // SAFETY: our fixture library, which has no constructors of its own.
            let h = unsafe { libc::dlopen(so.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
            assert!(!h.is_null());
            // SAFETY: the symbol exists with this C signature.
            let level: extern "C" fn() -> u32 = unsafe {
                let l = libc::dlsym(h, c"altso_level".as_ptr());
                assert!(!l.is_null());
                std::mem::transmute::<*mut libc::c_void, extern "C" fn() -> u32>(l)
            };
            assert_eq!(level(), 1, "a fresh load runs the default");
            // SAFETY: the library stays loaded until the dlclose below.
            let image = unsafe { Image::from_loaded(level as *const () as usize) }.unwrap();
            bases.push(image.text().first().map(|r| r.start).unwrap_or(0));
            let mut poke = LinuxPoke::with_publish(publish).unwrap();
            let features = Features::none().with(Feature::Sse4_2);
            // SAFETY: no thread runs the library's code now.
            let r = unsafe { alternative::apply(&image, &features, &mut poke) }.unwrap();
            assert_eq!(r.sites.len(), 2);
            assert_eq!(
                level(),
                2,
                "apply returned Ok but the code did not change ({publish:?})"
            );
            assert_no_writable_view("alternative::apply on a loaded object");
            // SAFETY: nothing of the library is used after this.
            assert_eq!(unsafe { libc::dlclose(h) }, 0);
            let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
            assert!(
                !maps.contains("libaltso.so"),
                "dlclose did not unload the library"
            );
        }
    }
    let same = bases.windows(2).filter(|w| w[0] == w[1]).count();
    println!(
        "{} loads, {same} at the address of the previous one: {bases:x?}",
        bases.len()
    );
    assert!(
        same > 0,
        "never reloaded at the same address: the stale-page case went untested"
    );
}

/// After every public call that patches, no writable view of code exists.
fn no_writable_view() {
    let image = Image::current();
    let mut poke = LinuxPoke::new().unwrap();
    // SAFETY: nothing else runs the alternative now.
    unsafe { alternative::apply(&image, &Features::detect(), &mut poke) }.unwrap();
    assert_eq!(alt_value(), 2);
    assert_no_writable_view("alternative::apply");
    for publish in [Publish::InPlace, Publish::Remap, Publish::Live] {
        let mut poke = LinuxPoke::with_publish(publish).unwrap();
        let sites = altpatch::elf::current_sites().unwrap();
        // SAFETY: each edit is one instruction for one; no other thread runs.
        unsafe { hcall::update_with(add2, &image, sites, &mut poke) }.unwrap();
        assert_eq!(hcall(1), 3);
        assert_no_writable_view(&format!("update_with ({publish:?})"));
        // SAFETY: as above.
        unsafe { hcall::update_with(add1, &image, sites, &mut poke) }.unwrap();
    }
    hcall::update(add2).unwrap();
    assert_no_writable_view("static call update");
    HKEY.enable().unwrap();
    assert_no_writable_view("StaticKey::enable");
    HKEY.inc().unwrap();
    HKEY.dec().unwrap();
    assert_no_writable_view("StaticKey::inc/dec");
    altpatch::ifunc::init().unwrap();
    assert_eq!(hostile_ifunc(5), 15);
    assert_no_writable_view("ifunc::init");
    let policy = altpatch::retpoline::Policy::choose(&Features::detect(), &Default::default());
    altpatch::retpoline::apply_current(&policy).unwrap();
    assert_no_writable_view("retpoline::apply_current");
    println!("strategy: {}", strategy().unwrap());
}

/// A long `ALTPATCH`: the lazily published snapshot and the explicit one
/// agree, so `ifunc::init` works after a lazy resolution.
fn long_env() {
    assert_eq!(hostile_ifunc(2), 6); // resolved lazily: publishes from the environment
    let lazy = altpatch::cpu::published();
    let explicit = Features::detect_with_env().unwrap();
    assert_eq!(lazy, explicit);
    assert!(!lazy.has(Feature::Movbe));
    altpatch::ifunc::init().unwrap();
}

/// Run under gdb with a breakpoint on `hostile_gdb_calls`, whose page the
/// updates rewrite: every update lands (or errors; here none may).
fn gdb_child() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let tracer = status
        .lines()
        .find(|l| l.starts_with("TracerPid:"))
        .unwrap();
    assert_ne!(
        tracer.split_whitespace().nth(1),
        Some("0"),
        "not under a debugger"
    );
    let page = |f: usize| f & !4095;
    assert_eq!(
        page(hostile_gdb_marker as *const () as usize),
        page(hostile_gdb_calls as *const () as usize + 16),
        "the breakpoint is not in the patched page"
    );
    // In place: no other thread may run the sites; the page swap: a caller
    // thread runs through them (and the breakpoint) meanwhile.
    let in_place = std::env::var("GDB_PUBLISH").as_deref() == Ok("inplace");
    let stop = Arc::new(AtomicBool::new(false));
    let caller = (!in_place).then(|| {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let r = hostile_gdb_calls(1);
                assert!(r == 4 || r == 6, "{r}");
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    });
    let image = Image::current();
    let sites = altpatch::elf::current_sites().unwrap();
    let mut repairs = 0;
    for i in 0..20 {
        let (t, want) = if i % 2 == 0 {
            (add2 as extern "C" fn(u64) -> u64, 6)
        } else {
            (add1 as _, 4)
        };
        if in_place {
            let mut poke = LinuxPoke::new().unwrap();
            // SAFETY: one instruction for one; no other thread runs them.
            unsafe { hcall::update_with(t, &image, sites, &mut poke) }.unwrap();
            repairs += poke.repairs();
        } else {
            hcall::update(t).unwrap();
        }
        assert_eq!(hostile_gdb_calls(1), want, "update {i} did not take effect");
    }
    stop.store(true, Ordering::Relaxed);
    if let Some(c) = caller {
        c.join().unwrap();
    }
    let s = strategy().unwrap();
    if in_place && s != Strategy::ProcMem {
        // gdb's breakpoint writes gave the process private copies of the
        // alias-backed page: the writes were caught not landing, repaired.
        assert!(
            repairs > 0,
            "no write was found not landing under gdb ({s})"
        );
    }
    println!("{repairs} pages repaired");
    println!("20 updates under gdb ({s})");
}

/// Inside a pid namespace with `vm.memfd_noexec=2` (and, with
/// `HARDENED_MOUNTS`, `/dev/shm`, `/tmp`, `/var/tmp` mounted noexec).
fn hardened() {
    let v = std::fs::read_to_string("/proc/sys/vm/memfd_noexec").unwrap();
    assert_eq!(v.trim(), "2");
    let memfd = strategies()
        .into_iter()
        .find(|(s, _)| *s == Strategy::Memfd)
        .unwrap()
        .1;
    let refusal = memfd.expect_err("memfd_noexec=2 refuses executable memfds");
    assert_eq!(refusal.call(), "memfd_create(MFD_EXEC)", "{refusal}");
    assert_eq!(strategy().unwrap(), Strategy::ProcMem);
    updates(4);
    assert_eq!(hcall(1), 2);
    assert_no_writable_view("updates under memfd_noexec=2");
    // Now without /proc/self/mem either, as on a kernel that refuses forced
    // writes.
    refuse_for_tests(Strategy::ProcMem, "pwrite /proc/self/mem", libc::EIO);
    if std::env::var_os("HARDENED_MOUNTS").is_some() {
        let err = strategy().unwrap_err();
        let PokeError::NoStrategy { refusals } = err else {
            panic!("{err}");
        };
        assert!(refusals.iter().all(Option::is_some), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("procmem") && msg.contains("memfd") && msg.contains("file"),
            "{msg}"
        );
        let e = hcall::update(add2).unwrap_err();
        assert!(e.to_string().contains("no way to write text"), "{e}");
        assert_eq!(hcall(1), 2, "a refused update changed the text");
        println!("all refused: {msg}");
    } else {
        // The file alias is left, and it serves anonymous text only: the
        // binary's text would leave its file, so the update is refused,
        // saying why, and nothing is written.
        assert_eq!(strategy().unwrap(), Strategy::File);
        let e = hcall::update(add2).unwrap_err().to_string();
        assert!(e.contains("maps a file") && e.contains("file alias"), "{e}");
        assert_eq!(hcall(1), 2, "a refused update changed the text");
        assert_no_writable_view("a refused file alias");
    }
}

/// A kernel that refuses executable memfd mappings (simulated with the
/// strategy fault hook): the next strategy in order is chosen, and refuses
/// the binary's text (it would leave its file) rather than hide it; with
/// every alias refused too, one error lists each refusal.
fn fallback() {
    refuse_for_tests(Strategy::Memfd, "mmap(PROT_EXEC) of a memfd", libc::EPERM);
    // ALTPATCH_POKE=memfd,file: the memfd is refused, the file alias chosen.
    assert_eq!(strategy().unwrap(), Strategy::File);
    let e = hcall::update(add2).unwrap_err().to_string();
    assert!(e.contains("the file alias would re-home it"), "{e}");
    let e = HKEY.enable().unwrap_err().to_string();
    assert!(e.contains("maps a file"), "{e}");
    assert_eq!(hcall(1), 2, "a refused update changed the text");
    assert!(!HKEY.is_enabled(), "a refused enable changed the key");
    assert_no_writable_view("refused updates");
    refuse_for_tests(Strategy::File, "mmap(PROT_EXEC) of a file", libc::EPERM);
    let e = hcall::update(add1).unwrap_err().to_string();
    assert!(
        e.contains("memfd: mmap(PROT_EXEC) of a memfd") && e.contains("file: mmap"),
        "{e}"
    );
    assert_eq!(hcall(1), 2, "a refused update changed the text");
}

/// The program closes every descriptor it did not open (as a daemon's
/// `closefrom` does) and opens files of its own, which get the numbers
/// altpatch's descriptors had: updates still land, and those files are
/// never written.
fn closefrom() {
    updates(2);
    for fd in 3..1024 {
        // SAFETY: closing descriptors of this child process; the test
        // harness's output goes to 1 and 2.
        unsafe { libc::close(fd) };
    }
    let dir = std::env::temp_dir();
    let files: Vec<_> = (0..4)
        .map(|i| {
            let p = dir.join(format!("altpatch-closefrom-{}-{i}", std::process::id()));
            let mut f = std::fs::File::create(&p).unwrap();
            std::io::Write::write_all(&mut f, b"the program's own data").unwrap();
            (p, f)
        })
        .collect();
    updates(4);
    assert_eq!(hcall(1), 2);
    HKEY.enable().unwrap();
    HKEY.disable().unwrap();
    for (p, f) in files {
        drop(f);
        let data = std::fs::read(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        assert_eq!(data, b"the program's own data", "{p:?} was written");
    }
}

/// The parent side of `gdb_child`, for each strategy, in place and by page
/// swap.
pub fn under_gdb() {
    if std::process::Command::new("gdb")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(!required(), "gdb is required (apt-get install gdb)");
        eprintln!("SKIPPED: gdb not found (apt-get install gdb)");
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let script = dir.join("hostile.gdb");
    std::fs::write(
        &script,
        "set pagination off\nset confirm off\nbreak hostile_gdb_marker\ncommands\nsilent\ncontinue\nend\nrun\n",
    )
    .unwrap();
    let exe = std::env::current_exe().unwrap();
    for poke in usable_strategies() {
        // Not the INT3 protocol: gdb stops on a trap that is not its own
        // breakpoint and, unless told `signal SIGTRAP` each time, discards it
        // (and `handle SIGTRAP pass` passes its breakpoints too). The page
        // swap needs no trap, which is why it is the default.
        for publish in ["swap", "inplace"] {
            let out = std::process::Command::new("gdb")
                .args(["-batch", "-nx", "-x"])
                .arg(&script)
                .arg("--args")
                .arg(&exe)
                .args(CHILD_ARGS)
                .env("HOSTILE", "gdb_child")
                .env("ALTPATCH_POKE", poke)
                .env("GDB_PUBLISH", publish)
                .output()
                .unwrap();
            let o = finish(out);
            assert!(
                o.out.contains("HOSTILE-OK gdb_child") && o.out.contains("exited normally"),
                "under gdb ({poke}, {publish}):\n{}",
                o.out
            );
        }
    }
}

/// The parent side of `hardened`: `unshare` a pid namespace, set
/// `vm.memfd_noexec=2` there (the machine is untouched), run the child.
pub fn in_hardened_namespace() {
    super::common::child::in_hardened_namespace("HOSTILE", "HOSTILE-OK");
}
