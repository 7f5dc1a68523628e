//! Plans bounded by an image's text.
//!
//! The plan layer is below this one and knows only text ranges; these
//! constructors are the safe way to get them right, because an [`Image`]
//! was built with the promise they need.

use crate::image::Image;
use crate::plan::{CompactPlan, Plan};

impl Plan {
    /// An empty plan whose edits must lie inside `image`'s text.
    ///
    /// ```
    /// use altpatch::{Image, Plan};
    /// let text = [0x90u8; 4];
    /// let at = text.as_ptr() as usize;
    /// // SAFETY: `text` is mapped and readable while the plan is used.
    /// let image = unsafe { Image::builder("buf").text(at..at + 4) }.build();
    /// let plan = Plan::for_image(&image);
    /// assert!(plan.is_empty());
    /// ```
    pub fn for_image(image: &Image<'_>) -> Plan {
        // SAFETY: an image's text ranges were promised (by the unsafe
        // builder setters, or by the loader for `Image::current`) to be
        // mapped and readable for as long as plans built against it are
        // used.
        unsafe { Plan::with_text_ranges(image.text()) }
    }
}

impl CompactPlan {
    /// An empty plan whose edits must lie inside `image`'s text; `reason`
    /// says why every edit is made (shown in listings).
    ///
    /// ```
    /// use altpatch::{CompactPlan, Image};
    /// let text = [0x90u8; 4];
    /// let at = text.as_ptr() as usize;
    /// // SAFETY: `text` is mapped and readable while the plan is used.
    /// let image = unsafe { Image::builder("buf").text(at..at + 4) }.build();
    /// let plan = CompactPlan::for_image(&image, "example");
    /// assert!(plan.is_empty());
    /// ```
    pub fn for_image(image: &Image<'_>, reason: &'static str) -> CompactPlan {
        // SAFETY: as for `Plan::for_image`.
        unsafe { CompactPlan::with_text_ranges(image.text(), reason) }
    }
}
