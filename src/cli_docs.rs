//! Man pages and shell completions generated from the command line's
//! clap definitions (`vhost-user-cow generate-docs DIR`, run by
//! `scripts/install.sh`), so they never drift from `--help`.

use std::io;
use std::path::{Path, PathBuf};

use clap::Command;
use clap_complete::Shell;

/// The shells completions are written for, and where each file goes
/// under DIR/completions/ (named as each shell looks them up).
pub const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// Writes `DIR/man1/*.1` (one page for the program, one per visible
/// subcommand) and the completions of the program `name`, `DIR/completions/{bash,zsh,fish}/...`; returns the
/// files written.
pub fn generate_docs(cmd: Command, name: &'static str, dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let man = dir.join("man1");
    std::fs::create_dir_all(&man)?;
    clap_mangen::generate_to(cmd.clone(), &man)?;
    written.extend(files_in(&man)?);

    let mut visible = without_hidden_subcommands(cmd, name);
    for shell in SHELLS {
        let out = dir.join("completions").join(shell.to_string());
        std::fs::create_dir_all(&out)?;
        let file = clap_complete::generate_to(shell, &mut visible, name, &out)?;
        if shell == Shell::Bash {
            fix_bash_hyphens(&file, name)?;
        }
        written.push(file);
    }
    Ok(written)
}

/// clap_complete's bash script spells the state of a subcommand of a
/// hyphenated program two ways (clap-rs/clap#6421): the loop that finds
/// the subcommand says `vhost__user__cow__subcmd__serve`, the arm that
/// completes its options `vhost__subcmd__user__subcmd__cow__subcmd__serve`,
/// so no option after a subcommand would ever complete. The arms are
/// respelled the loop's way.
fn fix_bash_hyphens(file: &Path, name: &str) -> io::Result<()> {
    let script = std::fs::read_to_string(file)?;
    let wrong = name.replace('-', "__subcmd__");
    let right = name.replace('-', "__");
    std::fs::write(file, script.replace(&wrong, &right))
}

fn files_in(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<io::Result<_>>()?;
    v.sort();
    Ok(v)
}

/// The command without its hidden subcommands (such as `generate-docs`):
/// `clap_mangen` skips them, `clap_complete` would offer them. The parts
/// are copied unbuilt, so building the copy adds the help and version
/// flags and propagates the global arguments as it does for `cmd`.
fn without_hidden_subcommands(cmd: Command, name: &'static str) -> Command {
    let mut top = Command::new(name)
        // The program's version (the binary and this library are one package).
        .version(env!("CARGO_PKG_VERSION"))
        .propagate_version(cmd.is_propagate_version_set());
    if let Some(about) = cmd.get_about() {
        top = top.about(about.clone());
    }
    for a in cmd.get_arguments() {
        top = top.arg(a.clone());
    }
    for s in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        top = top.subcommand(s.clone());
    }
    top
}
