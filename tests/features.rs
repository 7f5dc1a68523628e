//! The feature snapshot from recorded CPUID dumps of real and emulated CPUs,
//! overrides, and the dump format.

use Feature::*;
use altpatch::cpu::{
    CpuidSource, Feature, Features, OverrideError, Overrides, RecordedCpuid, Vendor, dump,
};

fn fixture(name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/cpuid/{name}.txt",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn features_of(text: &str) -> Features {
    Features::from_source(&RecordedCpuid::parse(text).unwrap())
}

fn check(f: &Features, has: &[Feature], lacks: &[Feature]) {
    for &x in has {
        assert!(f.has(x), "{f} should have {x}");
    }
    for &x in lacks {
        assert!(!f.has(x), "{f} should lack {x}");
    }
}

#[test]
fn nehalem() {
    let f = features_of(&fixture("qemu-tcg-nehalem"));
    assert_eq!(
        (f.vendor(), f.family(), f.model()),
        (Vendor::Intel, 6, 0x1a)
    );
    check(
        &f,
        &[
            Sse3,
            Ssse3,
            Sse4_1,
            Sse4_2,
            Popcnt,
            Hypervisor,
            LfenceSerializing,
            RetpolineNeeded,
        ],
        &[
            Movbe, Xsave, Avx, Avx2, Bmi1, Bmi2, Erms, Fsrm, Avx512f, Lzcnt, Clflushopt, Serialize,
        ],
    );
}

#[test]
fn skylake_client() {
    let f = features_of(&fixture("qemu-tcg-skylake-client"));
    assert_eq!(
        (f.vendor(), f.family(), f.model()),
        (Vendor::Intel, 6, 0x5e)
    );
    check(
        &f,
        &[
            Sse4_2,
            Popcnt,
            Movbe,
            Xsave,
            Avx,
            Avx2,
            Fma,
            F16c,
            Bmi1,
            Bmi2,
            Erms,
            Adx,
            Lzcnt,
            Rdtscp,
            LfenceSerializing,
            RetpolineNeeded,
        ],
        &[Avx512f, Clwb, Sha, Fsrm, Serialize, Eibrs],
    );
}

#[test]
fn epyc() {
    let f = features_of(&fixture("qemu-tcg-epyc"));
    assert_eq!((f.vendor(), f.family(), f.model()), (Vendor::Amd, 0x17, 1));
    check(
        &f,
        &[
            Movbe,
            Avx,
            Avx2,
            Bmi1,
            Bmi2,
            Adx,
            Clflushopt,
            Lzcnt,
            RetpolineNeeded,
        ],
        // EPYC (Zen 1) has no ERMS; TCG drops sha/rdseed; nothing in CPUID
        // says lfence serializes (a bare kernel has not set DE_CFG).
        &[
            Erms,
            Fsrm,
            Avx512f,
            Sha,
            Rdseed,
            LfenceSerializing,
            AutoIbrs,
        ],
    );
}

#[test]
fn qemu_max() {
    let f = features_of(&fixture("qemu-tcg-max"));
    assert_eq!(f.vendor(), Vendor::Amd);
    check(&f, &[Movbe, Avx2, Erms, Clwb, Clflushopt], &[Avx512f, Fsrm]);
}

#[test]
fn zen5_under_kvm() {
    let f = features_of(&fixture("kvm-amd-epyc-zen5"));
    assert_eq!((f.vendor(), f.family()), (Vendor::Amd, 0x1a));
    check(
        &f,
        &[
            Avx512f, Avx512bw, Avx512vl, Avx512dq, Fsrm, Erms, Rdpid, Sha, Movbe, Hypervisor,
        ],
        &[],
    );
}

#[test]
fn the_four_cpus_differ_where_patching_cares() {
    let names = [
        "qemu-tcg-nehalem",
        "qemu-tcg-skylake-client",
        "qemu-tcg-epyc",
        "kvm-amd-epyc-zen5",
    ];
    let all: Vec<Features> = names.iter().map(|n| features_of(&fixture(n))).collect();
    for i in 0..all.len() {
        for j in i + 1..all.len() {
            assert_ne!(all[i], all[j], "{} vs {}", names[i], names[j]);
        }
    }
}

#[test]
fn avx_needs_the_os_to_enable_ymm_state() {
    let text = fixture("qemu-tcg-skylake-client");
    // The OS enabled only x87 and SSE state.
    let sse_only = text.replace("xcr0 0000000000000007", "xcr0 0000000000000003");
    assert_ne!(sse_only, text);
    let f = features_of(&sse_only);
    check(&f, &[Xsave, Movbe, Bmi2], &[Avx, Avx2, Fma, F16c]);
    // No XCR0 at all (xgetbv unavailable).
    let none: String = text
        .lines()
        .filter(|l| !l.starts_with("xcr0"))
        .collect::<Vec<_>>()
        .join("\n");
    check(&features_of(&none), &[], &[Avx, Avx2]);
}

#[test]
fn avx512_needs_opmask_and_zmm_state() {
    let text = fixture("kvm-amd-epyc-zen5");
    let xcr0 = text.lines().find(|l| l.starts_with("xcr0")).unwrap();
    let ymm_only = text.replace(xcr0, "xcr0 0000000000000007");
    check(
        &features_of(&ymm_only),
        &[Avx, Avx2],
        &[Avx512f, Avx512bw, Avx512vl, Avx512dq],
    );
}

#[test]
fn enhanced_ibrs_is_read_from_arch_capabilities_where_readable() {
    // Skylake-Client with the ARCH_CAPABILITIES CPUID bit set, with and
    // without a readable MSR reporting IBRS_ALL (bit 1).
    let text = fixture("qemu-tcg-skylake-client");
    let leaf7 = text
        .lines()
        .find(|l| l.starts_with("cpuid 00000007 00000000"))
        .unwrap();
    let mut regs: Vec<u32> = leaf7
        .split_whitespace()
        .skip(3)
        .map(|h| u32::from_str_radix(h, 16).unwrap())
        .collect();
    regs[3] |= 1 << 29;
    let with_bit = text.replace(
        leaf7,
        &format!(
            "cpuid 00000007 00000000 {:08x} {:08x} {:08x} {:08x}",
            regs[0], regs[1], regs[2], regs[3]
        ),
    );
    let f = features_of(&with_bit);
    check(&f, &[ArchCapabilities, RetpolineNeeded], &[Eibrs]);
    let f = features_of(&format!("{with_bit}\nmsr 0000010a 0000000000000002\n"));
    check(&f, &[ArchCapabilities, Eibrs], &[RetpolineNeeded]);
}

#[test]
fn overrides_apply_to_a_replayed_cpu() {
    let f = features_of(&fixture("qemu-tcg-skylake-client"));
    let o = Overrides::parse("nomovbe,noavx,+fsrm").unwrap();
    let g = f.with_overrides(&o);
    check(&g, &[Fsrm, Sse4_2, Bmi2], &[Movbe, Avx, Avx2, Fma, F16c]);
    // The cmdline form, as the kernel example uses it.
    let o = Overrides::from_cmdline("root=/dev/sda altpatch=noerms,nopopcnt ro").unwrap();
    check(&f.with_overrides(&o), &[Movbe], &[Erms, Popcnt]);
    // Forcing retpoline_needed off is a policy override.
    let o = Overrides::parse("noretpoline_needed").unwrap();
    assert!(!f.with_overrides(&o).has(RetpolineNeeded));
}

#[test]
fn bad_override_strings_list_valid_names() {
    for bad in ["nomovbe,noavx3", "+sse5", "turbo"] {
        let err = Overrides::parse(bad).unwrap_err();
        assert!(
            matches!(err, OverrideError::UnknownFeature { .. }),
            "{bad}: {err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("valid names:"), "{msg}");
        for f in Feature::ALL {
            assert!(msg.contains(f.name()), "message lacks {}: {msg}", f.name());
        }
    }
    let err = Overrides::from_cmdline("altpatch=nommx quiet").unwrap_err();
    assert!(err.to_string().contains("`mmx`"), "{err}");
}

#[test]
fn env_overrides() {
    // Runs in a child so the variable does not leak into other tests.
    if let Ok(mode) = std::env::var("ALTPATCH_ENV_CHILD") {
        let (mode, name) = mode.split_once(':').unwrap();
        let feat = Feature::from_name(name).unwrap();
        match (mode, Features::detect_with_env()) {
            ("ok", Ok(f)) => assert!(!f.has(Movbe) && f.has(feat)),
            // Safe code must not be told the CPU has what it lacks.
            ("unverified", Err(OverrideError::Unverified { name: n })) => assert_eq!(n, name),
            (_, other) => panic!("{mode} {name}: {other:?}"),
        }
        return;
    }
    let host = Features::detect();
    let has = Feature::ALL
        .iter()
        .find(|f| f.is_instruction_set() && host.has(**f));
    let lacks = Feature::ALL
        .iter()
        .find(|f| f.is_instruction_set() && !host.has(**f));
    let exe = std::env::current_exe().unwrap();
    let child = |mode: &str, env: &str| {
        std::process::Command::new(&exe)
            .args(["env_overrides", "--exact", "--test-threads=1"])
            .env("ALTPATCH_ENV_CHILD", mode)
            .env("ALTPATCH", env)
            .output()
            .unwrap()
    };
    if let Some(f) = has {
        let out = child(
            &format!("ok:{}", f.name()),
            &format!("nomovbe,+{}", f.name()),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    if let Some(f) = lacks {
        let out = child(
            &format!("unverified:{}", f.name()),
            &format!("+{}", f.name()),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let out = child("ok:sse3", "nomovbee");
    assert!(
        !out.status.success(),
        "a bad ALTPATCH must make detect_with_env fail"
    );
}

#[test]
fn dumps_round_trip() {
    for name in [
        "qemu-tcg-nehalem",
        "qemu-tcg-skylake-client",
        "qemu-tcg-epyc",
        "qemu-tcg-max",
        "kvm-amd-epyc-zen5",
    ] {
        let rec = RecordedCpuid::parse(&fixture(name)).unwrap();
        let again = RecordedCpuid::parse(&dump(&rec).to_string()).unwrap();
        assert_eq!(
            Features::from_source(&rec),
            Features::from_source(&again),
            "{name}"
        );
        assert_eq!(rec.cpuid(1, 0), again.cpuid(1, 0));
        assert_eq!(rec.xcr0(), again.xcr0());
    }
    // And the host, through the real cpuid instruction.
    let host = altpatch::cpu::HostCpuid::new();
    let rec = RecordedCpuid::parse(&dump(&host).to_string()).unwrap();
    assert_eq!(Features::from_source(&rec), Features::from_source(&host));
}

#[test]
fn malformed_dumps_are_rejected_with_the_line() {
    let e = RecordedCpuid::parse("cpuid 0 0 1 2 3\n").unwrap_err();
    assert_eq!(e.line, 1);
    let e = RecordedCpuid::parse("cpuid 0 0 1 2 3 4\ncpuid 1 0 zz 0 0 0\n").unwrap_err();
    assert_eq!(e.line, 2);
    let e = RecordedCpuid::parse("cpuid 1 0 1 2 3 4\n").unwrap_err();
    assert!(e.to_string().contains("no leaf 0"), "{e}");
    let e = RecordedCpuid::parse("cpuid 0 0 1 2 3 4\nmsr 10a\n").unwrap_err();
    assert_eq!(e.line, 2);
    assert!(RecordedCpuid::parse("cpuid 0 0 1 2 3 4 5\n").is_err());
    assert!(RecordedCpuid::parse("bogus\n").is_err());
}

/// A kernel's MSR reader, faked: CPUID from the Skylake-Client recording
/// (with or without the `IA32_ARCH_CAPABILITIES` bit), `rdmsr` answering
/// one value and remembering what it was asked.
struct FakeMsr {
    cpuid: RecordedCpuid,
    arch_capabilities: bool,
    value: u64,
    asked: std::cell::RefCell<Vec<u32>>,
}

impl CpuidSource for FakeMsr {
    fn cpuid(&self, leaf: u32, subleaf: u32) -> altpatch::cpu::CpuidResult {
        let mut r = self.cpuid.cpuid(leaf, subleaf);
        if (leaf, subleaf) == (7, 0) {
            r.edx = (r.edx & !(1 << 29)) | (self.arch_capabilities as u32) << 29;
        }
        r
    }

    fn xcr0(&self) -> Option<u64> {
        self.cpuid.xcr0()
    }

    fn msr(&self, index: u32) -> Option<u64> {
        self.asked.borrow_mut().push(index);
        Some(self.value)
    }
}

#[test]
fn enhanced_ibrs_comes_from_the_msr_only_when_cpuid_says_it_exists() {
    let fake = |arch_capabilities, value| FakeMsr {
        cpuid: RecordedCpuid::parse(&fixture("qemu-tcg-skylake-client")).unwrap(),
        arch_capabilities,
        value,
        asked: Default::default(),
    };
    // IBRS_ALL (bit 1) set: enhanced IBRS, read from IA32_ARCH_CAPABILITIES.
    let src = fake(true, 1 << 1);
    let f = Features::from_source(&src);
    check(&f, &[ArchCapabilities, Eibrs], &[]);
    assert_eq!(*src.asked.borrow(), [0x10a]);
    // The MSR without IBRS_ALL: none.
    let src = fake(true, 1 << 0);
    check(&Features::from_source(&src), &[ArchCapabilities], &[Eibrs]);
    // CPUID says there is no such MSR: it is never read (rdmsr would #GP).
    let src = fake(false, u64::MAX);
    check(
        &Features::from_source(&src),
        &[],
        &[ArchCapabilities, Eibrs],
    );
    assert!(src.asked.borrow().is_empty(), "{:?}", src.asked.borrow());
}
