//! Any bytes given to the ELF reader give an error or a result, never a
//! panic, hang or out-of-bounds access: site discovery, the independent
//! decode, the audits (retpoline and CET), the embedded-table parser and
//! embedding.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = altpatch::elf::read_sites(data);
    let _ = altpatch::elf::scan_branches(data);
    let _ = altpatch::elf::audit(data, &["allowed"]);
    let _ = altpatch::elf::audit_cet(data);
    let _ = altpatch::sites::EmbeddedTable::parse(data);
    let mut copy = data.to_vec();
    let _ = altpatch::elf::embed(&mut copy);
});
