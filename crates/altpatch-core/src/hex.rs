//! Bytes shown as text, for every layer's messages and listings.

/// Formats bytes as space-separated hex pairs (`b8 01 00 00 00`).
///
/// ```
/// assert_eq!(altpatch::HexBytes(&[0xe8, 0x00, 0x10]).to_string(), "e8 00 10");
/// ```
#[derive(Clone, Copy)]
pub struct HexBytes<'a>(pub &'a [u8]);

impl core::fmt::Display for HexBytes<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}
