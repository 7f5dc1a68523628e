//! Hardened processes: text sealed with `mseal(2)`, and a policy refusing
//! anonymous executable memory (SELinux `execmem`, stood in for by a
//! seccomp filter). Either an update lands, or it is refused with nothing
//! written; never a broken process.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use altpatch::cpu::{Feature, Features};

use super::scenarios::{expected, patched_pages, tools_probed, tools_sites, update};
use super::uprobe::{Uprobe, byte, file_byte, mapping};

const SYS_MSEAL: libc::c_long = 462;

altpatch::ifunc! {
    fn tools_ifunc(x: u64) -> u64 = pick;
}
extern "C" fn times7(x: u64) -> u64 {
    x * 7
}
fn pick(_: &Features) -> extern "C" fn(u64) -> u64 {
    times7
}

#[inline(never)]
fn alt_value() -> u32 {
    let r: u32;
    // SAFETY: each sequence only moves an immediate into `r`.
    unsafe {
        altpatch::alternative!(
            name: "tools_alt",
            "mov {r:e}, 1",
            [Sse3 => "mov {r:e}, 2"],
            r = out(reg) r,
            options(nomem, nostack, preserves_flags)
        )
    };
    r
}

/// A thread that blocks every signal until dropped.
struct Blocker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Blocker {
    fn start() -> Blocker {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            // SAFETY: blocks every signal for this thread only.
            unsafe {
                let mut all: libc::sigset_t = std::mem::zeroed();
                libc::sigfillset(&mut all);
                libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
            }
            tx.send(()).unwrap();
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        });
        rx.recv().unwrap();
        Blocker {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Blocker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
    }
}

/// Text sealed with `mseal`: the page swap cannot remap it, so an update is
/// published in place by the INT3 protocol (a probe attached meanwhile keeps
/// counting), or, when a thread could not take its trap, refused with an
/// error naming the seal and nothing written.
pub fn sealed() {
    let pages = patched_pages();
    let probed = tools_probed as *const () as usize;
    for &p in &pages {
        // SAFETY: seals a page of our own text; nothing here unmaps or
        // re-protects it afterwards.
        let r = unsafe { libc::syscall(SYS_MSEAL, p, 4096usize, 0usize) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            assert_eq!(e.raw_os_error(), Some(libc::ENOSYS), "mseal: {e}");
            println!("SKIPPED: this kernel has no mseal (Linux >= 6.10)");
            return;
        }
    }
    // Really sealed: the text cannot be re-protected.
    // SAFETY: a page of our text; the call is refused.
    let r = unsafe { libc::mprotect(pages[0] as *mut libc::c_void, 4096, libc::PROT_READ) };
    assert!(r != 0, "mprotect of sealed text succeeded");
    let before: Vec<_> = pages.iter().map(|&p| mapping(p)).collect();
    let original = file_byte(probed);
    let p = Uprobe::attach(probed).unwrap();
    update(true).unwrap();
    assert_eq!(
        tools_sites(1),
        expected(true),
        "the sealed update did not land"
    );
    for i in 0..super::scenarios::N {
        assert_eq!(tools_probed(i), i * 3);
    }
    assert_eq!(p.count(), super::scenarios::N);
    drop(p);
    assert_eq!(byte(probed), original);
    let after: Vec<_> = pages.iter().map(|&p| mapping(p)).collect();
    assert_eq!(before, after, "sealed text was remapped");
    println!("sealed: updated in place by the INT3 protocol");
    // A thread that blocks SIGTRAP would die of the protocol's trap: the
    // update is refused, naming the seal, and nothing is written.
    let blocker = Blocker::start();
    let e = update(false).unwrap_err();
    assert!(e.contains("sealed") && e.contains("SIGTRAP"), "{e}");
    assert_eq!(tools_sites(1), expected(true), "a refused update wrote");
    drop(blocker);
    update(false).unwrap();
    assert_eq!(tools_sites(1), expected(false));
    println!("refused while a thread blocks SIGTRAP: {e}");
}

/// Installs a seccomp filter refusing, with `EACCES` as SELinux would,
/// anonymous executable mappings and every `mprotect` adding execute.
fn refuse_anonymous_exec() {
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const RET_ALLOW: u32 = 0x7fff_0000;
    const RET_ERRNO: u32 = 0x0005_0000;
    let ld = |k: u32| libc::sock_filter {
        code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let jset = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let ret = |k: u32| libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k,
    };
    // seccomp_data: nr @0, arch @4, args[i] @16 + 8i (low half first).
    let prog = [
        ld(4),
        jeq(AUDIT_ARCH_X86_64, 1, 0),
        ret(RET_ALLOW),
        ld(0),
        jeq(libc::SYS_mmap as u32, 3, 0),
        jeq(libc::SYS_mprotect as u32, 7, 0),
        jeq(libc::SYS_pkey_mprotect as u32, 6, 0),
        ret(RET_ALLOW),
        // mmap: PROT_EXEC and MAP_ANONYMOUS refused.
        ld(16 + 2 * 8),
        jset(libc::PROT_EXEC as u32, 0, 3),
        ld(16 + 3 * 8),
        jset(libc::MAP_ANONYMOUS as u32, 3, 0),
        ret(RET_ALLOW),
        // mprotect, pkey_mprotect: PROT_EXEC refused.
        ld(16 + 2 * 8),
        jset(libc::PROT_EXEC as u32, 0, 1),
        ret(RET_ERRNO | libc::EACCES as u32),
        ret(RET_ALLOW),
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut _,
    };
    // SAFETY: no_new_privs and a filter program that outlives the call.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &fprog as *const libc::sock_fprog
            ),
            0,
            "seccomp: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Under a policy refusing anonymous executable memory, every API works.
pub fn no_anon_exec() {
    refuse_anonymous_exec();
    // The policy is really on.
    // SAFETY: a fresh anonymous mapping, refused.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_eq!(p, libc::MAP_FAILED, "anonymous exec memory was allowed");
    // Static keys and calls, by page swap and by the INT3 protocol.
    update(true).unwrap();
    assert_eq!(tools_sites(1), expected(true));
    altpatch::os::linux::set_live_publication(altpatch::Publish::Live).unwrap();
    update(false).unwrap();
    assert_eq!(tools_sites(1), expected(false));
    altpatch::os::linux::set_live_publication(altpatch::Publish::Remap).unwrap();
    // Alternatives, ifuncs, retpolines, closure trampolines.
    let image = altpatch::Image::current();
    let mut poke = altpatch::LinuxPoke::new().unwrap();
    let features = Features::none().with(Feature::Sse3);
    // SAFETY: no other thread runs the alternative.
    unsafe { altpatch::alternative::apply(&image, &features, &mut poke) }.unwrap();
    assert_eq!(alt_value(), 2);
    altpatch::ifunc::init().unwrap();
    assert_eq!(tools_ifunc(3), 21);
    let policy = altpatch::retpoline::Policy::choose(&Features::detect(), &Default::default());
    altpatch::retpoline::apply_current(&policy).unwrap();
    let add =
        altpatch::trampoline::Closure::<unsafe extern "C" fn(u32) -> u32>::new(|x| x + 40).unwrap();
    // SAFETY: the closure is alive and runs on this thread.
    assert_eq!(unsafe { add.code()(2) }, 42);
    println!("every API works without anonymous exec memory");
}
