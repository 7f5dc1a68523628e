//! `auto` from the running kernel's verdict, then CPUID: replayed CPUs with
//! and without what the kernel says.

use altpatch::cpu::{Feature, Features, Overrides, RecordedCpuid};
use altpatch::retpoline::{CpuinfoFlags, KernelVerdict, KernelView, Mode, Policy};

/// The Skylake-Client dump with `IA32_ARCH_CAPABILITIES` advertised
/// (CPUID.7.0:EDX[29]) and, if given, the MSR's recorded value: what a
/// process (no MSR) and a kernel (MSR read) see of an enhanced-IBRS Intel CPU.
fn eibrs_intel(msr: Option<u64>) -> Features {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/cpuid/qemu-tcg-skylake-client.txt"
    );
    let mut text: String = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() == 7 && f[0] == "cpuid" && f[1] == "00000007" && f[2] == "00000000" {
                let edx = u32::from_str_radix(f[6], 16).unwrap() | 1 << 29;
                format!(
                    "cpuid {} {} {} {} {} {edx:08x}\n",
                    f[1], f[2], f[3], f[4], f[5]
                )
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    if let Some(v) = msr {
        text += &format!("msr 0000010a {v:016x}\n");
    }
    Features::from_source(&RecordedCpuid::parse(&text).unwrap())
}

fn view(verdict: Option<&str>, cpuinfo: Option<&str>) -> KernelView {
    KernelView {
        spectre_v2: verdict.map(KernelVerdict::parse),
        cpuinfo: cpuinfo.map(CpuinfoFlags::parse),
        its: None,
    }
}

/// The recorded Cascade Lake (family 6, model 0x55, stepping 6), its dump
/// text edited by `edit` (line by line) and extended by `extra`.
fn cascade_lake(edit: impl Fn(&str) -> String, extra: &str) -> Features {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/cpuid/qemu-tcg-cascadelake.txt"
    );
    let text: String = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| edit(l) + "\n")
        .collect::<String>()
        + extra;
    Features::from_source(&RecordedCpuid::parse(&text).unwrap())
}

/// `line` with register `reg` (3 = eax .. 6 = edx) of CPUID `leaf`.0
/// or-ed with `bits`.
fn set_bits(line: &str, leaf: &str, reg: usize, bits: u32) -> String {
    let mut f: Vec<String> = line.split_whitespace().map(String::from).collect();
    if f.len() == 7 && f[0] == "cpuid" && f[1] == leaf && f[2] == "00000000" {
        f[reg] = format!("{:08x}", u32::from_str_radix(&f[reg], 16).unwrap() | bits);
    }
    f.join(" ")
}

#[test]
fn indirect_target_selection_follows_linux_rule_and_the_kernel() {
    // The replayed Cascade Lake is on Linux's list: plain (forced, or
    // from the kernel's verdict) routes lower-half branches, and says so.
    let cpu = cascade_lake(|l| l.to_string(), "");
    assert_eq!((cpu.family(), cpu.model(), cpu.stepping()), (6, 0x55, 6));
    let why = altpatch::retpoline::its_affected(&cpu).expect("on the list");
    assert!(why.contains("Linux lists"), "{why}");
    let forced = Policy::choose(&cpu, &Overrides::parse("retpoline=plain").unwrap());
    assert!(forced.its && forced.mode == Mode::Plain, "{forced}");
    assert!(
        forced.reason.contains("Indirect Target Selection"),
        "{forced}"
    );

    // Skylake-SP (stepping 4) is not; nor is a CPU whose
    // IA32_ARCH_CAPABILITIES says ITS_NO, or that has bus lock detection.
    let skylake = cascade_lake(|l| l.replace("00050656", "00050654"), "");
    assert!(altpatch::retpoline::its_affected(&skylake).is_none());
    let its_no = cascade_lake(
        |l| set_bits(l, "00000007", 6, 1 << 29),
        "msr 0000010a 4000000000000000\n",
    );
    assert!(its_no.has(Feature::ItsNo), "{its_no}");
    assert!(!Policy::choose(&its_no, &Overrides::parse("retpoline=plain").unwrap()).its);
    let bus_lock = cascade_lake(|l| set_bits(l, "00000007", 5, 1 << 24), "");
    assert!(bus_lock.has(Feature::BusLockDetect), "{bus_lock}");
    assert!(altpatch::retpoline::its_affected(&bus_lock).is_none());
    // Under a hypervisor that does not say ITS_NO, any Intel model is.
    let guest = skylake.with(Feature::Hypervisor);
    assert!(altpatch::retpoline::its_affected(&guest).is_some());

    // A process asks the kernel first, and quotes it.
    let eibrs = "Mitigation: Enhanced / Automatic IBRS; IBPB: conditional";
    let mut kernel = view(Some(eibrs), None);
    kernel.its = Some("Mitigation: Aligned branch/return thunks".into());
    let p = Policy::decide(&skylake, &kernel);
    assert!(p.its && p.mode == Mode::Plain, "{p}");
    assert!(p.reason.contains("Aligned branch/return thunks"), "{p}");
    kernel.its = Some("Not affected".into());
    assert!(!Policy::decide(&cpu, &kernel).its);
    // No verdict: the CPU's rule.
    kernel.its = None;
    assert!(Policy::decide(&cpu, &kernel).its);
}

#[test]
fn a_process_on_an_eibrs_intel_cpu_follows_the_kernel() {
    let cpu = eibrs_intel(None);
    assert!(cpu.has(Feature::ArchCapabilities) && !cpu.has(Feature::Eibrs));

    // CPUID only: the MSR is out of reach, so the full retpoline stays.
    let p = Policy::decide(&cpu, &KernelView::NONE);
    assert_eq!(p.mode, Mode::Generic, "{p}");
    assert!(p.reason.contains("CPUID only"), "{p}");

    // The kernel's verdict, quoted in the reason.
    let eibrs = "Mitigation: Enhanced / Automatic IBRS; IBPB: conditional; RSB filling; \
                 PBRSB-eIBRS: SW sequence; BHI: BHI_DIS_S";
    let p = Policy::decide(&cpu, &view(Some(eibrs), None));
    assert_eq!(p.mode, Mode::Plain, "{p}");
    assert!(p.reason.contains(eibrs), "{p}");

    // No verdict, but /proc/cpuinfo's flag.
    let p = Policy::decide(
        &cpu,
        &view(
            None,
            Some("flags\t\t: fpu ibrs_enhanced\nbugs\t\t: spectre_v2\n"),
        ),
    );
    assert_eq!(p.mode, Mode::Plain, "{p}");

    // The kernel did not enable it (retpolines): the full retpoline, and
    // the reason says the CPU could do better.
    let p = Policy::decide(
        &cpu,
        &view(
            Some("Mitigation: Retpolines; IBPB: conditional"),
            Some("flags\t\t: fpu ibrs_enhanced\n"),
        ),
    );
    assert_eq!(p.mode, Mode::Generic, "{p}");
    assert!(p.reason.contains("does not use it"), "{p}");

    // An override still wins.
    let o = Overrides::parse("retpoline=generic").unwrap();
    assert_eq!(Policy::choose(&cpu, &o).mode, Mode::Generic);
}

#[test]
fn a_kernel_reads_the_msr_itself() {
    const IBRS_ALL: u64 = 1 << 1;
    let cpu = eibrs_intel(Some(IBRS_ALL));
    assert!(cpu.has(Feature::Eibrs));
    assert_eq!(Policy::auto(&cpu).mode, Mode::Plain);
    let without = eibrs_intel(Some(0));
    assert_eq!(Policy::auto(&without).mode, Mode::Generic);
}

#[test]
fn linux_knows_better_rules() {
    let cpu = eibrs_intel(None);
    // LFENCE is labelled vulnerable; lfence is never chosen.
    let p = Policy::decide(
        &cpu,
        &view(Some("Vulnerable: LFENCE; IBPB: conditional"), None),
    );
    assert_eq!(p.mode, Mode::Generic);
    assert!(p.reason.contains("vulnerable"), "{p}");
    // mitigations=off is the kernel's choice, not ours.
    let p = Policy::decide(
        &cpu,
        &view(Some("Vulnerable; IBPB: disabled; STIBP: disabled"), None),
    );
    assert_eq!(p.mode, Mode::Generic);
    // Skylake-Client (model 0x5e) is affected by Retbleed: said.
    assert!(p.reason.contains("Retbleed"), "{p}");
    // AutoIBRS on an SEV-SNP host is not used by Linux.
    let amd = Features::none()
        .with_vendor(altpatch::cpu::Vendor::Amd, 0x19, 0x11)
        .with(Feature::AutoIbrs);
    let snp = view(None, Some("flags\t\t: fpu autoibrs sev_snp\n"));
    assert_eq!(Policy::decide(&amd, &snp).mode, Mode::Generic);
    let host = view(None, Some("flags\t\t: fpu autoibrs\n"));
    assert_eq!(Policy::decide(&amd, &host).mode, Mode::Plain);
    // Not affected.
    let p = Policy::decide(&amd, &view(Some("Not affected"), None));
    assert_eq!(p.mode, Mode::Plain);
}

/// On this machine: whatever the kernel says, the decision quotes it.
#[test]
fn this_machine() {
    let view = KernelView::read();
    let p = Policy::for_process(&Features::detect(), &Overrides::none());
    match &view.spectre_v2 {
        Some(v) => assert!(p.reason.contains(&v.text), "{p}"),
        None => assert!(p.reason.contains("unreadable"), "{p}"),
    }
    println!("{p}");
}

core::arch::global_asm!(
    ".pushsection .text.rt_return_sites,\"ax\",@progbits",
    // Returns 7 through a `jmp __x86_return_thunk` site.
    ".globl rt_ret_jmp",
    "rt_ret_jmp:",
    "mov eax, 7",
    ".globl rt_ret_jmp_site",
    "rt_ret_jmp_site:",
    "jmp __x86_return_thunk",
    // Returns 9 through a `jne __x86_return_thunk` site if edi != 0,
    // else 11 by a plain ret.
    ".globl rt_ret_jcc",
    "rt_ret_jcc:",
    "mov eax, 9",
    "test edi, edi",
    ".globl rt_ret_jcc_site",
    "rt_ret_jcc_site:",
    "jne __x86_return_thunk",
    "mov eax, 11",
    "ret",
    // An embedder's return thunk: returns, adding 1000 so a test can tell
    // it ran.
    ".globl rt_embedder_return_thunk",
    "rt_embedder_return_thunk:",
    "add eax, 1000",
    "ret",
    ".popsection",
);
unsafe extern "C" {
    fn rt_ret_jmp() -> u32;
    fn rt_ret_jcc(taken: u32) -> u32;
    static rt_ret_jmp_site: u8;
    static rt_ret_jcc_site: u8;
    fn rt_embedder_return_thunk();
}

fn bytes(at: usize, n: usize) -> Vec<u8> {
    // SAFETY: `at` is in this program's readable text.
    unsafe { std::slice::from_raw_parts(at as *const u8, n) }.to_vec()
}

/// Return sites routed to a return thunk the embedder supplies (bytes and
/// results), back to `ret`, back to the thunk; a thunk outside the text is
/// refused with nothing written.
#[test]
fn return_sites_route_to_a_supplied_thunk() {
    use altpatch::retpoline::{self, Error, Outcome, ReturnSites};
    use altpatch::sites::{Site, SiteKind};
    use altpatch::x86::{BranchKind, Cond};

    let jmp_at = (&raw const rt_ret_jmp_site) as usize;
    let jcc_at = (&raw const rt_ret_jcc_site) as usize;
    let sites = [
        Site {
            addr: jmp_at,
            len: 5,
            form: BranchKind::Jmp,
            kind: SiteKind::ReturnThunk,
            target: retpoline::return_thunk(),
        },
        Site {
            addr: jcc_at,
            len: 6,
            form: BranchKind::Jcc(Cond::Ne),
            kind: SiteKind::ReturnThunk,
            target: retpoline::return_thunk(),
        },
    ];
    let original = (bytes(jmp_at, 5), bytes(jcc_at, 6));
    assert_eq!(original.0[0], 0xe9, "{:02x?}", original.0);
    assert_eq!(&original.1[..2], [0x0f, 0x85], "{:02x?}", original.1);
    let image = altpatch::Image::current();
    let mut poke = altpatch::LinuxPoke::new().unwrap();
    let thunk = rt_embedder_return_thunk as *const () as usize;
    let routed = Policy::new(Mode::Plain, "test").with_return_thunk(thunk);
    assert_eq!(routed.returns, ReturnSites::Thunk(thunk));

    // SAFETY (every apply below): only this test runs these functions, and
    // each edit replaces one instruction by one.
    let report = unsafe { retpoline::apply(&image, &routed, &sites, &mut poke) }.unwrap();
    assert!(
        report.sites.iter().all(|s| s.outcome == Outcome::ViaThunk),
        "{report}"
    );
    let rel = |at: usize, len: usize| (thunk as i64 - (at + len) as i64) as i32;
    let mut want_jmp = vec![0xe9];
    want_jmp.extend(rel(jmp_at, 5).to_le_bytes());
    let mut want_jcc = vec![0x0f, 0x85];
    want_jcc.extend(rel(jcc_at, 6).to_le_bytes());
    assert_eq!(bytes(jmp_at, 5), want_jmp);
    assert_eq!(bytes(jcc_at, 6), want_jcc);
    // SAFETY: the functions above, whose sites now reach the thunk.
    unsafe {
        assert_eq!(rt_ret_jmp(), 1007);
        assert_eq!(rt_ret_jcc(1), 1009);
        assert_eq!(rt_ret_jcc(0), 11);
    }

    // Back to `ret` (the default), then to the thunk again.
    let plain = Policy::new(Mode::Plain, "test");
    unsafe { retpoline::apply(&image, &plain, &sites, &mut poke) }.unwrap();
    assert_eq!(bytes(jmp_at, 5), [0xc3, 0xcc, 0xcc, 0xcc, 0xcc]);
    assert_eq!(bytes(jcc_at, 6), [0x74, 4, 0xc3, 0xcc, 0xcc, 0xcc]);
    // SAFETY: as above.
    unsafe {
        assert_eq!(rt_ret_jmp(), 7);
        assert_eq!(rt_ret_jcc(1), 9);
    }
    unsafe { retpoline::apply(&image, &routed, &sites, &mut poke) }.unwrap();
    assert_eq!(bytes(jmp_at, 5), want_jmp);
    // SAFETY: as above.
    assert_eq!(unsafe { rt_ret_jmp() }, 1007);

    // A thunk outside the text: refused, nothing written.
    let outside = Policy::new(Mode::Plain, "test").with_return_thunk(8);
    let e = unsafe { retpoline::apply(&image, &outside, &sites, &mut poke) }.unwrap_err();
    assert!(matches!(e, Error::BadReturnThunk { addr: 8 }), "{e}");
    assert_eq!(bytes(jmp_at, 5), want_jmp);

    // Routed, straight to another thunk (here: back to the original one)
    // works: a site's own branch to a target in the text is a known state.
    let back = Policy::new(Mode::Generic, "test").with_return_thunk(retpoline::return_thunk());
    unsafe { retpoline::apply(&image, &back, &sites, &mut poke) }.unwrap();
    assert_eq!((bytes(jmp_at, 5), bytes(jcc_at, 6)), original);
    unsafe { retpoline::apply(&image, &routed, &sites, &mut poke) }.unwrap();

    // A site holding another branch (je for the jne site) is refused,
    // naming it, and nothing is written.
    let now = bytes(jcc_at, 6);
    let mut je = now.clone();
    je[1] = 0x84;
    let mut mangle = altpatch::Plan::for_image(&image);
    mangle.push(altpatch::Edit::replace(jcc_at, &now, &je));
    // SAFETY: rt_ret_jcc is not called until the edit is undone.
    unsafe { mangle.apply(&mut poke) }.unwrap();
    let e = unsafe { retpoline::apply(&image, &plain, &sites, &mut poke) }.unwrap_err();
    assert!(e.to_string().contains(&format!("{jcc_at:#x}")), "{e}");
    assert_eq!(bytes(jmp_at, 5), want_jmp, "the other site was written");
    // SAFETY: as above.
    unsafe { mangle.undo(&mut poke) }.unwrap();

    // Leave the sites as built.
    unsafe { retpoline::apply(&image, &back, &sites, &mut poke) }.unwrap();
    assert_eq!((bytes(jmp_at, 5), bytes(jcc_at, 6)), original);
}
