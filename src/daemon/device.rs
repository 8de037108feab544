//! The served block device: the open files, the write-path scheduler that
//! owns the bitmap, and the virtio-blk limits. One per daemon; shared by
//! every connection and queue thread.

use std::fs::File;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::control::events::EventBus;
use crate::daemon::backup_job::{BackupError, BackupJobs};
use crate::daemon::scheduler::{CowLayout, Scheduler};
use crate::daemon::throttle::{Limit, Throttle};
use crate::format::bitmap_view::BitmapReader;
use crate::format::error::{DiskError, Result};
use crate::format::{Disk, DiskFormat, DiskOptions};
use crate::units::{SECTOR_BYTES, SECTOR_SHIFT};
use crate::virtio::request::Limits;

/// Cache mode of the data files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Page cache; FLUSH does fdatasync.
    #[default]
    Buffered,
    /// O_DIRECT.
    Direct,
    /// O_DSYNC: every write is durable when it completes.
    Sync,
}

impl CacheMode {
    fn open_flags(self) -> i32 {
        match self {
            CacheMode::Buffered => 0,
            CacheMode::Direct => libc::O_DIRECT,
            CacheMode::Sync => libc::O_DSYNC,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CacheMode::Buffered => "buffered",
            CacheMode::Direct => "direct",
            CacheMode::Sync => "sync",
        }
    }
}

#[derive(Debug, Clone)]
pub struct DeviceOptions {
    pub disk: PathBuf,
    pub backing: Option<PathBuf>,
    /// `None`: guessed from the file (see [`Device::guards_cow_magic`]).
    pub format: Option<DiskFormat>,
    pub read_only: bool,
    pub cache: CacheMode,
    pub serial: Option<String>,
    /// I/O limits from the start (the control socket may change them).
    pub throttle: Vec<Limit>,
    /// Bytes of unpinned bitmap pages kept in memory (`--bitmap-cache`).
    pub bitmap_cache: u64,
}

/// What a COW file's header says, for `query-disk`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CowSummary {
    pub version: &'static str,
    /// Bytes one bitmap bit covers.
    pub chunk_size: u64,
    pub chunks: u64,
    pub storable_chunks: u64,
    pub bitmap_offset: u64,
    pub data_offset: u64,
    pub backing: BackingSummary,
}

/// The backing file and what was checked when it was opened.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackingSummary {
    pub path: String,
    /// Named with `--backing` rather than taken from the header.
    pub overridden: bool,
    pub size: u64,
    /// Equal to the size the header records (a mismatch refuses to open).
    pub size_matches: bool,
    pub recorded_mtime: u32,
    /// The mtime was compared (regular files; block devices have none
    /// that means anything) and matched.
    pub mtime_checked: bool,
    /// Opened read-only with a shared lock.
    pub locked: bool,
}

/// The default `--bitmap-cache`: 32 MiB of bitmap pages cover 128 GiB of
/// disk at 512-byte chunks.
pub const DEFAULT_BITMAP_CACHE: u64 = 32 << 20;

pub struct Device {
    pub path: PathBuf,
    /// The COW side's header facts (None for a raw image).
    pub cow_summary: Option<CowSummary>,
    /// The COW file (or raw image).
    pub file: File,
    pub backing: Option<File>,
    pub backing_path: Option<PathBuf>,
    pub sectors: u64,
    pub read_only: bool,
    pub cache: CacheMode,
    pub limits: Limits,
    /// The logical block size offered to the guest: 512, or with O_DIRECT
    /// on a COW file with larger chunks, the chunk (up to 4 KiB), so that
    /// every guest I/O covers whole chunks and stays aligned.
    pub block_size: u32,
    /// Worker threads the scheduler keeps queues for (at least 1).
    pub threads: usize,
    /// Up to 20 bytes, the GET_ID answer.
    pub serial: Vec<u8>,
    /// COW extents mapped, allocated share etc., for the startup line.
    pub description: String,
    /// The format was guessed, not named with `--format`.
    pub format_guessed: bool,
    /// A writable raw image whose format was guessed: guest writes that
    /// would put the COW magic at offset 0 are refused, so that a guest
    /// cannot turn its disk into a COW file naming a host file.
    pub guards_cow_magic: bool,
    sched: Mutex<Scheduler>,
    /// How reads skip the scheduler (docs/design.md, "Reads off the
    /// scheduler's lock").
    off_lock: OffLock,
    /// Per worker thread: lock and fast-path counters.
    lock_counts: Box<[LockCounts]>,
    /// The I/O limits.
    pub throttle: Throttle,
    /// Events for control-socket clients (a no-op without a control socket).
    pub events: Arc<EventBus>,
    /// Backup jobs: their targets, clocks and events.
    pub backups: BackupJobs,
    /// The metadata failure (rule 8) was announced as an event.
    failure_announced: AtomicBool,
    /// Holds the COW file's lock when `file` was opened a second time.
    _lock_holder: Option<File>,
}

/// Which reads may be issued without the scheduler.
enum OffLock {
    /// A raw image: every read (nothing orders reads on a raw image).
    Raw,
    /// A COW disk: reads whose chunks are all allocated, read from the COW
    /// file at `data_offset`; bits are only ever set, after their data.
    Cow {
        bitmap: BitmapReader,
        data_offset: u64,
    },
}

/// One worker's counters: written only by that worker (a load and a
/// store, no locked instruction), read by the control thread and at
/// exit. Each on its own cache lines, so workers never share one.
#[derive(Default)]
#[repr(align(128))]
pub struct LockCounts {
    /// Acquisitions of the scheduler's mutex.
    pub sched_locks: AtomicU64,
    /// Acquisitions of the bitmap view's read lock (COW reads checked).
    pub view_read_locks: AtomicU64,
    /// Reads issued without the scheduler.
    pub off_lock_reads: AtomicU64,
}

impl LockCounts {
    /// Adds one (single writer: no read-modify-write instruction needed).
    pub fn bump(counter: &AtomicU64) {
        counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }
}

/// The sum of every worker's [`LockCounts`].
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct LockCountsSnapshot {
    pub sched_locks: u64,
    pub view_read_locks: u64,
    pub off_lock_reads: u64,
}

/// The serial a disk gets when none is given: its file name, shortened to
/// the 20 bytes virtio-blk has for it.
fn default_serial(path: &std::path::Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    let name = path
        .file_name()
        .map(|n| n.as_bytes())
        .unwrap_or(b"vhost-user-cow");
    name[..name.len().min(20)].to_vec()
}

impl Device {
    /// Opens the disk for `threads` worker threads (the scheduler keeps
    /// one operation queue per thread).
    pub fn open(opts: &DeviceOptions, threads: usize) -> Result<Device> {
        let disk = Disk::open(
            &opts.disk,
            &DiskOptions {
                read_only: opts.read_only,
                backing: opts.backing.clone(),
                format: opts.format,
                custom_flags: opts.cache.open_flags(),
                no_lock: false,
                bitmap_cache: Some(opts.bitmap_cache),
            },
        )?;
        let sectors = disk.sectors();
        let mut limits = Limits::new(sectors);
        limits.read_only = opts.read_only;
        let Disk {
            path,
            file,
            lock_holder,
            cow,
            format_guessed,
            ..
        } = disk;
        let guards_cow_magic = format_guessed && cow.is_none() && !opts.read_only;
        let mut block_size = 1u32 << SECTOR_SHIFT; // one sector
        let mut cow_summary = None;
        let (sched, off_lock, backing, backing_path, description) = match cow {
            None => (
                Scheduler::new_raw(sectors, threads, opts.read_only),
                OffLock::Raw,
                None,
                None,
                format!("raw image, {} sectors", sectors),
            ),
            Some(mut c) => {
                let off_lock = OffLock::Cow {
                    bitmap: c.bitmap.reader(),
                    data_offset: c.geometry.data_offset,
                };
                let bitmap_block = match opts.cache {
                    CacheMode::Direct => {
                        // O_DIRECT bitmap writes need block-aligned file
                        // offsets; v1/v2 bitmaps start mid-block.
                        if c.geometry.bitmap_offset % SECTOR_BYTES != 0 {
                            return Err(DiskError::Unsupported {
                                path,
                                what: "O_DIRECT with a bitmap that is not 512-byte aligned (v1/v2 files)",
                            });
                        }
                        SECTOR_BYTES
                    }
                    _ => 1,
                };
                if opts.cache == CacheMode::Direct {
                    block_size = c.geometry.sectorsize.min(4096) as u32;
                }
                // Counting the allocated chunks would read the bitmap.
                let on_file: u64 = c.bitmap.pages_on_file().map(|r| r.end - r.start).sum();
                let backing_is_file = c
                    .backing
                    .metadata()
                    .map(|m| m.file_type().is_file())
                    .unwrap_or(false);
                cow_summary = Some(CowSummary {
                    version: c.header.layout.name(),
                    chunk_size: c.geometry.sectorsize,
                    chunks: c.geometry.chunks,
                    storable_chunks: c.storable_chunks,
                    bitmap_offset: c.geometry.bitmap_offset,
                    data_offset: c.geometry.data_offset,
                    backing: BackingSummary {
                        path: crate::fsutil::escape::escape_path(&c.backing_path),
                        overridden: opts.backing.is_some(),
                        size: c.header.size,
                        size_matches: true,
                        recorded_mtime: c.header.mtime,
                        mtime_checked: backing_is_file,
                        locked: true,
                    },
                });
                let description = format!(
                    "COW {} over {} ({} sectors, {} chunks; {} of {} bitmap pages on file, read on demand)",
                    c.header.layout.name(),
                    crate::fsutil::escape::escape_path(&c.backing_path),
                    sectors,
                    c.geometry.chunks,
                    on_file,
                    c.bitmap.alloc_len() / c.bitmap.page_bytes(),
                );
                let layout = CowLayout {
                    bitmap_offset: c.geometry.bitmap_offset,
                    data_offset: c.geometry.data_offset,
                    bitmap_block,
                    storable_chunks: c.storable_chunks,
                };
                (
                    Scheduler::new_cow(sectors, c.bitmap, layout, threads, opts.read_only),
                    off_lock,
                    Some(c.backing),
                    Some(c.backing_path),
                    description,
                )
            }
        };
        let serial = match &opts.serial {
            Some(s) => s.as_bytes()[..s.len().min(20)].to_vec(),
            None => default_serial(&path),
        };
        let events = Arc::new(
            EventBus::new().map_err(DiskError::io(&path, "create the event queue's eventfd"))?,
        );
        Ok(Device {
            path,
            cow_summary,
            file,
            backing,
            backing_path,
            sectors,
            read_only: opts.read_only,
            cache: opts.cache,
            limits,
            block_size,
            threads: threads.max(1),
            serial,
            description,
            format_guessed,
            guards_cow_magic,
            sched: Mutex::new(sched),
            off_lock,
            lock_counts: (0..threads.max(1)).map(|_| LockCounts::default()).collect(),
            events,
            throttle: Throttle::new(&opts.throttle),
            backups: BackupJobs::default(),
            failure_announced: AtomicBool::new(false),
            _lock_holder: lock_holder,
        })
    }

    pub fn is_cow(&self) -> bool {
        self.backing.is_some()
    }

    pub fn cow_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub fn backing_fd(&self) -> RawFd {
        self.backing
            .as_ref()
            .map_or(self.file.as_raw_fd(), |b| b.as_raw_fd())
    }

    /// The scheduler; a poisoned lock means a queue thread panicked, and
    /// the state it left is still the best there is to drain.
    pub fn sched(&self) -> MutexGuard<'_, Scheduler> {
        self.sched.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file offset a read of sectors `[sector, sector + count)` can be
    /// issued at without the scheduler (in the COW file, or the raw
    /// image), or None when it must go through the scheduler: a COW read
    /// touching a chunk not known allocated (backing data, rule 4; a page
    /// not resident), or a range the scheduler refuses. `view_lock` is set
    /// when the bitmap view's read lock was taken.
    pub fn read_off_lock(&self, sector: u64, count: u64, view_lock: &mut bool) -> Option<u64> {
        let end = sector.checked_add(count)?;
        if count == 0 || end > self.sectors {
            return None;
        }
        match &self.off_lock {
            OffLock::Raw => Some(sector * SECTOR_BYTES),
            OffLock::Cow {
                bitmap,
                data_offset,
            } => {
                *view_lock = true;
                // Set bits stay set and their data is in the COW file
                // (rule 1): reading it at any later moment is right.
                bitmap
                    .all_set(sector, count)
                    .then(|| data_offset + sector * SECTOR_BYTES)
            }
        }
    }

    /// Worker `thread`'s counters (the last one's for a thread past the
    /// end, which the scheduler's queues do not have either).
    pub fn lock_counts(&self, thread: usize) -> &LockCounts {
        &self.lock_counts[thread.min(self.lock_counts.len() - 1)]
    }

    /// Every worker's counters, summed.
    pub fn lock_counts_total(&self) -> LockCountsSnapshot {
        let mut t = LockCountsSnapshot::default();
        for c in self.lock_counts.iter() {
            t.sched_locks += c.sched_locks.load(Ordering::Relaxed);
            t.view_read_locks += c.view_read_locks.load(Ordering::Relaxed);
            t.off_lock_reads += c.off_lock_reads.load(Ordering::Relaxed);
        }
        t
    }

    /// Announces the scheduler's metadata failure once (called after each
    /// scheduler step; a load and a branch when there is none).
    pub fn announce_failure(&self, sched: &Scheduler) {
        if let Some(why) = sched.failure() {
            if !self.failure_announced.swap(true, Ordering::AcqRel) {
                self.events.emit(
                    "METADATA_FAILURE",
                    serde_json::json!({ "path": crate::fsutil::escape::escape_path(&self.path), "reason": why }),
                );
            }
        }
    }

    /// Starts a backup of the disk into `file` (`backup_job.rs`).
    pub fn start_backup(&self, file: File, name: String) -> std::result::Result<u64, BackupError> {
        let mut disk_files = vec![(&self.file, "image")];
        if let Some(b) = &self.backing {
            disk_files.push((b, "backing file"));
        }
        self.backups.start(
            &self.sched,
            &self.events,
            &disk_files,
            file,
            name,
            self.sectors * SECTOR_BYTES,
        )
    }

    pub fn cancel_backup(&self, id: u64) -> bool {
        self.backups.cancel(&self.sched, &self.events, id)
    }

    /// `query-jobs`.
    pub fn list_jobs(&self) -> serde_json::Value {
        self.backups.list(&self.sched)
    }

    /// What follows every scheduler step: the metadata failure's event,
    /// the backup job's.
    pub fn after_step(&self, sched: &mut Scheduler) {
        self.announce_failure(sched);
        self.backups.after_step(sched, &self.events);
    }

    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(DiskError::io(&self.path, "fdatasync"))
    }
}
