//! Files written so that a crash, a kill or a full disk leaves either the old file or the
//! complete new one: the one `write_atomic` every writer of the crate uses (checkpoints, run
//! states, reports, figures, downloads, ONNX models).

use crate::{Error, Result};
use std::io::Write;
use std::path::Path;

/// Write `bytes` to `path` atomically: a temporary file beside it (`NAME.tmp`), flushed to
/// disk, renamed over `path`, then the directory flushed so that the rename itself survives a
/// crash. The directory must exist (a missing one is an error naming `path`: a typo in an
/// output path should not create directories). On failure the temporary file is removed and
/// the error names `path`, the file the caller asked for.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::io(path, std::io::Error::other("the path has no file name")))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        // Without the fsync a crash after the rename could leave an empty file under the
        // final name.
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    // Persist the rename; best effort, as not every platform can open a directory.
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Ok(d) = std::fs::File::open(dir.unwrap_or(Path::new("."))) {
        let _ = d.sync_all();
    }
    Ok(())
}
