//! The data regions of a sparse file (SEEK_DATA / SEEK_HOLE): holes read
//! as zeros, so what lies in them is known without reading it.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::io::AsRawFd;

/// The data regions of `file` inside `range`, in increasing order, found
/// one `lseek` pair at a time. A file system without SEEK_DATA (or a block
/// device) yields the whole range as one region.
pub fn data_ranges(file: &File, range: Range<u64>) -> DataRanges<'_> {
    DataRanges {
        file,
        pos: range.start,
        end: range.end,
    }
}

pub struct DataRanges<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

fn seek(file: &File, pos: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let Ok(off) = libc::off_t::try_from(pos) else {
        return Ok(None);
    };
    // SAFETY: lseek on an open fd; the position is only used by calls
    // without an explicit offset, which nothing here makes.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            // No data at or after `pos`.
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(r as u64))
}

impl Iterator for DataRanges<'_> {
    type Item = io::Result<Range<u64>>;

    fn next(&mut self) -> Option<io::Result<Range<u64>>> {
        if self.pos >= self.end {
            return None;
        }
        let whole = |me: &mut Self| {
            let r = me.pos..me.end;
            me.pos = me.end;
            Some(Ok(r))
        };
        let start = match seek(self.file, self.pos, libc::SEEK_DATA) {
            Ok(Some(s)) => s,
            Ok(None) => {
                self.pos = self.end;
                return None;
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)) => {
                return whole(self)
            }
            Err(e) => return Some(Err(e)),
        };
        if start >= self.end {
            self.pos = self.end;
            return None;
        }
        let stop = match seek(self.file, start, libc::SEEK_HOLE) {
            Ok(Some(h)) => h.min(self.end),
            Ok(None) => self.end,
            Err(e) => return Some(Err(e)),
        };
        self.pos = stop;
        Some(Ok(start..stop))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn finds_written_blocks_of_a_sparse_file() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[1; 10], 8 << 20).unwrap();
        f.write_all_at(&[1; 10], 40 << 20).unwrap();
        let got: Vec<_> = data_ranges(&f, 0..64 << 20).map(Result::unwrap).collect();
        // File systems without holes report everything as data.
        let everything = 0..64 << 20;
        if got.len() != 1 || got[0] != everything {
            assert_eq!(got.len(), 2, "{got:?}");
            assert!(got[0].contains(&(8 << 20)) && got[1].contains(&(40 << 20)));
            assert!(got[0].end <= 9 << 20 && got[1].start >= 39 << 20);
        }
        let clipped: Vec<_> = data_ranges(&f, (8 << 20) + 5..(40 << 20) + 2)
            .map(Result::unwrap)
            .collect();
        assert_eq!(clipped.first().unwrap().start, (8 << 20) + 5);
        assert_eq!(clipped.last().unwrap().end, (40 << 20) + 2);
    }
}
