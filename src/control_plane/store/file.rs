//! The single-replica store (SPEC §7), and the fleet mode's last-known-good
//! cache: one JSON file written the safe way: write a temporary file in the
//! same directory, fsync it, rename it over the old one, fsync the
//! directory. A crash (even `kill -9`) leaves either the old or the new
//! file, never a torn one.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Change, Rev, StateStore, StoreError, StoreFuture};
use crate::control_plane::state::RoutingState;

/// Version of the state file format.
const FORMAT_VERSION: u32 = 1;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    version: u32,
    #[serde(flatten)]
    state: RoutingState,
}

/// [`FileFormat`] for writing: borrows the state instead of copying it.
#[derive(Serialize)]
struct FileFormatRef<'a> {
    version: u32,
    #[serde(flatten)]
    state: &'a RoutingState,
}

/// A state file's content (`ctl state import` sends one), or what is wrong
/// with it.
pub(crate) fn decode(bytes: &[u8]) -> Result<RoutingState, String> {
    let file: FileFormat = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if file.version != FORMAT_VERSION {
        return Err(format!(
            "format version {} is not supported (expected {FORMAT_VERSION})",
            file.version
        ));
    }
    for (name, svc) in &file.state.services {
        // Names come from a config that checked them; one that fails the
        // same check (an edited file) would also be an etcd key the
        // fleet's watch ignores (`ctl state import`).
        crate::config::check_service_name(name).map_err(|m| format!("service name {m}"))?;
        if svc.generation == 0 {
            return Err(format!("service `{name}`: generation 0"));
        }
    }
    Ok(file.state)
}

/// A JSON file (SPEC §7).
#[derive(Debug, Clone)]
pub(crate) struct FileStore {
    path: PathBuf,
    /// The size of the last file written: the next one is about the same,
    /// so its buffer is made that large at once instead of growing
    /// (and being copied) a dozen times.
    last_len: Arc<AtomicUsize>,
}

impl FileStore {
    /// A store at `path` (the directory is created on first save).
    pub(crate) fn new(path: impl Into<PathBuf>) -> FileStore {
        FileStore {
            path: path.into(),
            last_len: Arc::default(),
        }
    }

    /// Moves an unreadable file aside (`NAME.corrupt-UNIXTIME`) so that
    /// `--ignore-state` does not destroy evidence. Returns the new name.
    pub(crate) fn set_aside(&self) -> io::Result<PathBuf> {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut name = self.path.as_os_str().to_owned();
        name.push(format!(".corrupt-{secs}"));
        let aside = PathBuf::from(name);
        fs::rename(&self.path, &aside)?;
        Ok(aside)
    }

    fn write_atomically(&self, bytes: &[u8]) -> io::Result<()> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let file_name = self.path.file_name().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "state path has no file name")
        })?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(file_name);
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = dir.join(tmp_name);
        let result = (|| {
            let open = || {
                OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&tmp)
            };
            // The directory is made on the first save (or if it vanished),
            // not tried again on every one.
            let mut f = match open() {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir_all(&dir)?;
                    open()?
                }
                other => other?,
            };
            f.write_all(bytes)?;
            f.sync_all()?;
            drop(f);
            fs::rename(&tmp, &self.path)?;
            // The rename is durable only once the directory entry is.
            File::open(&dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

impl FileStore {
    /// The stored state, `None` if nothing was ever stored.
    pub(crate) fn load(&self) -> Result<Option<RoutingState>, StoreError> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StoreError::Read {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        decode(&bytes)
            .map(Some)
            .map_err(|message| StoreError::Corrupt {
                path: self.path.clone(),
                message,
            })
    }

    /// The file's bytes for `state`.
    fn encode(&self, state: &RoutingState) -> Result<Vec<u8>, StoreError> {
        let file = FileFormatRef {
            version: FORMAT_VERSION,
            state,
        };
        let mut bytes = Vec::with_capacity(self.last_len.load(Ordering::Relaxed) + 4096);
        serde_json::to_writer_pretty(&mut bytes, &file).map_err(|e| StoreError::Write {
            path: self.path.clone(),
            source: io::Error::other(e),
        })?;
        bytes.push(b'\n');
        self.last_len.store(bytes.len(), Ordering::Relaxed);
        Ok(bytes)
    }

    /// Stores `state` durably, replacing what was there (blocking I/O).
    #[cfg(test)]
    pub(crate) fn save_blocking(&self, state: &RoutingState) -> Result<(), StoreError> {
        let bytes = self.encode(state)?;
        self.write_bytes(&bytes)
    }

    fn write_bytes(&self, bytes: &[u8]) -> Result<(), StoreError> {
        self.write_atomically(bytes)
            .map_err(|source| StoreError::Write {
                path: self.path.clone(),
                source,
            })
    }

    /// Encodes `state` now and writes it off the runtime threads.
    pub(crate) async fn save_async(&self, state: &RoutingState) -> Result<(), StoreError> {
        let bytes = self.encode(state)?;
        let this = self.clone();
        match tokio::task::spawn_blocking(move || this.write_bytes(&bytes)).await {
            Ok(r) => r,
            Err(e) => Err(StoreError::Write {
                path: self.path.clone(),
                source: io::Error::other(e.to_string()),
            }),
        }
    }
}

/// The whole state, in one file, every time: `changes` only says which
/// services differ, and there is no revision to compare.
impl StateStore for FileStore {
    fn save<'a>(
        &'a self,
        state: &'a RoutingState,
        changes: &'a [Change],
    ) -> StoreFuture<'a, Vec<Rev>> {
        Box::pin(async move {
            self.save_async(state).await?;
            Ok(vec![0; changes.len()])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn tmpdir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("switchyard-store-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn round_trip_and_corruption() {
        let dir = tmpdir("rt");
        let store = FileStore::new(dir.join("sub/state.json"));
        assert!(store.load().expect("missing is fine").is_none());
        let cfg = Config::demo(
            "127.0.0.1:1".parse().expect("addr"),
            "127.0.0.1:2".parse().expect("addr"),
        );
        let state = crate::control_plane::state::reconcile(
            &RoutingState::default(),
            &cfg,
            std::time::SystemTime::now(),
        );
        store.save_blocking(&state).expect("save");
        assert_eq!(store.load().expect("load"), Some(state));

        fs::write(&store.path, b"{\"version\":1,\"services\":{\"x\":").expect("write");
        let err = store.load().expect_err("corrupt");
        let msg = err.to_string();
        assert!(msg.contains("state.json is corrupt"), "{msg}");
        let aside = store.set_aside().expect("set aside");
        assert!(aside.exists());
        assert!(store.load().expect("gone").is_none());
        let _ = fs::remove_dir_all(&dir);
    }
}
