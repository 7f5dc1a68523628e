//! The x86-64 half of `alternative_call!` (the macro and its shims are
//! the mechanism's, `alternative/call_macros.rs`): which registers the
//! arguments go in, and the `asm!` whose sites `alternative::apply`
//! rewrites. A second architecture writes these macros for its ABI.

/// Internal: the instruction at an `alternative_call!` site: a direct
/// call to the asm operand `{__altpatch_f<i>}` (alternative `i`), or to
/// `{__altpatch_fd}` (`d`: the default).
#[doc(hidden)]
#[macro_export]
macro_rules! __alternative_call_insn {
    (d) => {
        "call {__altpatch_fd}"
    };
    ($i:literal) => {
        concat!("call {__altpatch_f", $i, "}")
    };
}

/// Internal: `alternative_call!`'s arguments put in the x86-64 System V
/// argument registers (`rdi, rsi, rdx, rcx, r8, r9`), then its `asm!`.
#[doc(hidden)]
#[macro_export]
macro_rules! __alternative_call_abi {
    (types [$($t:ty),*] aid [$aid:ident] then $then:tt) => {{
        // Checked here too, not only where `into_registers` is compiled,
        // so that `cargo check` reports it.
        const {
            ::core::assert!(
                <($($t,)*) as $crate::arch::CallArgs>::WORDS <= 6,
                "altpatch: alternative_call!'s arguments need more than the six argument registers"
            )
        };
        let __altpatch_regs: [u64; 6] = $crate::arch::CallArgs::into_registers($aid);
        $crate::__alternative_call_regs!(
            regs [("rdi" 0) ("rsi" 1) ("rdx" 2) ("rcx" 3) ("r8" 4) ("r9" 5)]
            types [$($t),*]
            rid [__altpatch_regs]
            acc []
            then $then
        )
    }};
}

/// Internal: the argument registers the `asm!` sets. Each argument may
/// take two words, so `n` arguments set the first `min(2n, 6)` registers
/// (those past the last word get 0; `CallArgs` refuses more than six
/// words), then the `asm!`.
#[doc(hidden)]
#[macro_export]
macro_rules! __alternative_call_regs {
    (regs [$r1:tt $r2:tt $($rs:tt)*] types [$t:ty $(, $ts:ty)*] rid [$rid:ident] acc [$($acc:tt)*] then $then:tt) => {
        $crate::__alternative_call_regs!(
            regs [$($rs)*] types [$($ts),*] rid [$rid] acc [$($acc)* $r1 $r2] then $then
        )
    };
    (regs [$r:tt] types [$t:ty $(, $ts:ty)*] rid [$rid:ident] acc [$($acc:tt)*] then $then:tt) => {
        $crate::__alternative_call_asm!(rid [$rid] regs [$($acc)* $r] then $then)
    };
    (regs [$($r:tt)*] types [$($ts:ty),*] rid [$rid:ident] acc [$($acc:tt)*] then $then:tt) => {
        $crate::__alternative_call_asm!(rid [$rid] regs [$($acc)*] then $then)
    };
}

/// Internal: the `asm!` of `alternative_call!`, with or without a result.
/// `then`'s first token is the `$crate` of `altpatch`, whose
/// `__alternative_asm!` places the site and its records (the mechanism's:
/// this crate is below it).
#[doc(hidden)]
#[macro_export]
macro_rules! __alternative_call_asm {
    (rid [$rid:ident] regs [$(($reg:tt $k:tt))*] then [$via:tt [$($np:tt)*] [] [$($a:tt)*] [$($s:tt)*]]) => {
        // SAFETY: every function is an `extern "C"` function of exactly the
        // declared type (checked above) or the C-ABI function of that type
        // made above for a closure; each argument is in the registers the
        // C ABI gives it (`CallArgs`), every caller-saved register is
        // declared clobbered (`clobber_abi`), and without `nostack` the
        // stack is aligned for a call.
        unsafe {
            $via::__alternative_asm!(
                idx [0 1 2 3 4 5 6 7]
                pieces [$($np)*]
                consts []
                default [$crate::__alternative_call_insn!(d)]
                alts [$($a)*]
                rest [$($s)* $(inout($reg) $rid[$k] => _,)* clobber_abi("C")]
            )
        }
    };
    // Three argument registers or more: the third, `rdx`, also carries
    // the result's second word back.
    (rid [$rid:ident] regs [($r0:tt $k0:tt) ($r1:tt $k1:tt) ($r2:tt $k2:tt) $(($reg:tt $k:tt))*]
     then [$via:tt [$($np:tt)*] [$ret:ty] [$($a:tt)*] [$($s:tt)*]]) => {
        $crate::__alternative_call_asm!(@ret $via [__altpatch_rax __altpatch_rdx] [$ret] [$($np)*] [$($a)*] [$($s)*
            inout($r0) $rid[$k0] => _, inout($r1) $rid[$k1] => _,
            inout($r2) $rid[$k2] => __altpatch_rdx, $(inout($reg) $rid[$k] => _,)*
            lateout("rax") __altpatch_rax,
        ])
    };
    (rid [$rid:ident] regs [$(($reg:tt $k:tt))*] then [$via:tt [$($np:tt)*] [$ret:ty] [$($a:tt)*] [$($s:tt)*]]) => {
        $crate::__alternative_call_asm!(@ret $via [__altpatch_rax __altpatch_rdx] [$ret] [$($np)*] [$($a)*] [$($s)*
            $(inout($reg) $rid[$k] => _,)*
            lateout("rax") __altpatch_rax, lateout("rdx") __altpatch_rdx,
        ])
    };
    (@ret $via:tt [$rax:ident $rdx:ident] [$ret:ty] [$($np:tt)*] [$($a:tt)*] [$($operands:tt)*]) => {{
        let $rax: u64;
        let $rdx: u64;
        // SAFETY: as above; `rax` and `rdx` are declared outputs.
        unsafe {
            $via::__alternative_asm!(
                idx [0 1 2 3 4 5 6 7]
                pieces [$($np)*]
                consts []
                default [$crate::__alternative_call_insn!(d)]
                alts [$($a)*]
                rest [$($operands)* clobber_abi("C")]
            )
        };
        // SAFETY: the registers a function returning this type left.
        unsafe { $crate::arch::__call_result::<$ret>($rax, $rdx) }
    }};
}
