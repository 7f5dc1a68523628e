//! The shape of a loop function, decoded from memory at run time, so a
//! bench can prove its variants differ only where they should (included
//! by the per-call benches with `#[path]`, next to `aligned.rs`).
#![allow(dead_code)]

use std::fmt::Write as _;

use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind};

/// One decoded instruction, position-independent: branch targets inside
/// the function as offsets from its start, outside it (and RIP-relative
/// addresses) as absolute addresses, everything else as its bytes.
#[derive(Clone, Debug)]
struct Insn {
    offset: usize,
    text: String,
    is_call: bool,
}

/// A loop function as decoded from memory (up to its first `ret`).
#[derive(Debug)]
pub struct Shape {
    name: String,
    start: usize,
    insns: Vec<Insn>,
    /// Offset of the loop head (the target of the last backward jump).
    head: usize,
}

impl Shape {
    /// Decodes the function at `addr` until its first `ret` (at most 512
    /// bytes).
    pub fn of(name: &str, addr: usize) -> Shape {
        // SAFETY: `addr` is a function of this program: its text is
        // mapped readable, and 512 bytes from a function's start stay in
        // the text segment of these benches (their loops are followed by
        // more code).
        let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, 512) };
        let mut d = Decoder::with_ip(64, bytes, addr as u64, DecoderOptions::NONE);
        let mut raw = Vec::new();
        let mut ins = Instruction::default();
        while d.can_decode() {
            d.decode_out(&mut ins);
            raw.push(ins);
            if ins.mnemonic() == Mnemonic::Ret {
                break;
            }
        }
        let end = raw.last().map_or(addr as u64, |i| i.next_ip());
        let start = addr as u64;
        let mut head = 0;
        let insns = raw
            .iter()
            .map(|i| {
                let offset = (i.ip() - start) as usize;
                let branch = matches!(i.op0_kind(), OpKind::NearBranch64);
                let text = if branch {
                    let t = i.near_branch_target();
                    if (start..end).contains(&t) {
                        if t <= i.ip() && !matches!(i.mnemonic(), Mnemonic::Jmp | Mnemonic::Call) {
                            head = (t - start) as usize;
                        }
                        // By instruction, not byte: a longer call moves
                        // the instructions after it.
                        let k = raw.iter().position(|j| j.ip() == t);
                        format!("{:?} to instruction {k:?}", i.mnemonic())
                    } else {
                        format!("{:?} {t:#x}", i.mnemonic())
                    }
                } else if i.is_ip_rel_memory_operand() {
                    let regs: Vec<_> = (0..i.op_count()).map(|k| i.op_register(k)).collect();
                    format!("{:?} [{:#x}] {regs:?}", i.code(), i.ip_rel_memory_address())
                } else {
                    let at = offset;
                    hex(&bytes[at..at + i.len()])
                };
                let is_call = i.mnemonic() == Mnemonic::Call;
                Insn {
                    offset,
                    text,
                    is_call,
                }
            })
            .collect();
        Shape {
            name: name.into(),
            start: addr,
            insns,
            head,
        }
    }

    /// The loop head's address.
    pub fn head(&self) -> usize {
        self.start + self.head
    }

    /// The address of the (first) call in the loop.
    pub fn call(&self) -> usize {
        let i = self
            .insns
            .iter()
            .find(|i| i.is_call && i.offset >= self.head)
            .unwrap_or_else(|| panic!("{}: no call in its loop", self.name));
        self.start + i.offset
    }

    /// Panics unless `self` and `other` are the same instructions in the
    /// same order except for the loop's call, which must start at the same
    /// offset (a longer call moves what follows it).
    pub fn assert_differs_only_in_call(&self, other: &Shape) {
        self.assert_like(other, true);
    }

    /// Panics unless `self` and `other` are the same instructions in the
    /// same order, calls included (a patched site that became the
    /// baseline's call).
    pub fn assert_same(&self, other: &Shape) {
        self.assert_like(other, false);
    }

    /// As [`Shape::assert_same`], from the loop heads on (compiled
    /// functions differ before it, in where their panics are).
    pub fn assert_same_loop(&self, other: &Shape) {
        let from = |s: &Shape| Shape {
            name: s.name.clone(),
            start: s.start + s.head,
            insns: s
                .insns
                .iter()
                .filter(|i| i.offset >= s.head)
                .cloned()
                .collect(),
            head: 0,
        };
        let (a, b) = (from(self), from(other));
        assert_eq!(
            self.head, other.head,
            "{} and {}: loop heads",
            self.name, other.name
        );
        a.assert_like(&b, false);
    }

    fn assert_like(&self, other: &Shape, except_call: bool) {
        let listing = |s: &Shape| {
            s.insns.iter().fold(String::new(), |mut out, i| {
                let _ = writeln!(out, "  +{:<3} {}", i.offset, i.text);
                out
            })
        };
        let same_len = self.insns.len() == other.insns.len();
        let differ: Vec<_> = self
            .insns
            .iter()
            .zip(&other.insns)
            .filter(|(a, b)| a.text != b.text || a.is_call != b.is_call)
            .collect();
        let ok = same_len
            && self.head == other.head
            && match differ.as_slice() {
                [] => true,
                [(a, b)] => except_call && a.is_call && b.is_call && a.offset == b.offset,
                _ => false,
            };
        assert!(
            ok,
            "{} and {} differ in more than {}:\n{}:\n{}{}:\n{}",
            self.name,
            other.name,
            if except_call { "their call" } else { "nothing" },
            self.name,
            listing(self),
            other.name,
            listing(other)
        );
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

/// Checks the layout the loops promise: every head starts a 64-byte
/// block, every call is as far into it as `base`'s (3 bytes for
/// `call_loop!`), and `others` differ from `base` only in that call.
/// Returns a line for the bench's output.
pub fn check_loops(base: &Shape, others: &[&Shape]) -> String {
    let at = base.call() - base.head();
    for s in std::iter::once(base).chain(others.iter().copied()) {
        assert_eq!(
            s.head() % 64,
            0,
            "{}: loop head not 64-byte aligned",
            s.name
        );
        assert_eq!(
            s.call() - s.head(),
            at,
            "{}: call not {at} bytes into the block",
            s.name
        );
        if !std::ptr::eq(s, base) {
            base.assert_differs_only_in_call(s);
        }
    }
    format!(
        "loop shape checked: {} loops, head 64-byte aligned, call at +{at}, only the call differs",
        1 + others.len()
    )
}

/// For call benches built on `aligned.rs`: at every placement, each
/// variant's loop (from `prepare(name, off)`) gives the expected result,
/// differs from the direct loop only in its call, and the variant at
/// `patched` (a site rewritten to the direct call) is the direct loop.
pub fn check_call_variants(
    names: &[&str],
    patched: usize,
    mut prepare: impl FnMut(&str, usize) -> crate::aligned::Loop,
) -> String {
    use crate::aligned::{OFFSETS, direct, expected, run};
    let mut line = String::new();
    for off in OFFSETS {
        let base = Shape::of("direct", direct(off) as usize);
        let mut others = Vec::new();
        for name in names {
            let f = prepare(name, off);
            assert_eq!(run(f), expected(), "{name} at +{off}");
            others.push(Shape::of(name, f as usize));
        }
        base.assert_same(&others[patched]);
        line = check_loops(&base, &others.iter().collect::<Vec<_>>());
    }
    line
}

/// Checks a static-call trampoline (or ifunc stub) at `addr` as the
/// crate lays it out — `endbr64`, then `jmp` (to `to`, when given), then
/// the `ud1` signature — with its 12 bytes in one 64-byte fetch block, so
/// a call through it measures the layout the crate ships. Returns a line
/// for the bench's output.
pub fn check_trampoline(name: &str, addr: usize, to: Option<usize>) -> String {
    // SAFETY: a trampoline of this program: 16 bytes of mapped text.
    let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, 16) };
    let mut d = Decoder::with_ip(64, bytes, addr as u64, DecoderOptions::NONE);
    let insns: Vec<Instruction> = (0..3).map(|_| d.decode()).collect();
    let ok = insns[0].mnemonic() == Mnemonic::Endbr64
        && insns[1].mnemonic() == Mnemonic::Jmp
        && insns[1].ip() == addr as u64 + 4
        && insns[1].len() == 5
        && to.is_none_or(|t| insns[1].near_branch_target() == t as u64)
        && insns[2].mnemonic() == Mnemonic::Ud1;
    assert!(ok, "{name}: not endbr64; jmp; ud1 at {addr:#x}: {insns:?}");
    assert_eq!(
        addr % 64 / 16,
        (addr + 11) % 64 / 16,
        "{name}: straddles a 16-byte line"
    );
    assert_eq!(
        addr / 64,
        (addr + 11) / 64,
        "{name}: straddles a 64-byte block"
    );
    format!(
        "{name} checked: endbr64, jmp at +4, ud1; at +{} of its 64-byte block",
        addr % 64
    )
}
