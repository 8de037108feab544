//! The command line.

use std::fmt;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Uniformly random aligned reads.
    Randread,
    /// Uniformly random aligned writes.
    Randwrite,
    /// Sequential reads (each queue walks its own slice of the disk).
    Read,
    /// Sequential writes (each queue walks its own slice of the disk).
    Write,
    /// Random mix of reads and writes (`--rwmixread` percent reads).
    Randrw,
}

impl Pattern {
    pub fn is_sequential(self) -> bool {
        matches!(self, Pattern::Read | Pattern::Write)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.to_possible_value().unwrap();
        f.write_str(s.get_name())
    }
}

/// Drive a vhost-user-blk socket with a fixed-duration I/O load.
#[derive(Debug, Parser)]
#[command(name = "vhost-user-cow-load", version, args_override_self = true)]
pub struct Args {
    /// The vhost-user-blk unix socket.
    #[arg(long, alias = "socket-path", value_name = "PATH")]
    pub socket: PathBuf,
    /// Access pattern.
    #[arg(long, short = 'p', value_enum, default_value_t = Pattern::Randread)]
    pub pattern: Pattern,
    /// Block size (suffixes k, m: 4k, 1m).
    #[arg(long, short = 'b', default_value = "4k", value_parser = parse_size)]
    pub bs: u64,
    /// Requests in flight per queue.
    #[arg(long, short = 'd', alias = "qd", default_value_t = 1)]
    pub iodepth: usize,
    /// Virtqueues (one thread each).
    #[arg(long, short = 'q', default_value_t = 1)]
    pub queues: usize,
    /// Measured run time in seconds.
    #[arg(long, short = 't', default_value_t = 10.0)]
    pub runtime: f64,
    /// Warm-up seconds before measuring (I/O runs, nothing is counted).
    #[arg(long, default_value_t = 0.0)]
    pub ramp: f64,
    /// Percentage of reads for --pattern randrw.
    #[arg(long, default_value_t = 70)]
    pub rwmixread: u32,
    /// Only touch the first SIZE bytes of the disk (default: all of it).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,
    /// Stop after this many bytes per queue, or at --runtime.
    #[arg(long, value_parser = parse_size)]
    pub io_limit: Option<u64>,
    /// Random patterns visit every block once, in a random order, before
    /// any block repeats (like fio's random map): each queue walks a
    /// permutation of its own share of the blocks.
    #[arg(long)]
    pub random_map: bool,
    /// Stop when each queue has covered its share of the disk once
    /// (sequential patterns, or random ones with --random-map).
    #[arg(long)]
    pub once: bool,
    /// The daemon's pid: sample its CPU time and memory.
    #[arg(long)]
    pub pid: Option<i32>,
    /// Busy-poll for completions (poll queues) instead of sleeping on the
    /// completion eventfd.
    #[arg(long)]
    pub poll: bool,
    /// Virtqueue size (default: enough for --iodepth, at least 256).
    #[arg(long)]
    pub queue_size: Option<u32>,
    /// Data check: writes put a 16-byte stamp (the sector's byte offset and
    /// this value) at the start of every 512-byte sector ...
    #[arg(long, value_name = "TAG")]
    pub stamp: Option<u64>,
    /// ... and reads check that every sector carries the stamp for its own
    /// offset and this tag (a mismatch counts as an error).
    #[arg(long, value_name = "TAG")]
    pub check: Option<u64>,
    /// Seed for the offset generator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print the result as JSON (one object) instead of text.
    #[arg(long)]
    pub json: bool,
    /// A label copied into the result.
    #[arg(long)]
    pub label: Option<String>,
}

impl Args {
    /// What clap cannot check by itself.
    pub fn validate(&self) -> Result<(), String> {
        if self.bs == 0 || self.bs % 512 != 0 {
            return Err("--bs must be a non-zero multiple of 512".into());
        }
        if self.iodepth == 0 || self.queues == 0 {
            return Err("--iodepth and --queues must be at least 1".into());
        }
        if self.rwmixread > 100 {
            return Err("--rwmixread is a percentage".into());
        }
        if self.once && !self.pattern.is_sequential() && !self.random_map {
            return Err("--once with a random pattern needs --random-map".into());
        }
        Ok(())
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t
        .strip_suffix("ib")
        .or_else(|| t.strip_suffix('b'))
        .unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('t') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 4096, 4k, 1m)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("x").is_err());
    }

    #[test]
    fn validation() {
        let v = |extra: &[&str]| {
            Args::try_parse_from(["load", "--socket", "s"].iter().chain(extra))
                .unwrap()
                .validate()
        };
        assert!(v(&[]).is_ok());
        assert!(v(&["--bs", "1000"]).is_err());
        assert!(v(&["--iodepth", "0"]).is_err());
        assert!(v(&["--rwmixread", "101"]).is_err());
        assert!(v(&["--once"]).is_err(), "random --once without a map");
        assert!(v(&["--once", "--random-map"]).is_ok());
        assert!(v(&["--once", "--pattern", "read"]).is_ok());
    }
}
