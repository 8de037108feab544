//! A second, independent vhost-user-blk client for the end-to-end tests
//! (tests/e2e.rs): libblkio's `virtio-blk-vhost-user` driver, in a process
//! of its own.
//!
//! Usage: `blkio-rw SOCKET NUM_QUEUES START_SECTOR SECTORS SEED`
//!
//! Splits `SECTORS` sectors from `START_SECTOR` over the queues, writes a
//! pattern (one byte per disk offset, from `SEED`) in 64 KiB requests, all
//! of a queue's in flight at once, flushes, reads everything back on every
//! queue and verifies it, then write-zeroes the last 64 sectors and checks
//! they read as zeroes. Exits 1 on any error or mismatch, and when the
//! daemon completes nothing for 10 s (a daemon that died leaves libblkio
//! waiting for a completion forever).

#[path = "../convert.rs"]
mod convert;

use std::mem::MaybeUninit;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};

use convert::to_usize;

const SECTOR: u64 = 512;
const REQ_BYTES: u64 = 64 << 10;
/// Requests in flight with no completion for this long: the daemon stalled.
const STALL: Duration = Duration::from_secs(10);

/// Must match `blkio_pattern` in tests/e2e.rs.
fn pattern(seed: u64, offset: u64) -> u8 {
    ((offset ^ (offset >> 9) ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blkio-rw: {e}");
            ExitCode::FAILURE
        }
    }
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, name: &str) -> Result<T, String> {
    args.get(i)
        .ok_or(format!(
            "missing {name}; usage: blkio-rw SOCKET NUM_QUEUES START_SECTOR SECTORS SEED"
        ))?
        .parse()
        .map_err(|_| format!("bad {name}: {:?}", args[i]))
}

fn e<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> String {
    move |err| format!("{what}: {err}")
}

/// Waits for `n` completions on `q`; each must have succeeded.
fn complete(q: &mut Blkioq, n: usize, what: &str) -> Result<(), String> {
    let mut done = 0;
    let mut last_progress = Instant::now();
    while done < n {
        let mut c = [const { MaybeUninit::<Completion>::uninit() }; 16];
        let want = (n - done).min(c.len());
        // Wake up now and then to notice a daemon that stopped answering.
        let mut timeout = Duration::from_millis(500);
        let got = match q.do_io(&mut c[..want], 1, Some(&mut timeout), None) {
            Ok(got) => got,
            Err(err) if err.errno() == blkio::Errno::TIME => 0,
            Err(err) => return Err(format!("{what}: do_io: {err}")),
        };
        if got == 0 {
            if last_progress.elapsed() >= STALL {
                return Err(format!(
                    "{what}: stalled: no completion for {} s with {} requests outstanding",
                    STALL.as_secs(),
                    n - done
                ));
            }
            continue;
        }
        last_progress = Instant::now();
        for slot in &c[..got] {
            // SAFETY: do_io initialized the first `got` completions.
            let c = unsafe { slot.assume_init_read() };
            if c.ret != 0 {
                return Err(format!(
                    "{what}: request {} failed: {}",
                    c.user_data,
                    std::io::Error::from_raw_os_error(-c.ret)
                ));
            }
        }
        done += got;
    }
    Ok(())
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let socket: String = arg(&args, 1, "SOCKET")?;
    let num_queues: usize = arg(&args, 2, "NUM_QUEUES")?;
    let start: u64 = arg(&args, 3, "START_SECTOR")?;
    let sectors: u64 = arg(&args, 4, "SECTORS")?;
    let seed: u64 = arg(&args, 5, "SEED")?;
    if num_queues == 0 || sectors < 64 || sectors % num_queues as u64 != 0 {
        return Err("need NUM_QUEUES > 0 and SECTORS >= 64, a multiple of NUM_QUEUES".into());
    }

    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(e("new"))?;
    b.set_str("path", &socket).map_err(e("path"))?;
    b.connect().map_err(e("connect"))?;
    let nq = i32::try_from(num_queues).map_err(|_| "NUM_QUEUES too large".to_string())?;
    b.set_i32("num-queues", nq).map_err(e("num-queues"))?;
    let mut queues = b.start().map_err(e("start"))?.queues;
    let capacity = b.get_u64("capacity").map_err(e("capacity"))?;
    if (start + sectors) * SECTOR > capacity {
        return Err(format!("range past capacity {capacity}"));
    }

    let len = sectors * SECTOR;
    let align = b
        .get_u64("mem-region-alignment")
        .map_err(e("mem-region-alignment"))?
        .max(4096);
    let region_len = (2 * len).div_ceil(align) * align;
    let region = b
        .alloc_mem_region(to_usize(region_len))
        .map_err(e("alloc_mem_region"))?;
    b.map_mem_region(&region).map_err(e("map_mem_region"))?;
    // SAFETY: the region is ours, mapped read-write, region_len bytes long.
    let buf =
        unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, to_usize(region_len)) };
    let (wbuf, rbuf) = buf.split_at_mut(to_usize(len));
    let base = start * SECTOR;
    for (i, byte) in wbuf.iter_mut().enumerate() {
        *byte = pattern(seed, base + i as u64);
    }

    // Each queue writes its share, all its requests in flight together.
    let share = len / num_queues as u64;
    for (qi, q) in queues.iter_mut().enumerate() {
        let mut n = 0;
        let mut off = qi as u64 * share;
        while off < (qi as u64 + 1) * share {
            let l = REQ_BYTES.min((qi as u64 + 1) * share - off);
            q.write(
                base + off,
                wbuf[to_usize(off)..].as_ptr(),
                to_usize(l),
                n,
                ReqFlags::empty(),
            );
            off += l;
            n += 1;
        }
        complete(q, n, "write")?;
    }
    queues[0].flush(0, ReqFlags::empty());
    complete(&mut queues[0], 1, "flush")?;

    // Every queue reads the whole range back.
    for (qi, q) in queues.iter_mut().enumerate() {
        rbuf.fill(0);
        let mut n = 0;
        let mut off = 0;
        while off < len {
            let l = REQ_BYTES.min(len - off);
            q.read(
                base + off,
                rbuf[to_usize(off)..].as_mut_ptr(),
                to_usize(l),
                n,
                ReqFlags::empty(),
            );
            off += l;
            n += 1;
        }
        complete(q, n, "read")?;
        if let Some(i) = (0..to_usize(len)).find(|&i| rbuf[i] != wbuf[i]) {
            return Err(format!(
                "queue {qi}: byte {} of the range reads {:#04x}, wrote {:#04x}",
                i, rbuf[i], wbuf[i]
            ));
        }
    }

    // Write zeroes over the last 64 sectors.
    let zoff = base + len - 64 * SECTOR;
    let q = &mut queues[num_queues - 1];
    q.write_zeroes(zoff, 64 * SECTOR, 0, ReqFlags::empty());
    complete(q, 1, "write zeroes")?;
    rbuf.fill(0xff);
    q.read(
        zoff,
        rbuf.as_mut_ptr(),
        to_usize(64 * SECTOR),
        0,
        ReqFlags::empty(),
    );
    complete(q, 1, "read zeroes")?;
    if rbuf[..to_usize(64 * SECTOR)].iter().any(|&x| x != 0) {
        return Err("write zeroes: range does not read as zeroes".into());
    }
    println!("blkio-rw: {sectors} sectors verified on {num_queues} queues");
    Ok(())
}
