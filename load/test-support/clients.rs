//! For the root package's tests (tests/e2e.rs, tests/load.rs), which
//! include this file with `#[path]`: the libblkio clients of the
//! `vhost-user-cow-load` package, built from the current sources, and a
//! bounded wait for them.
//!
//! `env!("CARGO_BIN_EXE_...")` only names binaries of the test's own
//! package, and a binary of another package found lying in the target
//! directory may be older than its sources; so the first call in a test
//! process runs `cargo build -p vhost-user-cow-load` (a no-op when nothing
//! changed) with the cargo, profile and target directory of this test run,
//! and takes the paths cargo reports.

#![allow(dead_code)] // each test crate uses part of it

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

const PACKAGE: &str = "vhost-user-cow-load";

/// The binary `name` of the `vhost-user-cow-load` package, freshly built.
/// Panics with cargo's output if the build fails.
pub fn client_bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<HashMap<String, PathBuf>, String>> = OnceLock::new();
    match BUILT.get_or_init(build) {
        Ok(bins) => bins
            .get(name)
            .unwrap_or_else(|| panic!("{PACKAGE} has no binary {name:?}: {bins:?}"))
            .clone(),
        Err(e) => panic!("{e}"),
    }
}

fn build() -> Result<HashMap<String, PathBuf>, String> {
    // <target dir>/<profile dir>/vhost-user-cow: the same target dir and
    // profile reuse what this test run already compiled.
    let profile_dir = Path::new(env!("CARGO_BIN_EXE_vhost-user-cow"))
        .parent()
        .unwrap();
    let target_dir = profile_dir.parent().unwrap();
    let profile = match profile_dir.file_name().unwrap().to_str().unwrap() {
        "debug" => "dev",
        other => other,
    };
    // The cargo running the tests (cargo sets CARGO for the test process;
    // nextest may not, hence the one that compiled this test).
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "--offline", "--bins", "--profile", profile])
        .args(["-p", PACKAGE])
        .arg("--message-format=json-render-diagnostics")
        .arg("--manifest-path")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", target_dir);
    let o = cmd
        .output()
        .map_err(|e| format!("running {cargo:?} to build {PACKAGE}: {e}"))?;
    let fail = |why: &str| {
        format!(
            "building {PACKAGE} for the tests ({cmd:?}) {why}:\n{}",
            String::from_utf8_lossy(&o.stderr)
        )
    };
    if !o.status.success() {
        return Err(fail(&format!("failed with {}", o.status)));
    }
    let mut bins = HashMap::new();
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact" {
            if let (Some(name), Some(exe)) =
                (msg["target"]["name"].as_str(), msg["executable"].as_str())
            {
                bins.insert(name.to_owned(), PathBuf::from(exe));
            }
        }
    }
    if bins.is_empty() {
        return Err(fail("reported no binaries"));
    }
    Ok(bins)
}

/// The source files cargo built `bin` from, by its dep-info file
/// (`<bin>.d` next to it, `bin: src1 src2 ...`).
pub fn sources_of(bin: &Path) -> Vec<PathBuf> {
    let d = bin.with_extension("d");
    let text = std::fs::read_to_string(&d)
        .unwrap_or_else(|e| panic!("{}: {e} (cargo writes it with the binary)", d.display()));
    let (_, deps) = text
        .split_once(": ")
        .unwrap_or_else(|| panic!("{}: not a dep-info file: {text}", d.display()));
    // Spaces inside paths are escaped as "\ ".
    let deps = deps.lines().next().unwrap_or("").replace("\\ ", "\0");
    deps.split_whitespace()
        .map(|p| PathBuf::from(p.replace('\0', " ")))
        .collect()
}

fn mtime(p: &Path) -> SystemTime {
    std::fs::metadata(p)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Panics unless `bin` is at least as new as every source it was built
/// from and one of them is `main_source`: a binary built from the current
/// sources, not one left over from older ones.
pub fn assert_built_from(bin: &Path, main_source: &Path) {
    let sources = sources_of(bin);
    assert!(
        sources.iter().any(|s| s == main_source),
        "{} was not built from {}: its sources are {sources:?}",
        bin.display(),
        main_source.display()
    );
    let built = mtime(bin);
    for s in &sources {
        assert!(
            mtime(s) <= built,
            "{} is older than its source {}: a stale binary",
            bin.display(),
            s.display()
        );
    }
}

/// Waits for `child` (spawned with piped stdout and stderr) at most
/// `timeout`; past that, kills it and returns an error carrying what it
/// printed.
pub fn wait_output(mut child: Child, timeout: Duration, what: &str) -> Result<Output, String> {
    // Read the pipes while waiting: a child blocked on a full pipe would
    // look like a hung one.
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(child.stdout.take().map(|r| Box::new(r) as _));
    let err = drain(child.stderr.take().map(|r| Box::new(r) as _));
    let deadline = Instant::now() + timeout;
    let (status, timed_out) = loop {
        if let Some(st) = child.try_wait().expect("wait for child") {
            break (st, false);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            break (child.wait().expect("wait for killed child"), true);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let o = Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    };
    if timed_out {
        return Err(format!(
            "{what} did not finish within {timeout:?} and was killed; it printed:\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(o)
}
