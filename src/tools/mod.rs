//! The image tools: `info`, `check` and `merge`.

pub mod check;
pub mod info;
pub mod merge;
