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
    }
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
