//! The `vhost-user-cow` command line. Each subcommand is one small function
//! that turns its arguments into a call to a library module; adding a
//! subcommand means adding an enum variant, an args struct and a function.
//!
//! Exit codes: 0 success; 1 failure (the message goes to stderr as
//! `vhost-user-cow: <message>`); 2 usage errors (from clap). `check` has its
//! own: 0 clean, 1 problems found, 2 unusable.

use std::error::Error;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, ArgGroup, Args, Parser, Subcommand};

use vhost_user_cow::daemon::throttle::{self, Limit, Unit};
use vhost_user_cow::format::header::DEFAULT_ALIGNMENT;
use vhost_user_cow::format::{create_cow, CreateOptions, DiskFormat};
use vhost_user_cow::tools::check::check;
use vhost_user_cow::tools::info::inspect;
use vhost_user_cow::tools::merge::{merge, MergeOptions, MergeTarget};

const PROG: &str = "vhost-user-cow";

#[derive(Debug, Parser)]
#[command(name = PROG, version, about, propagate_version = true)]
struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace); overrides RUST_LOG.
    #[arg(short, long, action = ArgAction::Count, global = true)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a COW file over a backing file (like `uml_mkcow`).
    Create(CreateArgs),
    /// Show what a COW file or raw image is and how it relates to its backing file.
    Info(InfoArgs),
    /// Check a COW file; exit 0 clean, 1 problems found, 2 unusable.
    Check(CheckArgs),
    /// Merge a COW file with its backing file (like `uml_moo`).
    Merge(MergeArgs),
    /// Record another backing file, or its new mtime, in a COW header
    /// (like `qemu-img rebase -u`).
    Rebase(RebaseArgs),
    /// Serve a COW disk or raw image over vhost-user-blk.
    Serve(Box<ServeArgs>),
    /// Send a command to a serving daemon's control socket.
    Ctl(CtlArgs),
    /// Write the man pages and shell completions into DIR (scripts/install.sh).
    #[command(hide = true)]
    GenerateDocs(GenerateDocsArgs),
}

#[derive(Debug, Args)]
struct CtlArgs {
    /// The daemon's control socket (serve --control-socket).
    #[arg(value_name = "SOCKET")]
    socket: PathBuf,
    /// The command (`query-commands` lists them), `events` to print the
    /// daemon's events as they happen, or `backup TARGET` to copy the disk
    /// into a new file TARGET (created here and passed to the daemon).
    #[arg(value_name = "COMMAND")]
    command: String,
    /// The command's arguments as key=value (values in JSON, or strings);
    /// for `backup`, the target file.
    #[arg(value_name = "KEY=VALUE")]
    args: Vec<String>,
    /// With `backup`: return once the job started instead of waiting for
    /// its end.
    #[arg(long)]
    no_wait: bool,
    /// Print the answer (or each event) as JSON.
    #[arg(long)]
    json: bool,
    /// With `events`: stop after this many.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Seconds to wait for an answer (or, with `events`, for each event).
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    timeout: f64,
}

#[derive(Debug, Args)]
struct GenerateDocsArgs {
    /// The directory to write man1/ and completions/ into.
    #[arg(value_name = "DIR")]
    dir: PathBuf,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum SeccompArg {
    Kill,
    Log,
    Off,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum SandboxArg {
    Namespace,
    Chroot,
    None,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum FormatArg {
    Raw,
    Cow,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum EngineArg {
    #[value(name = "io_uring")]
    IoUring,
    Threads,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("listen").args(["socket_path", "fd"])))]
#[command(group(ArgGroup::new("cache").args(["direct", "sync"])))]
struct ServeArgs {
    /// The unix socket to listen on (created mode 0600).
    #[arg(
        long,
        alias = "socket",
        value_name = "PATH",
        required_unless_present_any = ["fd", "print_capabilities", "export"],
        requires = "disk"
    )]
    socket_path: Option<PathBuf>,
    /// An inherited listening socket (systemd socket activation).
    #[arg(long, value_name = "N")]
    fd: Option<i32>,
    /// Print the vhost-user backend capabilities as JSON and exit.
    #[arg(long)]
    print_capabilities: bool,
    /// The COW file or raw image to serve.
    #[arg(
        long,
        alias = "blk-file",
        value_name = "FILE",
        required_unless_present_any = ["print_capabilities", "export"]
    )]
    disk: Option<PathBuf>,
    /// Another disk for this process to serve on its own socket:
    /// disk=FILE,socket=PATH[,backing=FILE][,format=cow|raw]
    /// [,control=PATH][,serial=S][,read-only=on] (paths without commas).
    /// Repeat for more, with or without --disk. Each disk has its own
    /// queue threads and scheduler; the other options apply to every disk.
    #[arg(long, value_name = "SPEC", value_parser = parse_export)]
    export: Vec<ExportSpec>,
    /// Backing file to use instead of the one the COW header names (a v3
    /// header is rewritten to name it); with --create, the file to create
    /// the COW file over.
    #[arg(long, short = 'b', value_name = "FILE")]
    backing: Option<PathBuf>,
    /// The disk's format. Without it the format is guessed from the COW
    /// magic, and a guessed raw image refuses guest writes that would give
    /// it that magic.
    #[arg(long, value_enum, value_name = "FORMAT")]
    format: Option<FormatArg>,
    /// The same as --format raw.
    #[arg(long, conflicts_with = "format")]
    raw: bool,
    /// Create the COW file over --backing if it does not exist.
    #[arg(long, requires = "backing")]
    create: bool,
    /// Refuse writes (the guest sees a read-only disk).
    #[arg(long)]
    read_only: bool,
    /// Queues offered to the frontend. QEMU's vhost-user-blk-pci asks for
    /// one per vCPU and refuses a backend offering fewer.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=64))]
    num_queues: u16,
    /// Maximum virtqueue size.
    #[arg(long, default_value_t = 1024, value_parser = parse_queue_size)]
    queue_size: u16,
    /// Worker threads (default: one per CPU, at most one per queue).
    #[arg(long)]
    threads: Option<usize>,
    /// I/O engine; io_uring falls back to threads if the kernel refuses it.
    #[arg(long, value_enum, default_value = "io_uring")]
    io_engine: EngineArg,
    /// I/O operations in flight per worker thread.
    #[arg(long, default_value_t = 128)]
    queue_depth: usize,
    /// Open the files with O_DIRECT.
    #[arg(long)]
    direct: bool,
    /// Open the files with O_DSYNC.
    #[arg(long)]
    sync: bool,
    /// The GET_ID serial (at most 20 bytes; default: the disk's file name).
    #[arg(long)]
    serial: Option<String>,
    /// Busy-poll this many microseconds after the last request before
    /// sleeping (0: off): the next request then finds the thread awake,
    /// which cuts latency at low queue depth (docs/benchmarks.md).
    #[arg(long, default_value_t = 50)]
    poll_us: u64,
    /// Send buffered writes through the I/O engine instead of doing them
    /// on the queue thread (which is faster, but a write stalled by dirty
    /// page throttling then holds up the thread's other requests).
    #[arg(long)]
    no_inline_writes: bool,
    /// What a system call outside the daemon's allow-list does: end the
    /// process after one line naming it, only log it, or no filter.
    #[arg(long, value_enum, default_value = "kill")]
    seccomp: SeccompArg,
    /// What of the filesystem the daemon still sees once its files are
    /// open: an empty mount namespace (as root, or as an ordinary user
    /// through a user namespace), an empty chroot (root only), or all.
    #[arg(long, value_enum, default_value = "namespace")]
    sandbox: SandboxArg,
    /// An IOPS limit, [read=|write=|total=]RATE[:BURST] (burst: one
    /// second's worth by default); repeat for reads and writes. Requests
    /// over it are delayed, never failed.
    #[arg(long, value_name = "LIMIT", value_parser = parse_iops_limit)]
    throttle_iops: Vec<Limit>,
    /// A bytes-per-second limit, [read=|write=|total=]RATE[:BURST], with
    /// K/M/G suffixes (powers of 1024).
    #[arg(long, value_name = "LIMIT", value_parser = parse_bps_limit)]
    throttle_bps: Vec<Limit>,
    /// A control socket to create (mode as --socket-mode), for
    /// `vhost-user-cow ctl` (docs/control.md).
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Memory for bitmap pages not in use, e.g. 64M or 1G (K, M, G, T:
    /// powers of 1024). A 4 KiB page covers 16 MiB of disk at 512-byte
    /// chunks; pages are read on first use and the least recently used are
    /// dropped beyond this.
    #[arg(long, value_name = "SIZE", default_value = "32M", value_parser = parse_size)]
    bitmap_cache: u64,
    /// Permissions of the socket file, in octal.
    #[arg(long, default_value = "600", value_parser = parse_mode)]
    socket_mode: u32,
}

/// One `--export`: a disk and the options that are its own.
#[derive(Debug, Clone)]
struct ExportSpec {
    disk: PathBuf,
    socket: PathBuf,
    backing: Option<PathBuf>,
    format: Option<FormatArg>,
    control: Option<PathBuf>,
    serial: Option<String>,
    read_only: bool,
}

fn parse_export(s: &str) -> Result<ExportSpec, String> {
    let mut seen = std::collections::HashSet::new();
    let (mut disk, mut socket, mut backing, mut format, mut control, mut serial) =
        (None, None, None, None, None, None);
    let mut read_only = false;
    for part in s.split(',') {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not KEY=VALUE"))?;
        if !seen.insert(key) {
            return Err(format!("{key} given twice"));
        }
        if value.is_empty() {
            return Err(format!("{key} is empty"));
        }
        match key {
            "disk" => disk = Some(PathBuf::from(value)),
            "socket" => socket = Some(PathBuf::from(value)),
            "backing" => backing = Some(PathBuf::from(value)),
            "control" => control = Some(PathBuf::from(value)),
            "serial" => serial = Some(value.to_owned()),
            "format" => {
                format = Some(match value {
                    "cow" => FormatArg::Cow,
                    "raw" => FormatArg::Raw,
                    _ => return Err(format!("format={value}: cow or raw")),
                })
            }
            "read-only" => {
                read_only = match value {
                    "on" => true,
                    "off" => false,
                    _ => return Err(format!("read-only={value}: on or off")),
                }
            }
            _ => {
                return Err(format!(
                    "unknown key {key:?} (disk, socket, backing, format, control, serial, \
                     read-only)"
                ))
            }
        }
    }
    Ok(ExportSpec {
        disk: disk.ok_or("disk=FILE is missing")?,
        socket: socket.ok_or("socket=PATH is missing")?,
        backing,
        format,
        control,
        serial,
        read_only,
    })
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    s.parse::<u16>()
        .ok()
        .filter(|n| n.is_power_of_two() && *n <= 32768)
        .ok_or_else(|| format!("{s:?} is not a power of two from 1 to 32768"))
}

fn parse_iops_limit(s: &str) -> Result<Limit, String> {
    Limit::parse(Unit::Iops, s).map_err(|e| e.to_string())
}

fn parse_bps_limit(s: &str) -> Result<Limit, String> {
    Limit::parse(Unit::Bps, s).map_err(|e| e.to_string())
}

/// A byte count with an optional binary suffix (K, M, G, T).
fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a size (a number, optionally followed by K, M, G or T)");
    let t = s.trim();
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(bad()),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(bad)
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal file mode"))
}

#[derive(Debug, Args)]
struct CreateArgs {
    /// The COW file to create.
    #[arg(value_name = "COW")]
    cow: PathBuf,
    /// The backing file (recorded with an absolute path, its size and mtime).
    #[arg(long, short = 'b', value_name = "FILE")]
    backing: PathBuf,
    /// Bytes covered by one bitmap bit (a power of two, 512..=65536).
    #[arg(long, default_value_t = 512)]
    sector_size: u32,
    /// Alignment of the bitmap and the data area (a power of two).
    #[arg(long, default_value_t = DEFAULT_ALIGNMENT)]
    alignment: u32,
    /// Replace an existing file.
    #[arg(long, short)]
    force: bool,
}

#[derive(Debug, Args)]
struct InfoArgs {
    /// The COW file or raw image to describe.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Compare against this backing file instead of the header's.
    #[arg(long, short = 'b', value_name = "FILE")]
    backing: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// The COW file or raw image to check.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Check against this backing file instead of the header's.
    #[arg(long, short = 'b', value_name = "FILE")]
    backing: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["into", "in_place"])))]
struct MergeArgs {
    /// The COW file to merge.
    #[arg(value_name = "COW")]
    cow: PathBuf,
    /// Write the merged disk to this new (sparse) raw image.
    #[arg(long, value_name = "NEW_IMAGE")]
    into: Option<PathBuf>,
    /// Write the COW sectors into the backing file itself.
    #[arg(long)]
    in_place: bool,
    /// Use this backing file instead of the header's (like `uml_moo -b`).
    #[arg(long, short = 'b', value_name = "FILE")]
    backing: Option<PathBuf>,
    /// Replace an existing NEW_IMAGE.
    #[arg(long, short)]
    force: bool,
}

#[derive(Debug, Args)]
struct RebaseArgs {
    /// The COW file whose header is rewritten (v3 headers only).
    #[arg(value_name = "COW")]
    cow: PathBuf,
    /// The backing file to record: its absolute name and current mtime. Its
    /// size must be the one the header records.
    #[arg(long, short = 'b', value_name = "FILE")]
    backing: PathBuf,
    /// Rewrite the header without comparing any data, like `qemu-img
    /// rebase -u`: right only if FILE holds the data the COW file was made
    /// over. Without it, rebase shows what it would change and refuses.
    #[arg(long = "unsafe")]
    unsafe_: bool,
}

type CmdResult = Result<ExitCode, Box<dyn Error>>;

fn cmd_create(a: CreateArgs) -> CmdResult {
    let opts = CreateOptions {
        sectorsize: a.sector_size,
        alignment: a.alignment,
        force: a.force,
    };
    let header = create_cow(&a.cow, &a.backing, &opts)?;
    log::info!(
        "{}: created over {} ({} bytes)",
        a.cow.display(),
        header.backing_path().display(),
        header.size
    );
    Ok(ExitCode::SUCCESS)
}

fn cmd_info(a: InfoArgs) -> CmdResult {
    let info = inspect(&a.file, a.backing.as_deref())?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        print!("{info}");
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_check(a: CheckArgs) -> CmdResult {
    let report = check(&a.file, a.backing.as_deref());
    for p in &report.problems {
        println!("{p}");
    }
    match &report.fatal {
        Some(e) => eprintln!("{PROG}: unusable: {}", chain(e)),
        None if report.problems.is_empty() => println!(
            "{}: {}: no problems found",
            a.file.display(),
            report.kind.as_deref().unwrap_or("file")
        ),
        None => {}
    }
    Ok(ExitCode::from(report.verdict().exit_code()))
}

fn cmd_ctl(a: CtlArgs) -> CmdResult {
    use vhost_user_cow::control::client::Client;
    use vhost_user_cow::control::ctl::{parse_arguments, readable};

    let timeout = std::time::Duration::try_from_secs_f64(a.timeout)
        .ok()
        .filter(|t| !t.is_zero())
        .ok_or("--timeout must be a positive number of seconds")?;
    let mut client = Client::connect(&a.socket, Some(timeout))?;
    if a.command == "events" {
        if !a.args.is_empty() {
            return Err("events takes no arguments".into());
        }
        if let Err(e) = client.execute("subscribe-events", serde_json::Value::Null)? {
            return Err(format!("subscribe-events: {}", e.desc).into());
        }
        let mut seen = 0;
        while a.count.is_none_or(|n| seen < n) {
            let (name, data) = client.next_event()?;
            if a.json {
                println!("{}", serde_json::json!({ "event": name, "data": data }));
            } else {
                let text = readable(&name, &data);
                println!("{name}");
                print!("{}", textwrap_indent(&text));
            }
            seen += 1;
        }
        return Ok(ExitCode::SUCCESS);
    }
    if a.command == "backup" {
        let [target] = &a.args[..] else {
            return Err("usage: ctl SOCKET backup TARGET (a new file)".into());
        };
        let mut out = std::io::stdout().lock();
        vhost_user_cow::control::ctl_backup::run(
            &mut client,
            std::path::Path::new(target),
            !a.no_wait,
            a.json,
            &mut out,
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    let args = parse_arguments(&a.args)?;
    match client.execute(&a.command, serde_json::Value::Object(args))? {
        Ok(v) if a.json => println!("{}", serde_json::to_string_pretty(&v)?),
        Ok(v) => print!("{}", readable(&a.command, &v)),
        Err(e) => return Err(format!("{}: {} ({:?})", a.command, e.desc, e.class).into()),
    }
    Ok(ExitCode::SUCCESS)
}

/// Indents every line by two spaces (event data under the event's name).
fn textwrap_indent(text: &str) -> String {
    text.lines()
        .filter(|l| *l != "ok")
        .map(|l| format!("  {l}\n"))
        .collect()
}

fn cmd_serve(a: ServeArgs) -> CmdResult {
    use vhost_user_cow::daemon::device::{CacheMode, DeviceOptions};
    use vhost_user_cow::daemon::protocol::ProtocolOptions;
    use vhost_user_cow::daemon::sandbox::SandboxMode;
    use vhost_user_cow::daemon::seccomp::SeccompMode;
    use vhost_user_cow::daemon::serve::{
        serve, Confinement, ExportOptions, ServeOptions, SocketSource,
    };
    use vhost_user_cow::daemon::worker_thread::WorkerOptions;
    use vhost_user_cow::io_engine::EngineKind;

    if a.print_capabilities {
        println!(r#"{{"type": "block", "features": ["read-only", "blk-file"]}}"#);
        return Ok(ExitCode::SUCCESS);
    }
    let mut limits = a.throttle_iops;
    limits.extend(a.throttle_bps);
    if let Err(e) = throttle::validate(&limits) {
        use clap::CommandFactory;
        Cli::command()
            .error(clap::error::ErrorKind::ArgumentConflict, e.to_string())
            .exit();
    }
    let cache = if a.direct {
        CacheMode::Direct
    } else if a.sync {
        CacheMode::Sync
    } else {
        CacheMode::Buffered
    };
    // --disk with the flags that are a disk's own, then every --export.
    let mut specs = Vec::new();
    match a.disk {
        Some(disk) => {
            let socket = match (a.socket_path, a.fd) {
                (Some(path), None) => SocketSource::Path {
                    path,
                    mode: a.socket_mode,
                },
                (None, Some(fd)) => SocketSource::Fd(fd),
                _ => return Err("serve needs --socket-path PATH or --fd N".into()),
            };
            let format = match (a.format, a.raw) {
                (Some(f), _) => Some(f),
                (None, true) => Some(FormatArg::Raw),
                (None, false) => None,
            };
            let spec = (disk, a.backing, format, a.serial, a.read_only);
            specs.push((spec, socket, a.control_socket));
        }
        None => {
            let own = [
                ("--backing", a.backing.is_some()),
                ("--format", a.format.is_some() || a.raw),
                ("--serial", a.serial.is_some()),
                ("--read-only", a.read_only),
                ("--control-socket", a.control_socket.is_some()),
                ("--fd", a.fd.is_some()),
            ];
            if let Some((flag, _)) = own.iter().find(|(_, given)| *given) {
                return Err(format!(
                    "{flag} belongs to --disk; give an --export its own in its SPEC"
                )
                .into());
            }
        }
    }
    for e in a.export {
        let socket = SocketSource::Path {
            path: e.socket,
            mode: a.socket_mode,
        };
        specs.push((
            (e.disk, e.backing, e.format, e.serial, e.read_only),
            socket,
            e.control,
        ));
    }
    let mut exports = Vec::with_capacity(specs.len());
    for ((disk, backing, format, serial, read_only), socket, control_socket) in specs {
        if a.create && !disk.exists() {
            let backing = backing.as_deref().ok_or("--create needs --backing")?;
            create_cow(&disk, backing, &CreateOptions::default())?;
            log::info!("{}: created over {}", disk.display(), backing.display());
        }
        exports.push(ExportOptions {
            device: DeviceOptions {
                disk,
                backing,
                format: match format {
                    Some(FormatArg::Raw) => Some(DiskFormat::Raw),
                    Some(FormatArg::Cow) => Some(DiskFormat::Cow),
                    // What --create makes is a COW file.
                    None if a.create => Some(DiskFormat::Cow),
                    None => None,
                },
                read_only,
                cache,
                serial,
                throttle: limits.clone(),
                bitmap_cache: a.bitmap_cache,
            },
            socket,
            control_socket,
        });
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let opts = ServeOptions {
        exports,
        protocol: ProtocolOptions {
            num_queues: a.num_queues,
            max_queue_size: a.queue_size,
        },
        workers: WorkerOptions {
            threads: a.threads.unwrap_or(cpus),
            engine: match a.io_engine {
                EngineArg::IoUring => EngineKind::IoUring,
                EngineArg::Threads => EngineKind::Threads,
            },
            queue_depth: a.queue_depth.max(1),
            poll: std::time::Duration::from_micros(a.poll_us),
            inline_writes: !a.no_inline_writes,
        },
        confinement: Confinement {
            seccomp: match a.seccomp {
                SeccompArg::Kill => SeccompMode::Kill,
                SeccompArg::Log => SeccompMode::Log,
                SeccompArg::Off => SeccompMode::Off,
            },
            sandbox: match a.sandbox {
                SandboxArg::Namespace => SandboxMode::Namespace,
                SandboxArg::Chroot => SandboxMode::Chroot,
                SandboxArg::None => SandboxMode::None,
            },
        },
    };
    serve(opts)?;
    Ok(ExitCode::SUCCESS)
}

fn cmd_rebase(a: RebaseArgs) -> CmdResult {
    use vhost_user_cow::tools::rebase::{plan, rebase_unsafe, UNSAFE_WARNING};
    if !a.unsafe_ {
        let p = plan(&a.cow, &a.backing)?;
        print!("{p}");
        eprintln!(
            "{PROG}: rebase: refusing without --unsafe: it would rewrite only the header, \
             reading no data (a safe rebase, which copies the sectors where two backing \
             files differ, is not implemented); add --unsafe if {} holds the data {} was \
             made over",
            a.backing.display(),
            a.cow.display()
        );
        return Ok(ExitCode::from(2));
    }
    let p = rebase_unsafe(&a.cow, &a.backing)?;
    print!("{p}");
    eprintln!("{PROG}: {UNSAFE_WARNING}");
    Ok(ExitCode::SUCCESS)
}

fn cmd_generate_docs(a: GenerateDocsArgs) -> CmdResult {
    use clap::CommandFactory;
    for f in vhost_user_cow::cli_docs::generate_docs(Cli::command(), PROG, &a.dir)? {
        println!("{}", f.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_merge(a: MergeArgs) -> CmdResult {
    let target = match a.into {
        Some(p) => MergeTarget::Into(p),
        None => MergeTarget::InPlace,
    };
    let opts = MergeOptions {
        target,
        backing: a.backing,
        force: a.force,
        progress: std::io::stderr().is_terminal(),
    };
    let s = merge(&a.cow, &opts)?;
    log::info!(
        "{}: {} bytes, {} of them from {}",
        s.output.display(),
        s.size,
        s.cow_bytes,
        a.cow.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// The message of an error and of its sources, skipping sources whose
/// text the message already contains (many errors embed their source).
fn chain(e: &dyn Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !msg.contains(&t) {
            msg.push_str(": ");
            msg.push_str(&t);
        }
        src = s.source();
    }
    msg
}

fn init_logging(verbose: u8, default: &str) {
    let mut b =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default));
    let level = match verbose {
        0 => None,
        1 => Some(log::LevelFilter::Info),
        2 => Some(log::LevelFilter::Debug),
        _ => Some(log::LevelFilter::Trace),
    };
    if let Some(l) = level {
        b.filter_level(l);
    }
    let logger = b.build();
    log::set_max_level(logger.filter());
    // A daemon serving several disks says which one each line is about.
    let _ = log::set_boxed_logger(Box::new(vhost_user_cow::log_tag::TaggedLogger(logger)));
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon says what it serves and what it counted; tools stay quiet.
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    init_logging(cli.verbose, default_level);
    if !matches!(cli.command, Command::Serve(_)) {
        // A tool whose output goes to a closed pipe (`info | head`) ends
        // quietly, as other command-line tools do, instead of panicking in
        // println!. The daemon keeps SIGPIPE ignored: a frontend that goes
        // away must not kill it.
        // SAFETY: setting a signal's disposition to the default, before
        // any other thread exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match cli.command {
        Command::Create(a) => cmd_create(a),
        Command::Info(a) => cmd_info(a),
        Command::Check(a) => cmd_check(a),
        Command::Merge(a) => cmd_merge(a),
        Command::Rebase(a) => cmd_rebase(a),
        Command::GenerateDocs(a) => cmd_generate_docs(a),
        Command::Serve(a) => cmd_serve(*a),
        Command::Ctl(a) => cmd_ctl(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{PROG}: {}", chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
