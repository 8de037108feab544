//! `check`: a read-only consistency check of a COW file (or raw image).
//!
//! Outcomes, which are also the exit codes of `vhost-user-cow check`:
//!
//! * 0, clean: nothing wrong.
//! * 1, problems found: the file can be read, but something needs a look.
//!   This covers every backing-file problem (missing, not a regular file,
//!   size or mtime changed): the COW file itself is intact and may be used
//!   again with the right backing file (`--backing`). It also covers a COW
//!   file shorter than data_offset + size: UML extends the file to that
//!   length, so a shorter one was truncated (or copied without its sparse
//!   tail); sectors past the end read as zeros, which is harmless where no
//!   bit is set and data loss where one is (said so separately). Stray bits
//!   past the last chunk and a non-zero `cow_format` are problems too.
//! * 2, unusable: the file cannot be opened, or its header cannot be parsed
//!   (truncated, bad magic, unknown version, invalid field, shorter than
//!   its bitmap). Nothing else is checked then.

use std::path::Path;

use super::inspect::{open_for_inspection, scan_bitmap, BackingInfo, Inspected};
use crate::format::error::{mtime_hint, DiskError};
use crate::fsutil::escape::Escaped;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Clean,
    Problems,
    Unusable,
}

impl Verdict {
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Clean => 0,
            Verdict::Problems => 1,
            Verdict::Unusable => 2,
        }
    }
}

#[derive(Debug)]
pub struct CheckReport {
    /// "raw image" or the COW layout name, when known.
    pub kind: Option<String>,
    /// One line each, every line naming the file it is about.
    pub problems: Vec<String>,
    /// Why the file is unusable, if it is.
    pub fatal: Option<DiskError>,
}

impl CheckReport {
    pub fn verdict(&self) -> Verdict {
        if self.fatal.is_some() {
            Verdict::Unusable
        } else if self.problems.is_empty() {
            Verdict::Clean
        } else {
            Verdict::Problems
        }
    }
}

/// Checks `path`; `backing` replaces the backing file named in the header.
pub fn check(path: &Path, backing: Option<&Path>) -> CheckReport {
    let mut report = CheckReport {
        kind: None,
        problems: Vec::new(),
        fatal: None,
    };
    if let Err(e) = check_into(path, backing, &mut report) {
        report.fatal = Some(e);
    }
    report
}

fn check_into(
    path: &Path,
    backing: Option<&Path>,
    report: &mut CheckReport,
) -> Result<(), DiskError> {
    let p = path.display();
    let Inspected {
        file, len, header, ..
    } = open_for_inspection(path)?;
    let Some(header) = header else {
        // A raw image has no structure to check beyond being non-empty.
        report.kind = Some("raw image".to_owned());
        if backing.is_some() {
            report
                .problems
                .push(format!("{p}: raw image: a backing file makes no sense"));
        }
        return Ok(());
    };
    let g = header.geometry(path)?;
    report.kind = Some(format!("UML COW {}", header.layout.name()));

    if header.cow_format != 0 {
        report.problems.push(format!(
            "{p}: cow_format is {} (only 0, the bitmap format, exists)",
            header.cow_format
        ));
    }

    let want = g.data_offset + header.size;
    let scan = scan_bitmap(&file, path, &g, header.size, len)?;
    if len < want {
        report.problems.push(format!(
            "{p}: file is {len} bytes, shorter than data offset + size ({want}): \
             it was truncated; unwritten sectors past the end read as zeros"
        ));
        if scan.allocated_beyond_eof > 0 {
            report.problems.push(format!(
                "{p}: {} allocated chunks have their data (partly) past the end of the file \
                 (that data is lost and reads as zeros)",
                scan.allocated_beyond_eof
            ));
        }
    }
    if scan.stray_bits > 0 {
        report.problems.push(format!(
            "{p}: {} bitmap bits are set beyond the last chunk ({}); they are ignored",
            scan.stray_bits,
            g.chunks - 1
        ));
    }

    let b = BackingInfo::examine(path, &header, backing);
    let bp = &Escaped(&b.path);
    if let Some(e) = &b.error {
        report.problems.push(format!("{p}: backing file {bp}: {e}"));
    }
    if b.size_matches == Some(false) {
        report.problems.push(format!(
            "{p}: backing file {bp} has size {}, but the header records {}",
            b.actual_size.unwrap_or(0),
            b.recorded_size
        ));
    }
    if b.mtime_matches == Some(false) {
        report.problems.push(format!(
            "{p}: backing file {bp} has mtime {}, but the header records {} \
             (it changed since the COW file was made); {}",
            b.actual_mtime.unwrap_or(0),
            b.recorded_mtime,
            mtime_hint(path, Path::new(&b.path))
        ));
    }
    Ok(())
}
