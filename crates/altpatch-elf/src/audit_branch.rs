//! What the retpoline audit reports: one indirect branch that bypasses
//! the thunks, where its code came from and what it is for. Its own file:
//! the audit finds them and the allow rules judge them.

use alloc::string::String;
use core::fmt;

use super::origin::Origin;

/// What an indirect branch is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BranchUse {
    /// `call *%reg` / `call *mem`.
    Call,
    /// A switch's jump table: `jmp *table(,%idx,8)`, or `jmp *%reg` in a
    /// function that loads 32-bit relative table entries. Rust covers these
    /// only with `+retpoline-indirect-branches`.
    JumpTable,
    /// Any other `jmp *`: a tail call, or a PLT stub.
    TailJump,
}

impl BranchUse {
    /// `call`, `jump-table` or `tail-jump`.
    pub fn name(self) -> &'static str {
        match self {
            BranchUse::Call => "call",
            BranchUse::JumpTable => "jump-table",
            BranchUse::TailJump => "tail-jump",
        }
    }
}

/// An indirect `call` or `jmp` (through a register or memory) of the
/// image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndirectBranch {
    /// Its address (link time).
    pub addr: u64,
    /// The function containing it (its symbol; the section for PLT stubs).
    pub function: String,
    /// Its offset in the function.
    pub offset: u64,
    /// The instruction, disassembled (AT&T syntax).
    pub text: String,
    /// Where the code came from.
    pub origin: Origin,
    /// What the branch is for.
    pub kind: BranchUse,
    /// The section holding it (`.text`, `.init.text`, `.plt`).
    pub section: String,
    /// For a branch through memory at a fixed address (`call
    /// *pv_ops+0x18(%rip)`, a jump table's base): the data symbol that
    /// address is in.
    pub target: Option<String>,
    /// Whether no function symbol covers it (hand-written code between
    /// functions; `function` is then the nearest symbol before it, or the
    /// section): decoded from the start of the uncovered bytes, and
    /// reported like any other.
    pub outside_function: bool,
}

impl fmt::Display for IndirectBranch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:#x} <{}+{:#x}>: {}",
            self.addr, self.function, self.offset, self.text
        )?;
        if let Some(t) = &self.target {
            write!(f, " (into {t})")?;
        }
        write!(
            f,
            " [{} {} in {}",
            self.origin.name(),
            self.kind.name(),
            self.section
        )?;
        if self.outside_function {
            f.write_str(", outside any function symbol")?;
        }
        f.write_str("]")
    }
}
