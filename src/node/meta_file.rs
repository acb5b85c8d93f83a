//! Persists the core's [`Meta`] atomically in a small file next to the disk
//! (`<disk>.twinblk-meta`): write a temporary file, fsync it, rename it over the old one, fsync
//! the directory. A stand-in until the on-disk metadata area exists.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::core::{DiskState, Meta};

#[derive(Debug, thiserror::Error)]
pub enum MetaFileError {
    #[error("metadata file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no metadata at {path}: create it with `twinblk create-md {resource}` (once, before the first `up`)")]
    Missing { path: PathBuf, resource: String },
    #[error("metadata already exists at {path}: `twinblk create-md --force` replaces it, and this node forgets which of its data the peer has (a full resync)")]
    Exists { path: PathBuf },
    #[error("metadata file {path} is corrupt ({detail}); restore it or remove it to start over as Inconsistent (a full resync)")]
    Corrupt { path: PathBuf, detail: String },
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    current_gen: u64,
    bitmap_gen: Option<u64>,
    disk: DiskState,
    primary: bool,
}

/// Where the metadata of the disk at `disk` lives.
pub fn path_for(disk: &Path) -> PathBuf {
    let mut s = disk.as_os_str().to_owned();
    s.push(".twinblk-meta");
    PathBuf::from(s)
}

/// Create the metadata of a fresh device (Inconsistent, no generation); refuses to replace an
/// existing file unless `force`.
pub fn create(path: &Path, force: bool) -> Result<(), MetaFileError> {
    if !force && path.exists() {
        return Err(MetaFileError::Exists {
            path: path.to_owned(),
        });
    }
    save(path, &Meta::new_device())
}

/// Load the metadata of `resource`; it must exist (`twinblk create-md`).
pub fn load(path: &Path, resource: &str) -> Result<Meta, MetaFileError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(MetaFileError::Missing {
                path: path.to_owned(),
                resource: resource.to_owned(),
            })
        }
        Err(source) => {
            return Err(MetaFileError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    let d: OnDisk = serde_json::from_str(&text).map_err(|e| MetaFileError::Corrupt {
        path: path.to_owned(),
        detail: e.to_string(),
    })?;
    if d.version != 1 {
        return Err(MetaFileError::Corrupt {
            path: path.to_owned(),
            detail: format!("unknown version {}", d.version),
        });
    }
    Ok(Meta {
        current_gen: d.current_gen,
        bitmap_gen: d.bitmap_gen,
        history: [0; 2],
        disk: d.disk,
        primary: d.primary,
    })
}

/// Save durably and atomically: after this returns, a crash leaves exactly `meta`.
pub fn save(path: &Path, meta: &Meta) -> Result<(), MetaFileError> {
    let io = |source| MetaFileError::Io {
        path: path.to_owned(),
        source,
    };
    let d = OnDisk {
        version: 1,
        current_gen: meta.current_gen,
        bitmap_gen: meta.bitmap_gen,
        disk: meta.disk,
        primary: meta.primary,
    };
    let text = serde_json::to_vec(&d).map_err(|e| io(std::io::Error::other(e)))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&text).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = path_for(&dir.path().join("d.img"));
        assert!(matches!(load(&p, "r0"), Err(MetaFileError::Missing { .. })));
        create(&p, false).unwrap();
        assert_eq!(load(&p, "r0").unwrap(), Meta::new_device());
        assert!(matches!(
            create(&p, false),
            Err(MetaFileError::Exists { .. })
        ));
        let m = Meta {
            current_gen: 7,
            bitmap_gen: Some(3),
            history: [0; 2],
            disk: DiskState::UpToDate,
            primary: true,
        };
        save(&p, &m).unwrap();
        assert_eq!(load(&p, "r0").unwrap(), m);
        std::fs::write(&p, b"garbage").unwrap();
        assert!(matches!(load(&p, "r0"), Err(MetaFileError::Corrupt { .. })));
    }
}
