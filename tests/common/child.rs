//! Scenarios in child processes of the test binary: running one, reading how
//! it ended, reading its mappings, and running one inside a pid namespace
//! with `vm.memfd_noexec=2` (shared by `tests/hostile.rs` and
//! `tests/trampoline.rs`).

use std::os::unix::process::ExitStatusExt;

/// How a child ended.
pub struct Outcome {
    pub status: std::process::ExitStatus,
    pub signal: Option<i32>,
    pub out: String,
    /// What the child prints before the scenario's name on success.
    pub marker: &'static str,
}

impl Outcome {
    /// Exited 0 having printed `<marker> <scenario>`.
    pub fn ok(&self, scenario: &str) -> bool {
        self.status.success() && self.out.contains(&format!("{} {scenario}", self.marker))
    }
}

/// The test harness arguments that run the `child` test alone.
pub const CHILD_ARGS: [&str; 5] = [
    "child",
    "--exact",
    "--ignored",
    "--nocapture",
    "--test-threads=1",
];

/// Collects a finished child's status and output.
pub fn finish(out: std::process::Output, marker: &'static str) -> Outcome {
    Outcome {
        status: out.status,
        signal: out.status.signal(),
        out: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        marker,
    }
}

/// Whether tools the environment may lack must be present (CI sets it).
pub fn required() -> bool {
    std::env::var_os("ALTPATCH_REQUIRE_HOSTILE").is_some()
}

/// One line of `/proc/self/maps`.
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

/// Every writable view of code in the process: a writable mapping that is
/// executable, a writable shared mapping of a file that is also mapped
/// executable (a memfd or file alias), or anything writable of ours
/// (altpatch names its memfds `altpatch-text`). Private writable mappings
/// of a file (a binary's `.data`) are copies, not views.
pub fn writable_views_of_code() -> Vec<String> {
    let v = vmas();
    let exec: std::collections::HashSet<(String, u64)> = v
        .iter()
        .filter(|m| m.perms.as_bytes()[2] == b'x' && m.inode.1 != 0)
        .map(|m| m.inode.clone())
        .collect();
    v.iter()
        .filter(|m| {
            let p = m.perms.as_bytes();
            p[1] == b'w'
                && (p[2] == b'x'
                    || (p[3] == b's' && exec.contains(&m.inode))
                    || m.path.contains("altpatch-text"))
        })
        .map(|m| format!("{:x}-{:x} {} {}", m.start, m.end, m.perms, m.path))
        .collect()
}

/// Panics if a writable view of code exists.
pub fn assert_no_writable_view(after: &str) {
    let w = writable_views_of_code();
    assert!(
        w.is_empty(),
        "after {after}: writable views of code: {w:#?}"
    );
}

/// Runs the `hardened` scenario (child selected by `var=hardened`, success
/// printed as `<marker> hardened`) in a new pid namespace with
/// `vm.memfd_noexec=2` (the machine is untouched); then again with
/// `/dev/shm`, `/tmp` and `/var/tmp` mounted `noexec` (`HARDENED_MOUNTS=1`
/// in the child). Skips, saying so, where no namespace can be made, unless
/// `ALTPATCH_REQUIRE_HOSTILE` is set.
pub fn in_hardened_namespace(var: &str, marker: &'static str) {
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
            .env(var, "hardened")
            .env_remove("ALTPATCH_POKE")
            .env_remove("ALTPATCH_TRAMPOLINE");
        if mounts {
            cmd.env("HARDENED_MOUNTS", "1");
        }
        let o = match cmd.output() {
            Ok(out) => finish(out, marker),
            Err(e) => {
                assert!(!required(), "unshare (util-linux) is required: {e}");
                eprintln!("SKIPPED: no unshare: {e}");
                return;
            }
        };
        // 97/98: the namespace could not be set up (not root, no
        // CAP_SYS_ADMIN); unshare itself says "unshare failed".
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
