//! Shared fixtures for the integration tests: blocks of real text in the
//! test binary, made of NOP5 sites, that tests patch and then execute.
#![allow(dead_code)]

pub mod child;

use altpatch::Image;

/// Bytes per unit of a pad: a NOP5 site followed by a 3-byte NOP.
pub const UNIT: usize = 8;
/// Units per pad: 16 KiB of sites, four pages.
pub const UNITS: usize = 2048;
/// The 5-byte NOP at every site.
pub const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
/// `jmp` to the next instruction: same behaviour as the NOP, other bytes.
pub const JMP0: [u8; 5] = [0xe9, 0x00, 0x00, 0x00, 0x00];

/// Declares a page-aligned text block `$sym` of `UNITS` units followed by
/// `mov eax, 42; ret`, callable as `extern "C" fn() -> u32`.
macro_rules! pad {
    ($sym:literal) => {
        core::arch::global_asm!(concat!(
            ".pushsection .text.",
            $sym,
            ",\"ax\",@progbits\n",
            ".balign 4096\n",
            ".globl ",
            $sym,
            "\n",
            ".type ",
            $sym,
            ",@function\n",
            $sym,
            ":\n",
            ".rept 2048\n",
            ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00, 0x0f, 0x1f, 0x00\n",
            ".endr\n",
            "mov eax, 42\n",
            "ret\n",
            ".size ",
            $sym,
            ", . - ",
            $sym,
            "\n",
            ".popsection\n"
        ));
    };
}

pad!("altpatch_pad_a");
pad!("altpatch_pad_b");
pad!("altpatch_pad_c");
pad!("altpatch_pad_d");
pad!("altpatch_pad_e");
pad!("altpatch_pad_f");

unsafe extern "C" {
    fn altpatch_pad_a() -> u32;
    fn altpatch_pad_b() -> u32;
    fn altpatch_pad_c() -> u32;
    fn altpatch_pad_d() -> u32;
    fn altpatch_pad_e() -> u32;
    fn altpatch_pad_f() -> u32;
}

/// A pad: its entry point and size.
#[derive(Clone, Copy)]
pub struct Pad {
    pub entry: unsafe extern "C" fn() -> u32,
}

impl Pad {
    pub fn base(&self) -> usize {
        self.entry as *const () as usize
    }
    /// Address of site `i`.
    pub fn site(&self, i: usize) -> usize {
        assert!(i < UNITS);
        self.base() + i * UNIT
    }
    /// The pad's site bytes as they are now.
    pub fn snapshot(&self) -> Vec<u8> {
        // SAFETY: the pad is UNITS * UNIT bytes of mapped, readable text.
        unsafe { std::slice::from_raw_parts(self.base() as *const u8, UNITS * UNIT) }.to_vec()
    }
    /// Runs the pad (every site executes) and returns its result, 42.
    pub fn call(&self) -> u32 {
        // SAFETY: the pad is a valid function with the C ABI returning eax.
        unsafe { (std::hint::black_box(self.entry))() }
    }
}

/// Pads reserved for individual tests, so tests in one binary running in
/// parallel never patch the same page.
pub const PAD_A: Pad = Pad {
    entry: altpatch_pad_a,
};
pub const PAD_B: Pad = Pad {
    entry: altpatch_pad_b,
};
pub const PAD_C: Pad = Pad {
    entry: altpatch_pad_c,
};
pub const PAD_D: Pad = Pad {
    entry: altpatch_pad_d,
};
pub const PAD_E: Pad = Pad {
    entry: altpatch_pad_e,
};
pub const PAD_F: Pad = Pad {
    entry: altpatch_pad_f,
};

/// Runs `program` with `steps` as its arguments and `env` set; its
/// standard output. A failure (any exit but 0) fails the test, with what
/// the program printed on standard error.
pub fn run_program(program: &std::path::Path, steps: &[&str], env: &[(&str, &str)]) -> String {
    let out = std::process::Command::new(program)
        .args(steps)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} {steps:?} failed: {}\n{}\n{}",
        program.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The test binary's image; its text covers every pad.
pub fn image() -> Image<'static> {
    let image = Image::current();
    assert!(image.contains_text(PAD_A.base(), UNITS * UNIT), "{image:?}");
    image
}

/// Reads `len` bytes of text at `addr`.
pub fn read(addr: usize, len: usize) -> Vec<u8> {
    // SAFETY: callers pass addresses inside this binary's text.
    unsafe { std::slice::from_raw_parts(addr as *const u8, len) }.to_vec()
}

/// The text-writing strategies this machine lets a process use on the
/// test binary's own text: those that keep a file's text the file's
/// (`keeps_file_text`; the alias strategies serve anonymous text and are
/// tested on it, see `alias_strategies`). Those refused here are skipped
/// with a note on stderr.
pub fn usable_strategies() -> Vec<altpatch::Strategy> {
    altpatch::Strategy::ALL
        .into_iter()
        .filter(|&s| s.keeps_file_text())
        .filter(|&s| {
            let ok = altpatch::LinuxPoke::with_strategy(altpatch::Publish::InPlace, s).is_ok();
            if !ok {
                eprintln!("SKIPPED for {}: refused on this machine", s.name());
            }
            ok
        })
        .collect()
}

/// The alias strategies (memfd, file) this machine lets a process use:
/// for anonymous text only.
pub fn alias_strategies() -> Vec<altpatch::Strategy> {
    altpatch::Strategy::ALL
        .into_iter()
        .filter(|&s| !s.keeps_file_text())
        .filter(|&s| {
            let ok = altpatch::LinuxPoke::with_strategy(altpatch::Publish::InPlace, s).is_ok();
            if !ok {
                eprintln!("SKIPPED for {}: refused on this machine", s.name());
            }
            ok
        })
        .collect()
}

/// Runs the `#[ignore]`d test `name` of this test binary in a child process
/// with `env` set, returning (success, combined output).
pub fn run_child_test(name: &str, env: &[(&str, &str)]) -> (bool, String) {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = std::process::Command::new(exe);
    cmd.args([
        name,
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Builds a fixture crate under `tests/fixtures/<name>` (its own
/// `.cargo/config.toml` applies) into `target/fixtures`, once per process,
/// and returns the target directory's release output folder.
pub fn build_fixture(name: &str, triple_dir: bool) -> std::path::PathBuf {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static BUILT: Mutex<Option<HashMap<String, std::path::PathBuf>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let map = built.get_or_insert_with(HashMap::new);
    if let Some(p) = map.get(name) {
        return p.clone();
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = root.join("target/fixtures");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["build", "--release", "--quiet"])
        .current_dir(root.join("tests/fixtures").join(name))
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "building tests/fixtures/{name} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = if triple_dir {
        target.join("x86_64-unknown-linux-gnu/release")
    } else {
        target.join("release")
    };
    map.insert(name.to_string(), dir.clone());
    dir
}

/// Compiles and links a small C program with GCC; `args` go before the
/// source. Returns the output path in a per-test temporary directory.
pub fn gcc(out_name: &str, source: &str, args: &[&str]) -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("gcc");
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join(format!("{out_name}.c"));
    std::fs::write(&src, source).unwrap();
    let out = dir.join(out_name);
    let r = std::process::Command::new("gcc")
        .args(args)
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .output()
        .expect("run gcc");
    assert!(
        r.status.success(),
        "gcc {out_name} failed:\n{}",
        String::from_utf8_lossy(&r.stderr)
    );
    out
}

/// A freestanding static image of `source` (C, usually top-level asm
/// only), linked with `--emit-relocs`: for site and table tests.
pub fn asm_image(out_name: &str, source: &str) -> std::path::PathBuf {
    gcc(
        out_name,
        source,
        &["-nostdlib", "-static", "-no-pie", "-Wl,--emit-relocs"],
    )
}

/// Symbol name -> (address, size) of a linked image.
pub fn symbols(path: &std::path::Path) -> std::collections::HashMap<String, (u64, u64)> {
    use object::{Object, ObjectSymbol};
    let data = std::fs::read(path).unwrap();
    let file = object::File::parse(&*data).unwrap();
    file.symbols()
        .filter_map(|s| Some((s.name().ok()?.to_string(), (s.address(), s.size()))))
        .collect()
}

/// The (address, size) of the one function symbol whose (mangled) name
/// contains `part`.
pub fn func(syms: &std::collections::HashMap<String, (u64, u64)>, part: &str) -> (usize, usize) {
    let hits: Vec<_> = syms
        .iter()
        .filter(|(n, (_, s))| n.contains(part) && *s > 0)
        .collect();
    assert_eq!(hits.len(), 1, "symbols containing {part}: {hits:?}");
    (hits[0].1.0 as usize, hits[0].1.1 as usize)
}

/// The sites in `sites` inside `start..start + size`.
pub fn within(
    sites: &[altpatch::sites::Site],
    (start, size): (usize, usize),
) -> Vec<altpatch::sites::Site> {
    sites
        .iter()
        .filter(|s| s.addr >= start && s.addr < start + size)
        .copied()
        .collect()
}

/// A C program whose calls go through a thunk under a project's alias
/// name, `__x86_retpoline_rax` (`jmp *%rax`, a function symbol in its own
/// section), built with `--emit-relocs`. Exits 0 when the call works.
pub fn aliased_thunk_program() -> std::path::PathBuf {
    const SOURCE: &str = r#"
__asm__(".pushsection .text.thunks,\"ax\",@progbits\n"
        ".globl __x86_retpoline_rax\n"
        ".type __x86_retpoline_rax,@function\n"
        "__x86_retpoline_rax: jmp *%rax\n"
        ".size __x86_retpoline_rax, . - __x86_retpoline_rax\n"
        ".popsection\n");
static long twice(long x) { return 2 * x; }
long via_alias(long x) {
    long r;
    __asm__ volatile("call __x86_retpoline_rax" : "=a"(r) : "a"(twice), "D"(x)
                     : "rcx", "rdx", "rsi", "r8", "r9", "r10", "r11", "memory");
    return r;
}
int main(void) { return via_alias(21) == 42 ? 0 : 1; }
"#;
    gcc("aliased", SOURCE, &["-O1", "-Wl,--emit-relocs"])
}

/// tests/fixtures/retpoline_lib.c as a shared object built by GCC against
/// the executable's thunks (thunk-extern calls and returns, reached
/// through its PLT), with `--emit-relocs`.
pub fn retpoline_c_library() -> std::path::PathBuf {
    gcc(
        "retpoline_lib.so",
        include_str!("../fixtures/retpoline_lib.c"),
        &[
            "-O2",
            "-fPIC",
            "-shared",
            "-mindirect-branch=thunk-extern",
            "-mfunction-return=thunk-extern",
            "-Wl,--emit-relocs",
        ],
    )
}

/// Bytes from a hex string as fixtures print them (`e8000000`).
pub fn unhex(h: &str) -> Vec<u8> {
    (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
        .collect()
}

/// An address as fixtures print it (`0x5555...`).
pub fn addr(h: &str) -> usize {
    usize::from_str_radix(h.trim_start_matches("0x"), 16).unwrap()
}

/// The `.text` of a linked program copied into private read+write memory
/// (never executed), with the program's sites moved to it and an image
/// over it: what tests patch per mode and compare byte for byte.
pub struct TextCopy {
    /// The copy.
    pub copy: memmap2::MmapMut,
    /// The file's `.text` bytes.
    pub original: Vec<u8>,
    /// The program's sites, at the copy's addresses.
    pub sites: Vec<altpatch::sites::Site>,
}

impl TextCopy {
    /// Copies `exe`'s `.text` and reads its sites.
    pub fn of(exe: &std::path::Path) -> TextCopy {
        use object::{Object, ObjectSection};
        let data = std::fs::read(exe).unwrap();
        let file = object::File::parse(&*data).unwrap();
        let text = file.section_by_name(".text").unwrap();
        let bytes = text.data().unwrap();
        let mut copy = memmap2::MmapMut::map_anon(bytes.len()).unwrap();
        copy.copy_from_slice(bytes);
        let bias = (copy.as_ptr() as usize).wrapping_sub(text.address() as usize);
        let sites = altpatch::elf::read_sites(&data)
            .unwrap()
            .sites
            .iter()
            .map(|s| s.biased(bias))
            .collect();
        TextCopy {
            copy,
            original: bytes.to_vec(),
            sites,
        }
    }

    /// The image over the copy.
    pub fn image(&self) -> Image<'static> {
        let range = self.copy.as_ptr() as usize..self.copy.as_ptr() as usize + self.copy.len();
        // SAFETY: the copy is mapped read+write while `self` lives, which
        // callers keep for as long as they use the image; nothing runs it.
        unsafe { Image::builder("text copy").text(range) }.build()
    }

    /// `n` bytes of the copy at run-time address `a`.
    pub fn at(&self, a: usize, n: usize) -> Vec<u8> {
        self.copy[a - self.copy.as_ptr() as usize..][..n].to_vec()
    }

    /// Applies `mode` to every site of the copy (in place, nothing runs it).
    pub fn apply(&self, mode: altpatch::retpoline::Mode) -> altpatch::retpoline::Report<'_> {
        use altpatch::retpoline::{self, Policy};
        // SAFETY: writable private memory, never executed.
        let mut poke = unsafe { altpatch::DirectPoke::new(altpatch::SyncMethod::Cpuid) };
        // SAFETY: as above.
        unsafe {
            retpoline::apply(
                &self.image(),
                &Policy::new(mode, "test"),
                &self.sites,
                &mut poke,
            )
        }
        .unwrap()
    }
}
