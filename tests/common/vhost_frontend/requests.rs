//! virtio-blk requests (virtio 1.2 §5.2.6) on top of the queues: a chain
//! builder that can make any chain, well-formed or not, and the usual
//! commands as one-call helpers.
//!
//! Buffers are placed in guest memory by a bump allocator that rewinds
//! when nothing is in flight, so a guest address from [`VhostUserBlk::place`]
//! is only good until the next completed wait that leaves the device idle.

use std::time::Duration;
use vhost_user_cow::units::to_usize;

use super::config::feature;
use super::handshake::VhostUserBlk;
use super::virtqueue::{
    indirect_table, Next, RawDesc, WaitError, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
};

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// What a status byte holds until the device writes it.
pub const STATUS_UNTOUCHED: u8 = 0xee;

pub const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;
pub const ID_BYTES: u32 = 20;
/// The virtio-blk sector. The test frontend keeps its own protocol
/// constants (not the daemon's) so that it checks the daemon against the
/// specification rather than against itself.
pub const SECTOR: u64 = 512;

/// `struct virtio_blk_outhdr`.
pub fn header(req_type: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// `struct virtio_blk_discard_write_zeroes`.
pub fn dwz_segment(sector: u64, num_sectors: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num_sectors.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}

/// A request made available and not yet waited for.
#[derive(Debug)]
pub struct Pending {
    pub queue: usize,
    pub head: u16,
    status_gpa: Option<u64>,
    data_in: Vec<(u64, u32)>,
}

impl Pending {
    /// Where its status byte is, if it has one.
    pub fn status_gpa(&self) -> Option<u64> {
        self.status_gpa
    }

    /// Its device-writable data buffers: (guest address, length).
    pub fn data_in(&self) -> &[(u64, u32)] {
        &self.data_in
    }
}

/// What the device did with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The status byte, or None if the device left it untouched.
    pub status: Option<u8>,
    /// The used length from the used ring.
    pub used_len: u32,
    /// The device-writable data buffers, concatenated (status excluded).
    pub data: Vec<u8>,
}

impl Completion {
    /// Panics unless the status is `want`.
    pub fn expect_status(self, want: u8, what: &str) -> Completion {
        assert_eq!(
            self.status,
            Some(want),
            "{what}: status {:?}, want {want} (used len {})",
            self.status,
            self.used_len
        );
        self
    }

    /// Panics unless the status is OK; returns the data read.
    pub fn ok(self, what: &str) -> Vec<u8> {
        self.expect_status(S_OK, what).data
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    desc: RawDesc,
    /// Linked to the next entry automatically (NEXT flag and next field).
    auto: bool,
}

/// Builds one chain. Descriptors added with the typed methods are linked in
/// order; [`Chain::raw`] ones are written exactly as given.
pub struct Chain<'a> {
    dev: &'a mut VhostUserBlk,
    entries: Vec<Entry>,
    status_gpa: Option<u64>,
    data_in: Vec<(u64, u32)>,
}

impl Chain<'_> {
    fn auto(mut self, addr: u64, len: u32, flags: u16) -> Self {
        self.entries.push(Entry {
            desc: RawDesc {
                addr,
                len,
                flags,
                next: Next::Table(0),
            },
            auto: true,
        });
        self
    }

    /// A device-readable buffer holding `bytes`.
    pub fn readable(self, bytes: &[u8]) -> Self {
        let gpa = self.dev.place(bytes);
        self.auto(gpa, u32::try_from(bytes.len()).unwrap(), 0)
    }

    /// The 16-byte request header in its own descriptor.
    pub fn header(self, req_type: u32, sector: u64) -> Self {
        self.readable(&header(req_type, sector))
    }

    /// A device-writable buffer of `len` zero bytes, read back on completion.
    pub fn writable(mut self, len: u32) -> Self {
        let gpa = self.dev.place_zeroed(len as usize);
        self.data_in.push((gpa, len));
        self.auto(gpa, len, VIRTQ_DESC_F_WRITE)
    }

    /// A linked descriptor over any address (not read back).
    pub fn desc(self, addr: u64, len: u32, write: bool) -> Self {
        self.auto(addr, len, if write { VIRTQ_DESC_F_WRITE } else { 0 })
    }

    /// A 1-byte device-writable status buffer preset to [`STATUS_UNTOUCHED`].
    pub fn status(self) -> Self {
        self.status_with(VIRTQ_DESC_F_WRITE)
    }

    /// A 1-byte status buffer with the given flags (e.g. 0: device-readable),
    /// preset to [`STATUS_UNTOUCHED`] and read back on completion.
    pub fn status_with(mut self, flags: u16) -> Self {
        let gpa = self.dev.place(&[STATUS_UNTOUCHED]);
        self.status_gpa = Some(gpa);
        self.auto(gpa, 1, flags)
    }

    /// Reads the status back from `gpa` on completion (for a status byte
    /// placed by hand, e.g. inside a nested table).
    pub fn status_at(mut self, gpa: u64) -> Self {
        self.status_gpa = Some(gpa);
        self
    }

    /// A descriptor written exactly as given (flags and next included).
    pub fn raw(mut self, desc: RawDesc) -> Self {
        self.entries.push(Entry { desc, auto: false });
        self
    }

    /// Sets NEXT on the last descriptor so far, pointing at `next`.
    pub fn link_last_to(mut self, next: Next) -> Self {
        let e = self.entries.last_mut().expect("no descriptor yet");
        e.auto = false;
        e.desc.flags |= VIRTQ_DESC_F_NEXT;
        e.desc.next = next;
        self
    }

    fn resolved(&self) -> Vec<RawDesc> {
        let n = self.entries.len();
        self.entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let mut d = e.desc;
                if e.auto && i + 1 < n {
                    d.flags |= VIRTQ_DESC_F_NEXT;
                    d.next = Next::Chain(i + 1);
                }
                d
            })
            .collect()
    }

    /// Moves every descriptor so far into an indirect table, leaving one
    /// INDIRECT descriptor; `len` overrides the table length in bytes.
    pub fn into_indirect(mut self, len: Option<u32>) -> Self {
        let table = indirect_table(&self.resolved());
        let gpa = self.dev.place(&table);
        self.entries.clear();
        self.auto(
            gpa,
            len.unwrap_or(u32::try_from(table.len()).unwrap()),
            VIRTQ_DESC_F_INDIRECT,
        )
    }

    /// Makes the chain available on `queue` and kicks.
    pub fn submit(self, queue: usize) -> Pending {
        let descs = self.resolved();
        let dev = self.dev;
        let head = dev.queues[queue].add_chain(&dev.mem, &descs);
        Pending {
            queue,
            head,
            status_gpa: self.status_gpa,
            data_in: self.data_in,
        }
    }
}

impl VhostUserBlk {
    /// Starts a chain.
    pub fn chain(&mut self) -> Chain<'_> {
        Chain {
            dev: self,
            entries: Vec::new(),
            status_gpa: None,
            data_in: Vec::new(),
        }
    }

    pub fn mem(&self) -> &super::guest_memory::GuestMemory {
        &self.mem
    }

    /// Copies `bytes` into a fresh guest buffer; returns its address.
    pub fn place(&mut self, bytes: &[u8]) -> u64 {
        let gpa = self
            .arena
            .alloc(bytes.len() as u64, buffer_align(bytes.len()));
        self.mem.write(gpa, bytes);
        gpa
    }

    /// A fresh zeroed guest buffer.
    pub fn place_zeroed(&mut self, len: usize) -> u64 {
        let gpa = self.arena.alloc(len as u64, buffer_align(len));
        self.mem.fill(gpa, len, 0);
        gpa
    }

    /// Puts a raw head index (maybe out of range) in the avail ring.
    pub fn publish_raw_head(&mut self, queue: usize, head: u16) {
        let q = &mut self.queues[queue];
        q.publish(&self.mem, head);
    }

    /// Waits for `p` at most `opts.timeout`.
    pub fn wait(&mut self, p: &Pending) -> Result<Completion, WaitError> {
        let t = self.opts.timeout;
        self.wait_timeout(p, t)
    }

    pub fn wait_timeout(
        &mut self,
        p: &Pending,
        timeout: Duration,
    ) -> Result<Completion, WaitError> {
        let sock = self.socket_fd();
        let used_len = self.queues[p.queue].wait(&self.mem, sock, p.head, timeout)?;
        let status = p.status_gpa.map(|g| self.mem.read_vec(g, 1)[0]);
        let mut data = Vec::new();
        for &(gpa, len) in &p.data_in {
            data.extend(self.mem.read_vec(gpa, len as usize));
        }
        if self.queues.iter().all(|q| q.outstanding() == 0) {
            self.arena.reset();
        }
        Ok(Completion {
            status: status.filter(|&s| s != STATUS_UNTOUCHED),
            used_len,
            data,
        })
    }

    /// Waits (at most `opts.timeout`), failing the test on a hang or
    /// hang-up with `what`, the reason and the backend's log.
    pub fn complete(&mut self, p: Pending, what: &str) -> Completion {
        match self.wait(&p) {
            Ok(c) => c,
            Err(e) => panic!("{}", self.with_log(format!("{what}: {e}"))),
        }
    }

    /// Bytes per data descriptor the helpers use: 64 KiB, or less if the
    /// device's size_max says so.
    pub fn seg_bytes(&self) -> usize {
        let mut s = 64 << 10;
        if self.has_feature(feature::BLK_SIZE_MAX) && self.config.size_max != 0 {
            s = s.min(self.config.size_max as usize);
        }
        let sector = to_usize(SECTOR);
        (s / sector).max(1) * sector
    }

    pub fn submit_read(&mut self, queue: usize, sector: u64, len: usize) -> Pending {
        let seg = self.seg_bytes();
        let mut c = self.chain().header(T_IN, sector);
        let mut left = len;
        while left > 0 {
            let n = left.min(seg);
            c = c.writable(u32::try_from(n).unwrap());
            left -= n;
        }
        c.status().submit(queue)
    }

    pub fn submit_write(&mut self, queue: usize, sector: u64, data: &[u8]) -> Pending {
        let seg = self.seg_bytes();
        let mut c = self.chain().header(T_OUT, sector);
        for piece in data.chunks(seg) {
            c = c.readable(piece);
        }
        c.status().submit(queue)
    }

    pub fn submit_flush(&mut self, queue: usize) -> Pending {
        self.chain().header(T_FLUSH, 0).status().submit(queue)
    }

    /// DISCARD with (sector, num_sectors, flags) segments.
    pub fn submit_discard(&mut self, queue: usize, ranges: &[(u64, u32, u32)]) -> Pending {
        let payload: Vec<u8> = ranges
            .iter()
            .flat_map(|&(s, n, f)| dwz_segment(s, n, f))
            .collect();
        self.chain()
            .header(T_DISCARD, 0)
            .readable(&payload)
            .status()
            .submit(queue)
    }

    pub fn submit_write_zeroes(
        &mut self,
        queue: usize,
        ranges: &[(u64, u32)],
        unmap: bool,
    ) -> Pending {
        let flags = if unmap { WRITE_ZEROES_FLAG_UNMAP } else { 0 };
        let payload: Vec<u8> = ranges
            .iter()
            .flat_map(|&(s, n)| dwz_segment(s, n, flags))
            .collect();
        self.chain()
            .header(T_WRITE_ZEROES, 0)
            .readable(&payload)
            .status()
            .submit(queue)
    }

    pub fn submit_get_id(&mut self, queue: usize, buf_len: u32) -> Pending {
        self.chain()
            .header(T_GET_ID, 0)
            .writable(buf_len)
            .status()
            .submit(queue)
    }

    pub fn read(&mut self, queue: usize, sector: u64, len: usize) -> Completion {
        let p = self.submit_read(queue, sector, len);
        self.complete(p, &format!("read of {len} bytes at sector {sector}"))
    }

    pub fn write(&mut self, queue: usize, sector: u64, data: &[u8]) -> Completion {
        let p = self.submit_write(queue, sector, data);
        self.complete(
            p,
            &format!("write of {} bytes at sector {sector}", data.len()),
        )
    }

    pub fn flush(&mut self, queue: usize) -> Completion {
        let p = self.submit_flush(queue);
        self.complete(p, "flush")
    }

    pub fn discard(&mut self, queue: usize, ranges: &[(u64, u32, u32)]) -> Completion {
        let p = self.submit_discard(queue, ranges);
        self.complete(p, &format!("discard {ranges:?}"))
    }

    pub fn write_zeroes(&mut self, queue: usize, ranges: &[(u64, u32)], unmap: bool) -> Completion {
        let p = self.submit_write_zeroes(queue, ranges, unmap);
        self.complete(p, &format!("write zeroes {ranges:?} unmap={unmap}"))
    }

    pub fn get_id(&mut self, queue: usize, buf_len: u32) -> Completion {
        let p = self.submit_get_id(queue, buf_len);
        self.complete(p, "GET_ID")
    }
}

/// Data buffers of whole sectors are 512-byte aligned, as Linux's block
/// layer aligns them (and O_DIRECT needs); headers and status bytes less.
fn buffer_align(len: usize) -> u64 {
    if len as u64 >= SECTOR {
        SECTOR
    } else {
        16
    }
}

impl VhostUserBlk {
    /// Truncates this frontend's guest memory file under the daemon, then
    /// submits a read whose buffers lie past the cut: the daemon's access
    /// faults (SIGBUS) and must end this connection. Asserts that the
    /// request is never completed. Forget the device afterwards: part of
    /// its mapping is gone.
    #[allow(dead_code)] // only the truncation tests
    pub fn read_over_truncated_memory(&mut self) {
        let fd = self.mem().fd();
        // Rings sit at the start of guest memory; push this request's
        // buffers far past the point the file is cut at.
        self.place_zeroed(8 << 20);
        let chain = self.chain().header(T_IN, 0).writable(512).status();
        // SAFETY: ftruncate on the test's own memfd.
        assert_eq!(unsafe { libc::ftruncate(fd, 4 << 20) }, 0);
        let p = chain.submit(0);
        // The completion can never be seen (the daemon no longer shares the
        // region); the wait ends because the daemon hangs up.
        let r = self.wait(&p);
        assert!(
            matches!(
                r,
                Err(WaitError::Disconnected { .. }) | Err(WaitError::Timeout { .. })
            ),
            "request over truncated memory: {r:?}"
        );
    }
}
