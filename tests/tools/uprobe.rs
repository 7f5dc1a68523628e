//! A uprobe attached the way `perf probe`, bpftrace and eBPF agents attach
//! one: `perf_event_open` on the kernel's uprobe PMU, naming a file and an
//! offset in it. Counting only; no external tool.
#![allow(dead_code)] // shared by tests/tools.rs and tests/hostile.rs, which use parts

/// An attached uprobe; detached when dropped.
pub struct Uprobe {
    /// One counting event per CPU (every thread of every process), or one
    /// for the calling thread.
    fds: Vec<libc::c_int>,
}

/// The uprobe PMU's type number, if the kernel has it.
fn pmu_type() -> Option<u32> {
    std::fs::read_to_string("/sys/bus/event_source/devices/uprobe/type")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The line of `/proc/self/maps` holding `addr`: (start, offset, path).
pub fn mapping(addr: usize) -> (usize, u64, String) {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    for l in maps.lines() {
        let f: Vec<&str> = l.split_ascii_whitespace().collect();
        let (a, b) = f[0].split_once('-').unwrap();
        let a = usize::from_str_radix(a, 16).unwrap();
        let b = usize::from_str_radix(b, 16).unwrap();
        if a <= addr && addr < b {
            let off = u64::from_str_radix(f[2], 16).unwrap();
            return (a, off, f.get(5..).map(|p| p.join(" ")).unwrap_or_default());
        }
    }
    panic!("{addr:#x} is not mapped");
}

/// The file a text address maps and its offset in that file.
pub fn file_and_offset(addr: usize) -> (String, u64) {
    let (start, off, path) = mapping(addr);
    (path, off + (addr - start) as u64)
}

/// Why uprobes cannot be used here, if they cannot (no PMU, not root).
pub fn unavailable() -> Option<String> {
    let Some(_) = pmu_type() else {
        return Some("the kernel has no uprobe PMU (/sys/bus/event_source/devices/uprobe)".into());
    };
    let here = unavailable as fn() -> Option<String> as usize;
    match Uprobe::attach(here) {
        Ok(_) => None,
        Err(e) => Some(format!("perf_event_open(uprobe) refused: {e}")),
    }
}

impl Uprobe {
    /// Attaches a counting uprobe at `addr` (an instruction start in a
    /// file-backed text mapping), counting the calling thread's hits.
    pub fn attach(addr: usize) -> std::io::Result<Uprobe> {
        Ok(Uprobe {
            fds: vec![open_event_at(&file_and_offset(addr), 0, -1)?],
        })
    }

    /// A uprobe at `at` (a file and an offset, see [`file_and_offset`])
    /// counting the hits of the threads `tids` of this process: one event
    /// per thread. (An event for every process, `pid` -1, would also plant
    /// its breakpoint in every other process running this binary, such as
    /// a concurrent test's child.)
    pub fn attach_threads(at: &(String, u64), tids: &[libc::pid_t]) -> std::io::Result<Uprobe> {
        let mut p = Uprobe { fds: Vec::new() };
        for &tid in tids {
            p.fds.push(open_event_at(at, tid, -1)?);
        }
        Ok(p)
    }

    /// How many times the probe fired.
    pub fn count(&self) -> u64 {
        let mut total = 0;
        for &fd in &self.fds {
            let mut n = 0u64;
            // SAFETY: reads 8 bytes into `n` from our descriptor.
            let r = unsafe { libc::read(fd, (&raw mut n).cast(), 8) };
            assert_eq!(r, 8, "reading the uprobe's count");
            total += n;
        }
        total
    }
}

impl Drop for Uprobe {
    fn drop(&mut self) {
        for &fd in &self.fds {
            // SAFETY: closing our descriptor detaches the probe.
            unsafe { libc::close(fd) };
        }
    }
}

/// A counting uprobe event at `at` (file, offset) for thread `pid` (0: the
/// calling thread) on any CPU.
fn open_event_at(at: &(String, u64), pid: libc::pid_t, cpu: i32) -> std::io::Result<libc::c_int> {
    let ty = pmu_type().ok_or_else(|| std::io::Error::other("no uprobe PMU"))?;
    let (path, offset) = (at.0.as_str(), at.1);
    let path = std::ffi::CString::new(path).unwrap();
    // perf_event_attr (PERF_ATTR_SIZE_VER7, 128 bytes), zeroed but for:
    // type, size, config1 = uprobe_path, config2 = probe_offset. Flags
    // zero: enabled, counting user and kernel.
    let mut attr = [0u64; 16];
    attr[0] = u64::from(ty) | (128u64 << 32);
    attr[7] = path.as_ptr() as u64;
    attr[8] = offset;
    const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
    // SAFETY: perf_event_open reads `attr` (128 bytes) and the path; both
    // outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            attr.as_ptr(),
            pid,
            cpu,
            -1,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd as libc::c_int)
}

/// The byte at `addr` in the file that maps it (what the kernel restores
/// when it removes a breakpoint).
pub fn file_byte(addr: usize) -> u8 {
    use std::os::unix::fs::FileExt;
    let (path, offset) = file_and_offset(addr);
    let mut b = [0u8];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, offset)
        .unwrap();
    b[0]
}

/// The byte at `addr` in this process now.
pub fn byte(addr: usize) -> u8 {
    // SAFETY: a text address of this process, mapped readable.
    unsafe { std::ptr::read_volatile(addr as *const u8) }
}
