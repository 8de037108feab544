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

use vhost_user_cow::check::check;
use vhost_user_cow::cow_disk::{create_cow, CreateOptions};
use vhost_user_cow::cow_header::DEFAULT_ALIGNMENT;
use vhost_user_cow::info::inspect;
use vhost_user_cow::merge::{merge, MergeOptions, MergeTarget};

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
}

#[derive(Debug, Args)]
struct CreateArgs {
    /// The COW file to create.
    cow: PathBuf,
    /// The backing file (recorded with an absolute path).
    #[arg(long, short = 'b')]
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
    file: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Compare against this backing file instead of the header's.
    #[arg(long, short = 'b')]
    backing: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct CheckArgs {
    file: PathBuf,
    /// Check against this backing file instead of the header's.
    #[arg(long, short = 'b')]
    backing: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["into", "in_place"])))]
struct MergeArgs {
    cow: PathBuf,
    /// Write the merged disk to this new (sparse) raw image.
    #[arg(long, value_name = "NEW_IMAGE")]
    into: Option<PathBuf>,
    /// Write the COW sectors into the backing file itself.
    #[arg(long)]
    in_place: bool,
    /// Use this backing file instead of the header's (like `uml_moo -b`).
    #[arg(long, short = 'b')]
    backing: Option<PathBuf>,
    /// Replace an existing NEW_IMAGE.
    #[arg(long, short)]
    force: bool,
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

fn init_logging(verbose: u8) {
    let mut b = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"));
    let level = match verbose {
        0 => None,
        1 => Some(log::LevelFilter::Info),
        2 => Some(log::LevelFilter::Debug),
        _ => Some(log::LevelFilter::Trace),
    };
    if let Some(l) = level {
        b.filter_level(l);
    }
    b.init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Create(a) => cmd_create(a),
        Command::Info(a) => cmd_info(a),
        Command::Check(a) => cmd_check(a),
        Command::Merge(a) => cmd_merge(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{PROG}: {}", chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
