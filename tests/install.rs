//! `scripts/install.sh` under a temporary prefix, and what it installs:
//! the vhost-user convention file against the installed program's
//! `--print-capabilities`, a man page per subcommand, shell completions
//! that complete, and the systemd units, checked by `systemd-analyze
//! verify` and run through `systemd-socket-activate` with the unit's own
//! command line while a vhost-user client connects.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::vhost_frontend::{FrontendOptions, VhostUserBlk};
use common::*;

const SUBCOMMANDS: [&str; 7] = ["create", "info", "check", "merge", "rebase", "serve", "ctl"];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn text(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

/// Runs the install script with the test build of the binary.
fn install(prefix: &Path) {
    let o = output(
        Command::new("bash")
            .arg(repo().join("scripts/install.sh"))
            .arg("--prefix")
            .arg(prefix)
            .arg("--binary")
            .arg(bin()),
    );
    assert!(o.status.success(), "install.sh failed: {}", text(&o));
}

fn need(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    // scripts/test.sh installs them; without CI a missing tool skips.
    assert!(
        found || std::env::var_os("CI").is_none(),
        "{tool} is not installed (scripts/test.sh installs it)"
    );
    found
}

#[test]
fn the_vhost_user_json_names_the_installed_block_backend() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("usr");
    install(&prefix);

    let installed = prefix.join("bin/vhost-user-cow");
    assert!(
        std::fs::read(&installed).unwrap() == std::fs::read(bin()).unwrap(),
        "the installed binary is not the built one"
    );
    let json_path = prefix.join("share/qemu/vhost-user/50-vhost-user-cow.json");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
    assert!(json["description"].as_str().is_some_and(|d| !d.is_empty()));
    let binary = PathBuf::from(json["binary"].as_str().expect("binary is a string"));
    assert!(
        binary.is_absolute() && binary.starts_with(&prefix),
        "{binary:?}"
    );

    // The program the file names is what QEMU and libvirt run: it must
    // answer --print-capabilities with the file's type, and be ours.
    let o = output(Command::new(&binary).arg("--print-capabilities"));
    assert!(o.status.success(), "{}", text(&o));
    let caps: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(json["type"], "block");
    assert_eq!(caps["type"], json["type"]);
    let features: Vec<&str> = caps["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert_eq!(features, ["read-only", "blk-file"]);
    let script = std::fs::read_to_string(&binary).unwrap();
    assert!(
        script.contains(&format!("exec {} serve", installed.display())),
        "{binary:?} does not run the installed binary:\n{script}"
    );
    // The options the conventions promise for a block backend.
    let o = output(Command::new(&binary).arg("--help"));
    for opt in [
        "--socket-path",
        "--fd",
        "--print-capabilities",
        "--read-only",
    ] {
        assert!(text(&o).contains(opt), "serve --help lacks {opt}");
    }
    let o = output(Command::new(&binary).args(["--blk-file", "/nonexistent", "--fd", "99"]));
    assert!(
        text(&o).contains("/nonexistent"),
        "--blk-file is not the disk option: {}",
        text(&o)
    );
}

#[test]
fn a_man_page_per_subcommand_and_completions_that_complete() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("usr");
    install(&prefix);
    let man = prefix.join("share/man/man1");
    let mut pages = vec![man.join("vhost-user-cow.1")];
    pages.extend(SUBCOMMANDS.map(|s| man.join(format!("vhost-user-cow-{s}.1"))));
    let mut found: Vec<_> = std::fs::read_dir(&man)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    found.sort();
    pages.sort();
    assert_eq!(
        found, pages,
        "one page per subcommand, hidden ones left out"
    );
    if need("man") {
        for p in &pages {
            let o = output(Command::new("man").arg("-l").arg(p).env("MANWIDTH", "100"));
            assert!(o.status.success(), "{}: {}", p.display(), text(&o));
            let page = String::from_utf8_lossy(&o.stdout);
            assert!(page.contains("NAME") && page.contains("SYNOPSIS"), "{page}");
        }
        let o = output(
            Command::new("man")
                .arg("-l")
                .arg(man.join("vhost-user-cow-rebase.1")),
        );
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("--unsafe"),
            "{}",
            text(&o)
        );
    }

    // bash: the subcommands, then a subcommand's own options.
    let bash = prefix.join("share/bash-completion/completions/vhost-user-cow");
    let complete = |words: &str| {
        let script = format!(
            "source '{}'; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
             _vhost__user__cow vhost-user-cow \"${{COMP_WORDS[COMP_CWORD]}}\" \
             \"${{COMP_WORDS[COMP_CWORD-1]}}\"; echo \"${{COMPREPLY[*]}}\"",
            bash.display()
        );
        let o = output(Command::new("bash").args(["--norc", "-c", &script]));
        assert!(o.status.success(), "{}", text(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    };
    let subs = complete("vhost-user-cow ''");
    for s in SUBCOMMANDS {
        assert!(subs.split(' ').any(|w| w == s), "{s} not offered: {subs}");
    }
    assert!(!subs.contains("generate-docs"), "hidden offered: {subs}");
    assert_eq!(complete("vhost-user-cow reb"), "rebase");
    assert_eq!(complete("vhost-user-cow serve --socket-p"), "--socket-path");
    assert_eq!(complete("vhost-user-cow rebase --un"), "--unsafe");
    let zsh =
        std::fs::read_to_string(prefix.join("share/zsh/site-functions/_vhost-user-cow")).unwrap();
    assert!(zsh.starts_with("#compdef vhost-user-cow") && zsh.contains("--unsafe"));
    let fish =
        std::fs::read_to_string(prefix.join("share/fish/vendor_completions.d/vhost-user-cow.fish"))
            .unwrap();
    assert!(fish.contains("using_subcommand rebase\" -l unsafe"));
}

fn unit(prefix: &Path, name: &str) -> PathBuf {
    prefix.join("lib/systemd/system").join(name)
}

/// `systemd-analyze verify` on the installed template units; the man
/// pages they cite are found under the prefix.
fn verify(prefix: &Path) -> std::process::Output {
    output(
        Command::new("systemd-analyze")
            .arg("verify")
            .arg(unit(prefix, "vhost-user-cow@.socket"))
            .arg(unit(prefix, "vhost-user-cow@.service"))
            .env("MANPATH", prefix.join("share/man"))
            .env("SYSTEMD_LOG_LEVEL", "notice"),
    )
}

#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    if !need("systemd-analyze") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("usr");
    install(&prefix);
    let o = verify(&prefix);
    assert!(o.status.success(), "verify: {}", text(&o));
    // verify loads every installed unit; other packages' units may draw
    // warnings of their own (a newer libvirt's Type=notify-reload).
    let out = text(&o);
    let ours: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("vhost-user-cow"))
        .collect();
    assert!(ours.is_empty(), "verify complained: {ours:?}");
    // It does check ExecStart: without the binary it fails.
    std::fs::remove_file(prefix.join("bin/vhost-user-cow")).unwrap();
    let o = verify(&prefix);
    assert!(
        !o.status.success() && text(&o).contains("vhost-user-cow"),
        "verify passed without the binary: {}",
        text(&o)
    );
}

/// The value of `key=` in a unit file (the first one).
fn unit_value(unit: &str, key: &str) -> String {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in\n{unit}"))
        .to_owned()
}

/// ExecStart as systemd would run it for instance `instance`: the
/// specifiers and variables the unit uses expanded, unquoted `$VAR`
/// split on whitespace.
fn exec_start(service: &str, instance: &str, env: &[(&str, &str)]) -> Vec<String> {
    let line = unit_value(service, "ExecStart");
    let mut argv = Vec::new();
    for word in line.split_whitespace() {
        let mut w = word.replace("%i", instance).replace("%I", instance);
        assert!(!w.contains('%'), "unexpanded specifier in {word}");
        if let Some(var) = w.strip_prefix('$').filter(|v| !v.starts_with('{')) {
            let value = env.iter().find(|(k, _)| *k == var).map_or("", |(_, v)| *v);
            argv.extend(value.split_whitespace().map(str::to_owned));
            continue;
        }
        for (k, v) in env {
            w = w.replace(&format!("${{{k}}}"), v);
        }
        assert!(!w.contains('$'), "unexpanded variable in {word}");
        argv.push(w);
    }
    argv
}

/// Kills the process on drop unless it was waited for.
struct Reaped(Option<Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn exe_of(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

#[test]
fn socket_activation_with_the_units_command_line_serves_a_client() {
    if !need("systemd-socket-activate") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let prefix = d.join("usr");
    install(&prefix);
    let service = std::fs::read_to_string(unit(&prefix, "vhost-user-cow@.service")).unwrap();
    let socket_unit = std::fs::read_to_string(unit(&prefix, "vhost-user-cow@.socket")).unwrap();

    // Instance "disk1.cow": the disk is STATE_DIRECTORY/disk1.cow, the
    // socket %t/vhost-user-cow/disk1.cow.sock.
    let state = d.join("state");
    let run = d.join("run");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::create_dir_all(run.join("vhost-user-cow")).unwrap();
    let backing = d.join("base.img");
    let mut rng = Rng::new(3);
    let base = rng.bytes(4 << 20);
    write_file(&backing, &base);
    let cow = state.join("disk1.cow");
    let o = output(
        Command::new(bin())
            .arg("create")
            .arg(&cow)
            .arg("-b")
            .arg(&backing),
    );
    assert!(o.status.success(), "{}", text(&o));

    let listen = unit_value(&socket_unit, "ListenStream")
        .replace("%t", &run.display().to_string())
        .replace("%i", "disk1.cow");
    let sock = PathBuf::from(&listen);
    let argv = exec_start(
        &service,
        "disk1.cow",
        &[
            ("STATE_DIRECTORY", &state.display().to_string()),
            ("VHOST_USER_COW_ARGS", "--num-queues 2 --serial disk1"),
        ],
    );
    assert_eq!(
        argv[0],
        prefix.join("bin/vhost-user-cow").display().to_string()
    );
    assert!(argv.contains(&"--fd".to_owned()), "{argv:?}");

    let log = d.join("daemon.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let child = {
        let _g = fork_guard();
        Command::new("systemd-socket-activate")
            .arg("--listen")
            .arg(&sock)
            .args(&argv)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap()
    };
    let mut child = Reaped(Some(child));
    let pid = child.0.as_ref().unwrap().id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no socket {listen}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Socket activation: nothing runs the daemon before a client comes.
    assert!(
        exe_of(pid).ends_with("systemd-socket-activate"),
        "{}",
        exe_of(pid)
    );

    let opts = FrontendOptions {
        num_queues: 2,
        ..Default::default()
    };
    let data = rng.bytes(64 << 10);
    {
        let mut blk = VhostUserBlk::connect(&sock, opts.clone()).unwrap();
        blk.set_daemon_log(&log);
        assert_eq!(blk.config.capacity, (4 << 20) / 512);
        assert!(exe_of(pid).ends_with("vhost-user-cow"), "{}", exe_of(pid));
        let p = blk.submit_write(1, 100, &data);
        blk.complete(p, "write").ok("write");
        let p = blk.submit_flush(0);
        blk.complete(p, "flush").ok("flush");
        blk.disconnect().unwrap();
    }
    // The same daemon serves the next connection.
    {
        let mut blk = VhostUserBlk::connect(&sock, opts).unwrap();
        blk.set_daemon_log(&log);
        let p = blk.submit_read(0, 100, data.len());
        assert!(
            blk.complete(p, "read").ok("read") == data,
            "read back differs"
        );
        let p = blk.submit_read(1, 0, 512);
        assert!(
            blk.complete(p, "read").ok("read") == base[..512],
            "backing differs"
        );
        let p = blk.submit_get_id(0, 20);
        assert_eq!(&blk.complete(p, "get id").ok("get id")[..5], b"disk1");
        blk.disconnect().unwrap();
    }

    // systemd stops it with SIGTERM: a clean exit.
    // SAFETY: plain kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) }, 0);
    let mut c = child.0.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = c.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            let _ = c.wait();
            panic!("no exit 20 s after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut log_text = String::new();
    std::fs::File::open(&log)
        .unwrap()
        .read_to_string(&mut log_text)
        .unwrap();
    assert!(status.success(), "{status:?}\n{log_text}");
    assert!(log_text.contains("fd 3"), "not served on fd 3:\n{log_text}");
    let o = output(Command::new(bin()).arg("check").arg(&cow));
    assert!(o.status.success(), "{}", text(&o));
}
