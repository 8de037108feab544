//! `vhost-user-cow ctl SOCKET backup TARGET`: creates the target (a new
//! file, mode 0600), passes it to the daemon with the request, so that a
//! confined daemon needs no access to its path, and unless told not to
//! waits for the job's end, printing its progress.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use serde_json::{json, Value};
use thiserror::Error;

use super::client::{Client, ClientError};

#[derive(Debug, Error)]
pub enum CtlBackupError {
    #[error("{path}: already exists; backup writes a new file and overwrites nothing")]
    Exists { path: String },
    #[error("{path}: cannot create the target: {source}")]
    Create {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("backup: {0}")]
    Refused(String),
    #[error("backup job {id} {status}{}", error.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    Ended {
        id: u64,
        status: String,
        error: Option<String>,
    },
    #[error("write to stdout: {0}")]
    Stdout(#[source] std::io::Error),
}

/// Runs the backup; `wait`: until the job ends. Progress and the result
/// go to `out` (one JSON object per line with `json`).
pub fn run(
    client: &mut Client,
    target: &Path,
    wait: bool,
    json_out: bool,
    out: &mut dyn Write,
) -> Result<(), CtlBackupError> {
    let shown = target.display().to_string();
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(target)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => CtlBackupError::Exists {
                path: shown.clone(),
            },
            _ => CtlBackupError::Create {
                path: shown.clone(),
                source,
            },
        })?;
    let print =
        |out: &mut dyn Write, text: String| writeln!(out, "{text}").map_err(CtlBackupError::Stdout);
    if wait {
        // Before the job starts, so that its end cannot be missed.
        if let Err(e) = client.execute("subscribe-events", Value::Null)? {
            return Err(CtlBackupError::Refused(format!(
                "subscribe-events: {}",
                e.desc
            )));
        }
    }
    let answer = client.execute_with_fd("backup", json!({ "target": shown }), file.as_raw_fd())?;
    drop(file);
    let id = match answer {
        Ok(v) => v["id"].as_u64().unwrap_or(0),
        Err(e) => {
            // Nothing was written to the file this created.
            let _ = std::fs::remove_file(target);
            return Err(CtlBackupError::Refused(e.desc));
        }
    };
    if json_out {
        print(out, json!({ "id": id, "target": shown }).to_string())?;
    } else {
        print(out, format!("backup job {id} started: {shown}"))?;
    }
    if !wait {
        return Ok(());
    }
    loop {
        let (name, data) = client.next_event()?;
        if data["id"].as_u64() != Some(id) {
            continue;
        }
        match name.as_str() {
            "JOB_PROGRESS" if json_out => {
                print(out, json!({ "event": name, "data": data }).to_string())?
            }
            "JOB_PROGRESS" => {
                let done = data["clusters_done"].as_u64().unwrap_or(0);
                let total = data["clusters_total"].as_u64().unwrap_or(0).max(1);
                print(
                    out,
                    format!(
                        "backup job {id}: {}% ({done} of {total} clusters), {} bytes written",
                        done * 100 / total,
                        data["bytes_written"]
                    ),
                )?;
            }
            "JOB_COMPLETED" => {
                let status = data["status"].as_str().unwrap_or("?").to_owned();
                if json_out {
                    print(out, json!({ "event": name, "data": data }).to_string())?;
                } else if status == "completed" {
                    print(
                        out,
                        format!(
                            "backup job {id} completed: {shown}, {} bytes written in {:.1} s",
                            data["bytes_written"],
                            data["elapsed_seconds"].as_f64().unwrap_or(0.0)
                        ),
                    )?;
                }
                if status == "completed" {
                    return Ok(());
                }
                return Err(CtlBackupError::Ended {
                    id,
                    status,
                    error: data["error"].as_str().map(str::to_owned),
                });
            }
            _ => {}
        }
    }
}
