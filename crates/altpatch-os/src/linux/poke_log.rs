//! The text-poke log: one JSON line per committed batch, for trace
//! decoders and profilers that must know what the code bytes were at a
//! given time (the kernel tells them only about its own text, with
//! `PERF_RECORD_TEXT_POKE`).
//!
//! Opt-in: [`set_poke_log`](super::set_poke_log), or `ALTPATCH_POKE_LOG=<path>` in the
//! environment (read when the first batch begins). Lines are appended with
//! one `write(2)` each (`O_APPEND`), so a forked child logging to the same
//! file never splits a parent's line.
//!
//! ```text
//! {"v":1,"pid":4242,"seq":3,"monotonic_ns":"81234567890","realtime_ns":"1796012345678901234",
//!  "method":"pwrite to /proc/self/mem, page swap",
//!  "edits":[{"addr":"0x55d0c1a0312c","file":"/usr/bin/app","offset":"0x312c",
//!            "old":"0f1f440000","new":"e9cf000000"}]}
//! ```
//!
//! (one line in the file). Addresses, offsets and times are strings:
//! JSON readers hold numbers as doubles, which cannot carry them. `file`
//! and `offset` are absent for anonymous text.
//!
//! # Replaying it
//!
//! The bytes at a text address at time *t* are the file's bytes at
//! `offset` (the binary as the process mapped it) with every logged edit
//! covering the address whose time is at most *t* applied in `seq` order,
//! per `pid`. `monotonic_ns` is `CLOCK_MONOTONIC`, the clock
//! `perf record -k CLOCK_MONOTONIC` stamps samples with; the time is taken
//! after the batch landed and before the patching call returns, so a
//! sample stamped later ran the new bytes. Start the log before the first
//! patch (the environment variable does): a log begun later lacks the
//! earlier edits. Bytes the kernel's uprobes place are not logged (they
//! are not in the text a decoder should decode).

use alloc::string::String;

use super::sys::errno;

/// The log's state, in the process-wide patching state.
pub(super) struct PokeLog {
    /// The open log, or -1.
    fd: libc::c_int,
    /// Whether `ALTPATCH_POKE_LOG` was read.
    env_read: bool,
    /// Batches logged by this process.
    seq: u64,
}

impl PokeLog {
    pub(super) const fn new() -> PokeLog {
        PokeLog {
            fd: -1,
            env_read: false,
            seq: 0,
        }
    }

    /// Whether batches are logged (opening the file named by
    /// `ALTPATCH_POKE_LOG` the first time).
    pub(super) fn enabled(&mut self) -> bool {
        if !self.env_read {
            self.env_read = true;
            if let Some(path) = std::env::var_os("ALTPATCH_POKE_LOG")
                && self.fd < 0
            {
                // An unusable path leaves logging off: the variable must
                // not break patching (its value is reported by no API).
                self.fd = open(std::path::Path::new(&path)).unwrap_or(-1);
            }
        }
        self.fd >= 0
    }

    /// Starts a batch's line.
    pub(super) fn begin_line(&mut self, method: &str) -> String {
        self.seq += 1;
        let mut s = String::with_capacity(256);
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { libc::getpid() };
        s.push_str("{\"v\":1,\"pid\":");
        push_number(&mut s, pid as u64, 10, 1);
        s.push_str(",\"seq\":");
        push_number(&mut s, self.seq, 10, 1);
        s.push_str(",\"monotonic_ns\":\"");
        push_number(&mut s, now(libc::CLOCK_MONOTONIC), 10, 1);
        s.push_str("\",\"realtime_ns\":\"");
        push_number(&mut s, now(libc::CLOCK_REALTIME), 10, 1);
        s.push_str("\",\"method\":\"");
        json_escape(&mut s, method);
        s.push_str("\",\"edits\":[");
        s
    }

    /// Finishes `line` and appends it to the log (a failed write is
    /// dropped: the log must never fail a batch that landed).
    pub(super) fn finish_line(&mut self, mut line: String) {
        line.push_str("]}\n");
        let mut done = 0;
        while done < line.len() {
            // SAFETY: writes our buffer to our descriptor.
            let n =
                unsafe { libc::write(self.fd, line[done..].as_ptr().cast(), line.len() - done) };
            if n < 0 && errno() == libc::EINTR {
                continue;
            }
            if n <= 0 {
                return;
            }
            done += n as usize;
        }
    }
}

/// Appends one edit to a batch's line.
pub(super) fn push_edit(
    line: &mut String,
    first: bool,
    addr: usize,
    file: Option<(&str, u64)>,
    old: &[u8],
    new: &[u8],
) {
    if !first {
        line.push(',');
    }
    line.push_str("{\"addr\":\"0x");
    push_number(line, addr as u64, 16, 1);
    line.push('"');
    if let Some((path, offset)) = file {
        line.push_str(",\"file\":\"");
        json_escape(line, path);
        line.push_str("\",\"offset\":\"0x");
        push_number(line, offset, 16, 1);
        line.push('"');
    }
    line.push_str(",\"old\":\"");
    hex(line, old);
    line.push_str("\",\"new\":\"");
    hex(line, new);
    line.push_str("\"}");
}

fn hex(out: &mut String, b: &[u8]) {
    for &x in b {
        push_number(out, u64::from(x), 16, 2);
    }
}

/// Appends `v` in `base` (10 or 16, lower case), at least `width` digits.
/// By hand: `write!` into a `String` brings its `fmt::Write` glue into
/// every program that patches at load.
#[inline(never)]
fn push_number(out: &mut String, mut v: u64, base: u64, width: usize) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [b'0'; 20];
    let mut i = buf.len();
    while v != 0 || buf.len() - i < width {
        i -= 1;
        buf[i] = DIGITS[(v % base) as usize];
        v /= base;
    }
    // SAFETY: ASCII digits only.
    out.push_str(unsafe { core::str::from_utf8_unchecked(&buf[i..]) });
}

#[inline(never)]
fn json_escape(out: &mut String, s: &str) {
    let mut from = 0;
    for (i, b) in s.bytes().enumerate() {
        if b != b'"' && b != b'\\' && b >= 0x20 {
            continue;
        }
        // `i` holds an ASCII byte: a character boundary.
        out.push_str(&s[from..i]);
        out.push('\\');
        if b < 0x20 {
            out.push('u');
            push_number(out, u64::from(b), 16, 4);
        } else {
            out.push(char::from(b));
        }
        from = i + 1;
    }
    out.push_str(&s[from..]);
}

fn now(clock: libc::clockid_t) -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes `t`.
    unsafe { libc::clock_gettime(clock, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

fn open(path: &std::path::Path) -> std::io::Result<libc::c_int> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open with a NUL-terminated path.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_CLOEXEC,
            0o600,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

impl PokeLog {
    /// Replaces the log with `path` (appended, created if missing), or with
    /// `None` none; the environment is not read any more.
    pub(super) fn set(&mut self, path: Option<&std::path::Path>) -> std::io::Result<()> {
        let fd = path.map(open).transpose()?.unwrap_or(-1);
        self.env_read = true;
        if self.fd >= 0 {
            // SAFETY: closing the log we opened.
            unsafe { libc::close(self.fd) };
        }
        self.fd = fd;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{hex, json_escape, push_number};
    use alloc::string::String;

    #[test]
    fn numbers_and_escapes_read_as_format_writes_them() {
        for v in [
            0u64,
            1,
            9,
            10,
            15,
            16,
            255,
            4096,
            0xffff_ffff_8100_024c,
            u64::MAX,
        ] {
            let mut s = String::new();
            push_number(&mut s, v, 10, 1);
            assert_eq!(s, alloc::format!("{v}"));
            s.clear();
            push_number(&mut s, v, 16, 1);
            assert_eq!(s, alloc::format!("{v:x}"));
            s.clear();
            push_number(&mut s, v, 16, 4);
            assert_eq!(s, alloc::format!("{v:04x}"));
        }
        let mut s = String::new();
        hex(&mut s, &[0xe9, 0x00, 0x0a, 0xff]);
        assert_eq!(s, "e9000aff");
        s.clear();
        json_escape(&mut s, "a\"b\\c\u{1}é");
        assert_eq!(s, "a\\\"b\\\\c\\u0001é");
    }
}
