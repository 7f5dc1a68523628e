//! The CPUs the firmware reports: the ACPI MADT's enabled local APICs.
//! (QEMU's SeaBIOS places the RSDP in the BIOS area; the tables it points
//! to sit at the top of low RAM, inside the boot page tables' first GiB.)

/// At most this many CPUs are listed.
pub const MAX: usize = 16;

/// The APIC IDs of the enabled processors, in MADT order.
pub struct Cpus {
    pub ids: [u8; MAX],
    pub count: usize,
}

fn bytes(addr: usize, len: usize) -> &'static [u8] {
    // SAFETY: callers pass firmware tables in identity-mapped low memory
    // (the BIOS area, or tables the RSDT points to below 1 GiB).
    unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
}

fn u32_at(addr: usize) -> u32 {
    let b = bytes(addr, 4);
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn checksum_ok(addr: usize, len: usize) -> bool {
    bytes(addr, len).iter().fold(0u8, |s, b| s.wrapping_add(*b)) == 0
}

/// The RSDP in the EBDA's first KiB or the BIOS area 0xE0000..0x100000.
fn rsdp() -> Option<usize> {
    // SAFETY: the BIOS data area's EBDA segment word, identity-mapped.
    let ebda = (unsafe { (0x40e as *const u16).read_unaligned() } as usize) << 4;
    let areas = [(ebda, ebda + 1024), (0xE0000, 0x100000)];
    areas
        .into_iter()
        .filter(|&(a, _)| a != 0)
        .find_map(|(a, b)| {
            (a..b)
                .step_by(16)
                .find(|&p| bytes(p, 8) == b"RSD PTR " && checksum_ok(p, 20))
        })
}

/// Reads the MADT; `None` if the firmware has no ACPI tables (then the
/// kernel runs on one CPU).
pub fn cpus() -> Option<Cpus> {
    let rsdt = u32_at(rsdp()? + 16) as usize;
    if rsdt == 0 || rsdt >= 1 << 30 || bytes(rsdt, 4) != b"RSDT" {
        return None;
    }
    let len = u32_at(rsdt + 4) as usize;
    let madt = (rsdt + 36..rsdt + len)
        .step_by(4)
        .map(|e| u32_at(e) as usize)
        .find(|&t| t != 0 && t < 1 << 30 && bytes(t, 4) == b"APIC")?;
    let end = madt + u32_at(madt + 4) as usize;
    let mut out = Cpus {
        ids: [0; MAX],
        count: 0,
    };
    let mut at = madt + 44;
    while at + 2 <= end {
        let (kind, elen) = (bytes(at, 1)[0], bytes(at + 1, 1)[0] as usize);
        if elen < 2 {
            break;
        }
        // Type 0: processor local APIC (ACPI id, APIC id, flags: bit 0
        // enabled).
        if kind == 0 && elen >= 8 && u32_at(at + 4) & 1 != 0 && out.count < MAX {
            out.ids[out.count] = bytes(at + 3, 1)[0];
            out.count += 1;
        }
        at += elen;
    }
    Some(out)
}
