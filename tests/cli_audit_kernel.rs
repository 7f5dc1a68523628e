//! The CLI on kernel-like images. `altpatch audit` as a kernel gates on
//! it: a `-nostdlib` image shaped like a kernel — init code built without
//! retpolines, a `pv_ops`-style table called through memory, objtool-style
//! annotations in both of Linux's formats, and hand-written code no
//! function symbol covers — fails without rules, naming each kind, and
//! passes with the rules a kernel would give. `altpatch sites` on an image
//! keeping objtool's tables compares them with what it finds.

#[path = "common/cli.rs"]
mod cli;
mod common;

use std::path::PathBuf;

use cli::{altpatch, text};

/// The kernel-like image: every C function built with external thunks
/// except the init one.
fn kernel_like() -> PathBuf {
    let src = r#"
typedef long (*fn_t)(long);

long inc(long x) { return x + 1; }

/* Through the thunk: no finding. */
__attribute__((noinline)) long through_thunk(fn_t f, long x) { return f(x) * 2; }

/* A paravirt-style table the kernel patches into direct calls itself. */
struct pv_ops { fn_t a, b, c; } pv_ops = { inc, inc, inc };
__attribute__((noinline)) long pv_call(long x)
{
    long r;
    __asm__ volatile("call *pv_ops+8(%%rip)" : "=a"(r) : "D"(x) : "memory");
    return r;
}

/* Init code, built without retpolines on purpose. */
__attribute__((section(".init.text"), indirect_branch("keep"), noinline))
long init_call(fn_t f, long x) { return f(x) + 1; }

/* Annotated as safe, as Linux up to 6.12 writes it (an absolute pointer
 * in .discard.retpoline_safe) and as later Linux does (a self-relative
 * offset and the type, 2, in .discard.annotate_insn). */
__attribute__((noinline)) long annotated_old(fn_t f, long x)
{
    long r;
    __asm__ volatile("999: call *%1\n"
                     ".pushsection .discard.retpoline_safe,\"a\",@progbits\n"
                     ".quad 999b\n.popsection"
                     : "=a"(r) : "r"(f), "D"(x) : "memory");
    return r;
}
__attribute__((noinline)) long annotated_new(fn_t f, long x)
{
    long r;
    __asm__ volatile("999: call *%1\n"
                     ".pushsection .discard.annotate_insn,\"a\",@progbits\n"
                     ".long 999b - .\n.long 2\n.popsection"
                     : "=a"(r) : "r"(f), "D"(x) : "memory");
    return r;
}

/* Hand-written entry code with no function symbol (no .type, no .size). */
__asm__(".text\n"
        ".globl raw_entry\nraw_entry: call *%rbx\n ret\n"
        ".globl raw_listed\nraw_listed: jmp *%rcx\n");

void _start(void)
{
    through_thunk(inc, 1);
    pv_call(2);
    init_call(inc, 3);
    annotated_old(inc, 4);
    annotated_new(inc, 5);
    for (;;) {}
}
"#;
    cli::thunk_extern_image("audit_kernel_like", src)
}

#[test]
fn a_kernel_gates_on_its_rules() {
    let image = kernel_like();
    let path = image.to_str().unwrap();
    let syms = common::symbols(&image);

    // No rules: every kind is reported, each for what it is; the
    // annotated branches are counted as intended, never listed.
    let o = altpatch(&["audit", path]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("4 indirect branches bypass the thunks"), "{t}");
    assert!(t.contains("2 intended by the code"), "{t}");
    assert!(
        t.contains("<init_call+") && t.contains("in .init.text"),
        "{t}"
    );
    assert!(
        t.contains("<pv_call+") && t.contains("(into pv_ops)"),
        "{t}"
    );
    for raw in ["raw_entry", "raw_listed"] {
        let line = t
            .lines()
            .find(|l| l.contains(&format!("<{raw}+0x0>")))
            .unwrap_or_else(|| panic!("{raw} not reported:\n{t}"));
        assert!(line.contains("outside any function symbol"), "{line}");
    }
    assert!(
        !t.contains("annotated_") && !t.contains("through_thunk"),
        "{t}"
    );

    // JSON says the same, addresses and offsets as hex strings.
    let o = altpatch(&["audit", "--json", path]);
    let v: serde_json::Value = serde_json::from_str(&text(&o)).unwrap();
    let bypasses = v["bypasses"].as_array().unwrap();
    assert_eq!(cli::python_reads(&text(&o)), 2 * bypasses.len());
    let pv = bypasses
        .iter()
        .find(|b| b["function"] == "pv_call")
        .unwrap();
    assert_eq!(pv["target"], "pv_ops");
    assert_eq!(
        (cli::hex_addr(&pv["addr"]), cli::hex_addr(&pv["offset"])),
        (
            syms["pv_call"].0 + cli::hex_addr(&pv["offset"]),
            cli::hex_addr(&pv["offset"])
        )
    );
    let init = bypasses
        .iter()
        .find(|b| b["function"] == "init_call")
        .unwrap();
    assert_eq!(
        (init["section"].as_str(), init["outside_function"].as_bool()),
        (Some(".init.text"), Some(false))
    );

    // The kernel's rules, the hand-written entries still reported: never
    // dropped for lack of a symbol.
    let rules = ["--allow-section", ".init.*", "--allow-target", "pv_ops*"];
    let o = altpatch(&[&["audit"], &rules[..], &[path]].concat());
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("2 indirect branches bypass the thunks"), "{t}");
    assert!(
        t.contains("<raw_entry+0x0>") && t.contains("<raw_listed+0x0>"),
        "{t}"
    );

    // ... and with them listed as annotated: clean.
    let list = image.with_extension("safe");
    std::fs::write(
        &list,
        format!(
            "# hand-written entries, reviewed\n{:#x}\n{:x}  # without 0x\n",
            syms["raw_entry"].0, syms["raw_listed"].0
        ),
    )
    .unwrap();
    let list_arg = list.to_str().unwrap();
    let o = altpatch(&[&["audit"], &rules[..], &["--allow-list", list_arg, path]].concat());
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("no indirect branch bypasses the thunks"));

    // A list with a line that is no address is an error naming it.
    std::fs::write(&list, "0x10\nnot-an-address\n").unwrap();
    let o = altpatch(&["audit", "--allow-list", list_arg, path]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("line 2: `not-an-address`"),
        "{}",
        text(&o)
    );
}

/// `altpatch sites` on an image that keeps objtool's tables (as a
/// `vmlinux` does) says which sites the tables lack and which entries no
/// site matches.
#[test]
fn sites_compares_with_objtools_tables() {
    let body = r#"
__asm__(".text\n.globl _start\n.type _start, @function\n_start:\n"
        "listed_call: call __x86_indirect_thunk_rax\n"
        "listed_cs: .byte 0x2e\n call __x86_indirect_thunk_r11\n"
        "listed_ret: jmp __x86_return_thunk\n"
        ".globl skipped_ret\nskipped_ret: jmp __x86_return_thunk\n"
        ".globl not_a_site\nnot_a_site: jmp *%rax\n"
        ".size _start, . - _start\n"
        ".section .retpoline_sites,\"a\"\n"
        ".long listed_call - .\n.long listed_cs - .\n"
        ".section .return_sites,\"a\"\n"
        ".long listed_ret - .\n.long not_a_site - .\n");
"#;
    let image = common::asm_image("objtool_tables", &format!("{}{body}", cli::WEAK_THUNKS_C));
    let syms = common::symbols(&image);
    let path = image.to_str().unwrap();
    let o = altpatch(&["sites", path]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    // Both thunk sites listed, the cs-prefixed one at its cs byte.
    assert!(
        t.contains("objtool's .retpoline_sites (2 entries): 2 found here too, 0 found here only, 0 listed only"),
        "{t}"
    );
    assert!(
        t.contains("objtool's .return_sites (2 entries): 1 found here too, 1 found here only, 1 listed only"),
        "{t}"
    );
    let skipped = syms["skipped_ret"].0;
    let not_a_site = syms["not_a_site"].0;
    assert!(
        t.contains(&format!(
            "{skipped:#012x}  found here, not in .return_sites"
        )),
        "{t}"
    );
    assert!(
        t.contains(&format!(
            "{not_a_site:#012x}  in .return_sites, no site found here"
        )),
        "{t}"
    );

    let o = altpatch(&["sites", "--json", path]);
    let j = text(&o);
    cli::python_reads(&j);
    let v: serde_json::Value = serde_json::from_str(&j).unwrap();
    let ret = &v["objtool"]["return_sites"];
    assert_eq!(
        (
            cli::hex_addr(&ret["only_found"][0]),
            cli::hex_addr(&ret["only_listed"][0])
        ),
        (skipped, not_a_site)
    );
    // An image without the tables: null, and no such lines.
    let without = format!(
        "{}{}\");\n",
        cli::WEAK_THUNKS_C,
        body.split(".section .retpoline_sites").next().unwrap()
    );
    let plain = common::asm_image("objtool_none", &without);
    let o = altpatch(&["sites", "--json", plain.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&text(&o)).unwrap();
    assert!(v["objtool"]["retpoline_sites"].is_null(), "{v}");
}
