//! The UML COW format and an open disk: the header, the bitmap and its
//! extent mapping, opening (with the backing checks) and creating files,
//! the synchronous sector API of the tools, the locks, and the errors.

pub mod bitmap;
pub mod bitmap_view;
pub mod create;
pub mod error;
pub mod header;
pub mod lock;
pub mod open;
mod sectors;

pub use create::{create_cow, CreateOptions};
pub use open::{CowParts, Disk, DiskFormat, DiskOptions};
