//! The binaries a server carries for its tentacles (the deployment tool, the
//! tentacle itself): where they are found, and asking one its version.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long `BINARY version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// Tries to run a file written a moment ago at most this many times: a child
/// that another thread forked while the file was open for writing holds it
/// until it execs, and running the file then fails with ETXTBSY.
const TEXT_BUSY_TRIES: u32 = 50;

/// `file` beside the running binary, or in the folder above it (`cargo
/// test`'s `deps/`), when it is there.
pub(crate) fn beside_this_binary(file: &str) -> Option<PathBuf> {
    let me = std::env::current_exe().ok()?;
    let dir = me.parent()?;
    let found = [Some(dir), dir.parent()]
        .into_iter()
        .flatten()
        .map(|d| d.join(file))
        .find(|p| p.is_file());
    found
}

/// What `path args` printed on its standard output, when it answered in time
/// and succeeded; otherwise why not, naming `what` the binary is.
pub(crate) async fn output_of(path: &Path, args: &[&str], what: &str) -> Result<Vec<u8>, String> {
    let command = || format!("`{} {}`", path.display(), args.join(" "));
    let mut tries = 0;
    let out = loop {
        tries += 1;
        let run = tokio::process::Command::new(path)
            .args(args)
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(VERSION_TIMEOUT, run).await {
            Ok(Err(e))
                if e.kind() == std::io::ErrorKind::ExecutableFileBusy
                    && tries < TEXT_BUSY_TRIES =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => break other,
        }
    };
    match out {
        Ok(Ok(out)) if out.status.success() => Ok(out.stdout),
        Ok(Ok(out)) => Err(format!(
            "{} failed ({}): {}",
            command(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(Err(e)) => Err(format!("cannot run the {what} {}: {e}", path.display())),
        Err(_) => Err(format!(
            "{} did not answer within {} s",
            command(),
            VERSION_TIMEOUT.as_secs()
        )),
    }
}
