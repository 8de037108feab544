//! Guest memory and one split virtqueue laid out in it by hand (not
//! `MockSplitQueue`, whose used ring overlaps the avail ring for large
//! sizes): descriptor table, avail ring and used ring each in their own
//! page, then a bump allocator for request buffers. Chains are plain
//! virtio-blk requests: header, data, status.

use std::sync::Arc;
use vhost_user_cow::units::to_usize;

use vhost_user_cow::daemon::guest_memory::Memory;
use vhost_user_cow::daemon::virtqueue::Virtqueue;
use virtio_queue::QueueT;
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryRegion,
};

pub const QUEUE_SIZE: u16 = 256;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const BUFFERS: u64 = 0x1_0000;
const MEM_SIZE: u64 = 0x100_0000;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;
pub const FLAG_UNMAP: u32 = 1;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
/// What a status byte holds until the device writes it.
pub const UNTOUCHED: u8 = 0xee;

/// A request made available.
#[derive(Debug, Clone)]
pub struct Req {
    pub head: u16,
    status: u64,
    /// The data buffers (gpa, len).
    data: Vec<(u64, u32)>,
}

pub struct Guest {
    pub mem: GuestMemoryAtomic<Memory>,
    pub vq: Arc<Virtqueue>,
    next_desc: u16,
    avail_idx: u16,
    next_buf: u64,
}

impl Guest {
    pub fn new(event_idx: bool) -> Guest {
        let m = Memory::from_ranges(&[(GuestAddress(0), to_usize(MEM_SIZE))]).unwrap();
        let mem = GuestMemoryAtomic::new(m);
        let vq = Arc::new(Virtqueue::new(0, QUEUE_SIZE).unwrap());
        {
            let mut st = vq.lock();
            let q = &mut st.queue;
            q.set_size(QUEUE_SIZE);
            q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
            q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
            q.try_set_used_ring_address(GuestAddress(USED)).unwrap();
            q.set_event_idx(event_idx);
            q.set_ready(true);
            assert!(q.is_valid(&*mem.memory()));
            st.enabled = true;
            st.started = true;
        }
        Guest {
            mem,
            vq,
            next_desc: 0,
            avail_idx: 0,
            next_buf: BUFFERS,
        }
    }

    /// Host addresses of guest memory, for telling guest buffers apart.
    pub fn host_range(&self) -> std::ops::Range<usize> {
        let m = self.mem.memory();
        let r = m.find_region(GuestAddress(0)).unwrap();
        let start = m.get_host_address(GuestAddress(0)).unwrap() as usize;
        start..start + to_usize(r.len())
    }

    fn alloc(&mut self, len: u64, fill: u8) -> u64 {
        let at = self.next_buf;
        self.next_buf = (at + len + 63) & !63;
        assert!(self.next_buf <= MEM_SIZE, "test guest memory exhausted");
        self.mem
            .memory()
            .write_slice(&vec![fill; to_usize(len)], GuestAddress(at))
            .unwrap();
        at
    }

    fn put(&mut self, bytes: &[u8]) -> u64 {
        let at = self.alloc(bytes.len() as u64, 0);
        self.mem
            .memory()
            .write_slice(bytes, GuestAddress(at))
            .unwrap();
        at
    }

    /// Writes a chain of (gpa, len, device-writable) into fresh table
    /// slots and makes it available. Slots are never reused, so every
    /// head is unique within a test.
    fn add_chain(&mut self, descs: &[(u64, u32, bool)]) -> u16 {
        let m = self.mem.memory();
        let first = self.next_desc;
        assert!(
            usize::from(first) + descs.len() <= usize::from(QUEUE_SIZE),
            "descriptor table exhausted"
        );
        for (i, &(addr, len, w)) in descs.iter().enumerate() {
            let slot = first + u16::try_from(i).unwrap();
            let mut flags = if w { F_WRITE } else { 0 };
            if i + 1 < descs.len() {
                flags |= F_NEXT;
            }
            let at = DESC + 16 * u64::from(slot);
            m.write_obj(addr, GuestAddress(at)).unwrap();
            m.write_obj(len, GuestAddress(at + 8)).unwrap();
            m.write_obj(flags, GuestAddress(at + 12)).unwrap();
            m.write_obj(slot + 1, GuestAddress(at + 14)).unwrap();
        }
        self.next_desc += u16::try_from(descs.len()).unwrap();
        let ring_slot = u64::from(self.avail_idx % QUEUE_SIZE);
        m.write_obj(first, GuestAddress(AVAIL + 4 + 2 * ring_slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        m.write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
        first
    }

    fn request(&mut self, t: u32, sector: u64, data: &[(u64, u32, bool)]) -> Req {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        let hdr = self.put(&h);
        let status = self.alloc(1, UNTOUCHED);
        let mut descs = vec![(hdr, 16, false)];
        descs.extend_from_slice(data);
        descs.push((status, 1, true));
        let head = self.add_chain(&descs);
        Req {
            head,
            status,
            data: data.iter().map(|&(a, l, _)| (a, l)).collect(),
        }
    }

    pub fn write(&mut self, sector: u64, bytes: &[u8]) -> Req {
        let at = self.put(bytes);
        self.request(
            T_OUT,
            sector,
            &[(at, u32::try_from(bytes.len()).unwrap(), false)],
        )
    }

    /// A read into buffers of the given lengths, pre-filled with `fill`.
    pub fn read(&mut self, sector: u64, lens: &[u32], fill: u8) -> Req {
        let bufs: Vec<(u64, u32, bool)> = lens
            .iter()
            .map(|&l| (self.alloc(u64::from(l), fill), l, true))
            .collect();
        self.request(T_IN, sector, &bufs)
    }

    pub fn flush(&mut self) -> Req {
        self.request(T_FLUSH, 0, &[])
    }

    pub fn get_id(&mut self) -> Req {
        let at = self.alloc(20, 0);
        self.request(T_GET_ID, 0, &[(at, 20, true)])
    }

    /// DISCARD or WRITE_ZEROES with ranges (sector, sectors, flags).
    pub fn zeroing(&mut self, t: u32, ranges: &[(u64, u32, u32)]) -> Req {
        let mut seg = Vec::new();
        for &(sector, n, flags) in ranges {
            seg.extend_from_slice(&sector.to_le_bytes());
            seg.extend_from_slice(&n.to_le_bytes());
            seg.extend_from_slice(&flags.to_le_bytes());
        }
        let at = self.put(&seg);
        self.request(t, 0, &[(at, u32::try_from(seg.len()).unwrap(), false)])
    }

    pub fn status(&self, r: &Req) -> u8 {
        self.mem.memory().read_obj(GuestAddress(r.status)).unwrap()
    }

    /// The request's data buffers, concatenated.
    pub fn data(&self, r: &Req) -> Vec<u8> {
        let m = self.mem.memory();
        let mut out = Vec::new();
        for &(a, l) in &r.data {
            let mut b = vec![0u8; l as usize];
            m.read_slice(&mut b, GuestAddress(a)).unwrap();
            out.extend(b);
        }
        out
    }

    /// The used ring's entries so far: (head, used len).
    pub fn used(&self) -> Vec<(u16, u32)> {
        let m = self.mem.memory();
        let idx: u16 = m.read_obj(GuestAddress(USED + 2)).unwrap();
        (0..idx)
            .map(|i| {
                let e = USED + 4 + 8 * u64::from(i % QUEUE_SIZE);
                let id: u32 = m.read_obj(GuestAddress(e)).unwrap();
                let len: u32 = m.read_obj(GuestAddress(e + 4)).unwrap();
                (u16::try_from(id).unwrap(), len)
            })
            .collect()
    }

    pub fn is_used(&self, r: &Req) -> bool {
        self.used().iter().any(|&(h, _)| h == r.head)
    }

    /// Chains made available.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Chains the device has taken off the avail ring.
    pub fn taken(&self) -> u16 {
        self.vq.lock().queue.next_avail()
    }
}
