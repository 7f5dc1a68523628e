//! General-purpose registers and the register-indirect branches through
//! them (`call *%reg`, `jmp *%reg`), as retpoline inlining writes them.

use core::fmt;

use super::Encoded;

/// The sixteen general-purpose registers, numbered as in ModRM/REX.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
#[allow(missing_docs)] // the names are the architectural register names
pub enum Reg {
    Rax = 0,
    Rcx = 1,
    Rdx = 2,
    Rbx = 3,
    Rsp = 4,
    Rbp = 5,
    Rsi = 6,
    Rdi = 7,
    R8 = 8,
    R9 = 9,
    R10 = 10,
    R11 = 11,
    R12 = 12,
    R13 = 13,
    R14 = 14,
    R15 = 15,
}

impl Reg {
    /// All sixteen registers in encoding order.
    pub const ALL: [Reg; 16] = [
        Reg::Rax,
        Reg::Rcx,
        Reg::Rdx,
        Reg::Rbx,
        Reg::Rsp,
        Reg::Rbp,
        Reg::Rsi,
        Reg::Rdi,
        Reg::R8,
        Reg::R9,
        Reg::R10,
        Reg::R11,
        Reg::R12,
        Reg::R13,
        Reg::R14,
        Reg::R15,
    ];

    /// The register with encoding number `n` (0..=15).
    pub fn from_number(n: u8) -> Option<Reg> {
        Reg::ALL.get(n as usize).copied()
    }

    /// The AT&T-less lower-case name, as used in thunk symbol names
    /// (`rax`, ..., `r15`).
    pub fn name(self) -> &'static str {
        const NAMES: [&str; 16] = [
            "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11",
            "r12", "r13", "r14", "r15",
        ];
        NAMES[self as usize]
    }

    /// The register named `name` (`"rax"`, `"r11"`, ...).
    pub fn from_name(name: &str) -> Option<Reg> {
        Reg::ALL.iter().copied().find(|r| r.name() == name)
    }
}

impl fmt::Display for Reg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.name())
    }
}

fn ff_reg(reg: Reg, base: u8) -> Encoded {
    let n = reg as u8;
    if n < 8 {
        Encoded::from_slice(&[0xff, base + n])
    } else {
        Encoded::from_slice(&[0x41, 0xff, base + (n - 8)])
    }
}

/// `call *%reg`: `ff d0+r`, or `41 ff d0+(r-8)` for r8..r15.
///
/// ```
/// use altpatch::x86::{call_reg, Reg};
/// assert_eq!(&*call_reg(Reg::Rax), &[0xff, 0xd0]);
/// assert_eq!(&*call_reg(Reg::R11), &[0x41, 0xff, 0xd3]);
/// ```
pub fn call_reg(reg: Reg) -> Encoded {
    ff_reg(reg, 0xd0)
}

/// `jmp *%reg`: `ff e0+r`, or `41 ff e0+(r-8)` for r8..r15.
///
/// ```
/// use altpatch::x86::{jmp_reg, Reg};
/// assert_eq!(&*jmp_reg(Reg::Rdi), &[0xff, 0xe7]);
/// assert_eq!(&*jmp_reg(Reg::R15), &[0x41, 0xff, 0xe7]);
/// ```
pub fn jmp_reg(reg: Reg) -> Encoded {
    ff_reg(reg, 0xe0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indirect_branches_all_registers() {
        for r in Reg::ALL {
            let c = call_reg(r);
            let j = jmp_reg(r);
            let n = r as u8;
            if n < 8 {
                assert_eq!(&*c, &[0xff, 0xd0 + n]);
                assert_eq!(&*j, &[0xff, 0xe0 + n]);
            } else {
                assert_eq!(&*c, &[0x41, 0xff, 0xd0 + n - 8]);
                assert_eq!(&*j, &[0x41, 0xff, 0xe0 + n - 8]);
            }
            assert_eq!(Reg::from_name(r.name()), Some(r));
        }
    }
}
