//! The image tools: `info`, `check`, `merge` and `rebase`, and the
//! inspection that `info` and `check` share.

pub mod check;
pub mod info;
pub mod inspect;
pub mod merge;
pub mod rebase;
