//! Filesystem helpers the format and the tools share: what kind of file a
//! path is, the size of a file or block device, reads that treat the end
//! of a file as zeros, and files made whole under a temporary name.

use std::fs::{File, FileType, Metadata, Permissions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// What kind of file a path names, for messages.
pub fn file_kind(ft: FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_symlink() {
        "a dangling symlink"
    } else {
        "not a regular file"
    }
}

/// Regular files and block devices can hold disk data; anything else (a
/// FIFO would even block the open) is refused before it is opened.
pub fn usable(ft: FileType) -> bool {
    ft.is_file() || ft.is_block_device()
}

/// Size of a regular file or block device (whose `st_size` is 0).
pub fn size_of(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        let mut f = file;
        io::Seek::seek(&mut f, io::SeekFrom::End(0))
    } else {
        Ok(meta.len())
    }
}

/// The low 32 bits of the mtime's seconds, as UML records it.
pub fn mtime32(meta: &Metadata) -> u32 {
    (meta.mtime() & 0xffff_ffff) as u32
}

/// Reads exactly `buf.len()` bytes at `offset`; bytes past the end of the
/// file read as zeros (a COW file is sparse, a backing file may end
/// mid-sector).
pub fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => {
                buf[got..].fill(0);
                return Ok(());
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A file made under a hidden temporary name beside `path` and moved to
/// `path` only once complete, so a crash or an error never leaves half a
/// file there. Dropped without [`NewFile::persist`], the temporary file
/// is removed.
pub struct NewFile {
    tmp: tempfile::NamedTempFile,
    path: PathBuf,
}

impl NewFile {
    pub fn create(path: &Path) -> io::Result<NewFile> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let mut prefix = std::ffi::OsString::from(".");
        prefix.push(path.file_name().unwrap_or_default());
        prefix.push(".");
        let tmp = tempfile::Builder::new()
            .prefix(&prefix)
            .suffix(".tmp")
            // As a plain create would: the umask decides.
            .permissions(Permissions::from_mode(0o666))
            .tempfile_in(dir)?;
        Ok(NewFile {
            tmp,
            path: path.to_owned(),
        })
    }

    pub fn file(&self) -> &File {
        self.tmp.as_file()
    }

    /// The temporary name, for messages about writes to it.
    pub fn tmp_path(&self) -> &Path {
        self.tmp.path()
    }

    /// fsyncs the file, moves it into place (replacing an existing file
    /// only with `replace`; otherwise `AlreadyExists`) and fsyncs the
    /// directory so the rename is durable too.
    pub fn persist(self, replace: bool) -> io::Result<()> {
        self.tmp.as_file().sync_all()?;
        let persisted = if replace {
            self.tmp.persist(&self.path)
        } else {
            self.tmp.persist_noclobber(&self.path)
        };
        persisted.map_err(|e| e.error)?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}
