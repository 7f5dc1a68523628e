//! `altpatch sites` on a kernel image: objtool's own tables of thunk and
//! return sites against the sites found (`elf::compare_with_objtool`), as
//! text and as JSON.

use altpatch::elf;

/// What objtool's tables in the image say against the sites found, where
/// the image has them (a Linux `vmlinux`).
pub fn print_objtool(cmp: &elf::ObjtoolComparison) {
    for (name, t) in [
        (".retpoline_sites", &cmp.retpoline_sites),
        (".return_sites", &cmp.return_sites),
    ] {
        let Some(t) = t else { continue };
        println!(
            "\nobjtool's {name} ({} entries): {} found here too, {} found here only, {} listed only",
            t.listed,
            t.both,
            t.only_found.len(),
            t.only_listed.len()
        );
        for a in &t.only_found {
            println!("  {a:#012x}  found here, not in {name} (an object objtool skipped?)");
        }
        for a in &t.only_listed {
            println!("  {a:#012x}  in {name}, no site found here (left alone)");
        }
    }
}

/// [`print_objtool`] as a JSON member (`"objtool":{...}`), addresses as
/// hex strings.
pub fn objtool_json(cmp: &elf::ObjtoolComparison) -> String {
    let hex = |v: &[u64]| {
        v.iter()
            .map(|a| format!("\"{a:#x}\""))
            .collect::<Vec<_>>()
            .join(",")
    };
    let one = |t: &Option<elf::TableComparison>| match t {
        None => "null".to_string(),
        Some(t) => format!(
            "{{\"listed\":{},\"both\":{},\"only_found\":[{}],\"only_listed\":[{}]}}",
            t.listed,
            t.both,
            hex(&t.only_found),
            hex(&t.only_listed)
        ),
    };
    format!(
        "{{\"retpoline_sites\":{},\"return_sites\":{}}}",
        one(&cmp.retpoline_sites),
        one(&cmp.return_sites)
    )
}
