//! A short byte string held inline when small.

use alloc::boxed::Box;
use core::fmt;
use core::ops::Deref;

const INLINE: usize = 22;

/// An immutable byte string: up to 22 bytes inline (every single instruction
/// and most sites), longer ones on the heap.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Bytes(Repr);

#[derive(Clone, PartialEq, Eq, Hash)]
enum Repr {
    Inline { len: u8, buf: [u8; INLINE] },
    Heap(Box<[u8]>),
}

impl Bytes {
    /// Copies `bytes`.
    pub fn new(bytes: &[u8]) -> Bytes {
        if bytes.len() <= INLINE {
            let mut buf = [0u8; INLINE];
            buf[..bytes.len()].copy_from_slice(bytes);
            Bytes(Repr::Inline {
                len: bytes.len() as u8,
                buf,
            })
        } else {
            Bytes(Repr::Heap(bytes.into()))
        }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, buf } => &buf[..*len as usize],
            Repr::Heap(b) => b,
        }
    }
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl From<&[u8]> for Bytes {
    fn from(b: &[u8]) -> Bytes {
        Bytes::new(b)
    }
}

impl<const N: usize> From<[u8; N]> for Bytes {
    fn from(b: [u8; N]) -> Bytes {
        Bytes::new(&b)
    }
}

impl<const N: usize> From<&[u8; N]> for Bytes {
    fn from(b: &[u8; N]) -> Bytes {
        Bytes::new(b)
    }
}

impl From<crate::x86::Encoded> for Bytes {
    fn from(e: crate::x86::Encoded) -> Bytes {
        Bytes::new(&e)
    }
}

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}]", crate::HexBytes(self))
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&crate::HexBytes(self), f)
    }
}
