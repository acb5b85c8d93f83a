//! [`MetaStore`]: the metadata area in a regular file or on a block device. Plain `pwrite` +
//! `fdatasync`: every `save_*` is durable when it returns. The pieces are small and the format
//! (two superblock slots, an AL ring) makes each update atomic, so no O_DIRECT is needed.
//!
//! A running daemon holds an exclusive `flock` on the file, so `create-md --force` cannot pull
//! the metadata from under it; `inspect` (dump-md) takes no lock and only reads.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use tracing::warn;

use super::format::{self, AlBlock, Layout, PickError, Slot, Superblock, BLOCK, VERSION};
use crate::core::{Meta, Restored};

/// What the metadata must match to be this node's (checked by [`MetaStore::open`]).
#[derive(Debug, Clone, Copy)]
pub struct Expect<'a> {
    pub resource: &'a str,
    pub node: &'a str,
    /// The device's size in bytes.
    pub size: u64,
}

/// Who the metadata belongs to (written by [`MetaStore::create`]).
#[derive(Debug, Clone, Copy)]
pub struct Identity<'a> {
    pub resource: &'a str,
    pub node: &'a str,
    pub node_id: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("no metadata at {path}: run `twinblk create-md {resource}` once on this node before the first `up` (or fix `meta =` in the resource file)")]
    Missing { path: PathBuf, resource: String },
    #[error("metadata at {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("{path} is not twinblk metadata (no twinblk superblock): check that `meta =` in the resource file names this node's metadata, or run `twinblk create-md {resource}` to create it")]
    NotMetadata { path: PathBuf, resource: String },
    #[error("metadata at {path} is version {found}, this build reads {VERSION}: run the twinblk release that wrote it (or a newer one); do not recreate it, that discards what it knows")]
    Newer { path: PathBuf, found: u32 },
    #[error("metadata at {path} is corrupt ({detail}): restore it from a backup, or run `twinblk create-md {resource} --force` to start over as Inconsistent (this node then gets a full resync from its peer)")]
    Corrupt {
        path: PathBuf,
        resource: String,
        detail: String,
    },
    #[error("metadata at {path} {problem}: {fix}")]
    Foreign {
        path: PathBuf,
        problem: String,
        fix: String,
    },
    #[error("metadata at {path} exists but is unreadable ({detail}): `twinblk create-md {resource} --force` replaces it, and this node forgets which of its data the peer has (a full resync)")]
    ExistsUnreadable {
        path: PathBuf,
        resource: String,
        detail: String,
    },
    #[error("metadata already exists at {path} (resource {found_resource:?}, node {found_node:?}): `twinblk create-md {resource} --force` replaces it, and this node forgets which of its data the peer has (a full resync)")]
    Exists {
        path: PathBuf,
        resource: String,
        found_resource: String,
        found_node: String,
    },
    #[error("{path} holds data that is not twinblk metadata: check `meta =` in the resource file; `twinblk create-md {resource} --force` overwrites the first {len} bytes")]
    OtherData {
        path: PathBuf,
        resource: String,
        len: u64,
    },
    #[error("{path} is {have} bytes, the metadata needs {need}: give `meta =` a larger device, or a file path")]
    TooSmall { path: PathBuf, have: u64, need: u64 },
    #[error("metadata at {path} is in use (locked by {holder}): stop that daemon first (`twinblk down {resource}`)")]
    Busy {
        path: PathBuf,
        resource: String,
        /// Who holds the lock, from /proc/locks: `pid 1234 (twinblk)`, or a guess.
        holder: String,
    },
    #[error("metadata at {path}: {detail}")]
    Invalid { path: PathBuf, detail: String },
}

impl MetaError {
    /// The errno of a failed metadata write, for the core's disk failure: ENOSPC for a full
    /// file system, EIO for everything else.
    pub fn errno(&self) -> i32 {
        match self {
            MetaError::Io { source, .. } => match source.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => libc::ENOSPC,
                _ => libc::EIO,
            },
            _ => libc::EIO,
        }
    }
}

/// Everything `dump-md` shows: the area as found, unchecked against any resource file.
#[derive(Debug, Clone)]
pub struct Inspection {
    pub superblock: Superblock,
    /// The slot in effect (0 or 1).
    pub slot: usize,
    pub bitmap: Vec<u64>,
    pub activity_log: Vec<u64>,
    /// Sequence of the AL transaction in effect.
    pub al_seq: u64,
    /// Problems that were survived (a torn slot, damaged AL blocks).
    pub warnings: Vec<String>,
}

/// The open metadata area of one node.
#[derive(Debug)]
pub struct MetaStore {
    file: File,
    path: PathBuf,
    sb: Superblock,
    /// The slot holding `sb`: the next update goes to the other one.
    slot: usize,
    al_seq: u64,
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> MetaError + 'a {
    move |source| MetaError::Io {
        path: path.to_owned(),
        op,
        source,
    }
}

/// Bytes in the file or device.
fn length(file: &mut File, path: &Path) -> Result<u64, MetaError> {
    // Seeking to the end works for block devices too, where the file length reads 0.
    file.seek(SeekFrom::End(0))
        .map_err(io_err(path, "reading its size"))
}

fn read_at(file: &File, path: &Path, offset: u64, len: u64) -> Result<Vec<u8>, MetaError> {
    let len = usize::try_from(len).map_err(|_| MetaError::Invalid {
        path: path.to_owned(),
        detail: format!("{len} bytes do not fit in memory"),
    })?;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)
        .map_err(io_err(path, "reading"))?;
    Ok(buf)
}

/// How long `up` waits for a lock that is held: a daemon that `down` just stopped can hold it
/// for a moment after its exit (seen once in tests/down_peer_stopped.rs: the restart right
/// after `down` found it locked). Longer means a daemon really runs.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

fn lock(file: &File, path: &Path, resource: &str) -> Result<(), MetaError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    let e = loop {
        // SAFETY: flock on a descriptor we own; no memory is passed.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) || std::time::Instant::now() >= deadline {
            break e;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Err(MetaError::Busy {
            path: path.to_owned(),
            resource: resource.to_owned(),
            holder: lock_holder(file).unwrap_or_else(|| "a running `twinblk up`?".into()),
        })
    } else {
        Err(io_err(path, "locking")(e))
    }
}

/// Who holds the `flock` on `file`: the pids and programs /proc/locks names for its inode.
/// A refusal that names the holder explains itself (a lock still held right after a daemon
/// exited was seen once and not explained: the next one will say by whom).
fn lock_holder(file: &File) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let ino = file.metadata().ok()?.ino().to_string();
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let holders: Vec<String> = locks
        .lines()
        .filter_map(|l| {
            // `1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF`; waiters have `->` second.
            let f: Vec<&str> = l.split_whitespace().collect();
            let (kind, pid, id) = (f.get(1)?, f.get(4)?, f.get(5)?);
            if *kind != "FLOCK" || id.rsplit(':').next()? != ino {
                return None;
            }
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            Some(format!("pid {pid} ({})", comm.trim()))
        })
        .collect();
    (!holders.is_empty()).then(|| holders.join(", "))
}

/// A random 64-bit id (never 0).
fn random_id() -> u64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        // Only for dump-md and debugging: time and pid are unique enough.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        return (t ^ u64::from(std::process::id()).rotate_left(40)) | 1;
    }
    u64::from_le_bytes(b).max(1)
}

/// Bitmap words read from the area, with bits past the device cleared (stale garbage there
/// would count as dirty blocks that do not exist).
fn clean_tail(layout: &Layout, mut words: Vec<u64>) -> Vec<u64> {
    let bits = layout.bitmap_bits();
    if bits % 64 != 0 {
        if let Some(last) = words.last_mut() {
            *last &= (1u64 << (bits % 64)) - 1;
        }
    }
    words
}

impl MetaStore {
    /// Writes fresh metadata (a new device: Inconsistent, no generation, clean bitmap, empty
    /// activity log) and returns it open. Refuses to replace existing metadata, or any data
    /// that is not all zero, unless `force`.
    pub fn create(
        path: &Path,
        id: &Identity,
        layout: &Layout,
        force: bool,
    ) -> Result<MetaStore, MetaError> {
        let invalid = |e: format::FormatError| MetaError::Invalid {
            path: path.to_owned(),
            detail: e.to_string(),
        };
        layout.check().map_err(invalid)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_err(path, "opening"))?;
        lock(&file, path, id.resource)?;
        let is_blockdev = {
            use std::os::unix::fs::FileTypeExt;
            file.metadata()
                .map_err(io_err(path, "stat"))?
                .file_type()
                .is_block_device()
        };
        let have = length(&mut file, path)?;
        let need = layout.total_len();
        if !force && have > 0 {
            let head = read_at(&file, path, 0, have.min(2 * BLOCK as u64))?;
            let slots = head
                .chunks(BLOCK)
                .filter(|c| c.starts_with(&format::MAGIC))
                .map(format::decode_slot)
                .collect::<Vec<_>>();
            if let Some(sb) = slots.iter().find_map(|s| match s {
                Slot::Valid(sb) => Some(sb),
                _ => None,
            }) {
                return Err(MetaError::Exists {
                    path: path.to_owned(),
                    resource: id.resource.to_owned(),
                    found_resource: sb.resource.clone(),
                    found_node: sb.node.clone(),
                });
            }
            if let Some(detail) = slots.iter().find_map(|s| match s {
                Slot::Newer(v) => Some(format!("format version {v}")),
                Slot::Damaged(why) => Some(why.clone()),
                _ => None,
            }) {
                return Err(MetaError::ExistsUnreadable {
                    path: path.to_owned(),
                    resource: id.resource.to_owned(),
                    detail,
                });
            }
            if head.iter().any(|&b| b != 0) {
                return Err(MetaError::OtherData {
                    path: path.to_owned(),
                    resource: id.resource.to_owned(),
                    len: need,
                });
            }
        }
        if have < need {
            if is_blockdev {
                return Err(MetaError::TooSmall {
                    path: path.to_owned(),
                    have,
                    need,
                });
            }
            file.set_len(need).map_err(io_err(path, "extending"))?;
        }
        let resource_id = random_id();
        let sb = Superblock {
            seq: 1,
            resource_id,
            resource: id.resource.to_owned(),
            node_id: id.node_id,
            node: id.node.to_owned(),
            layout: *layout,
            meta: Meta::new_device(),
        };
        // Invalidate first: a crash in the middle leaves no superblock, so a half-written area
        // is never mistaken for metadata.
        file.write_all_at(&[0u8; 2 * BLOCK], 0)
            .map_err(io_err(path, "writing"))?;
        file.sync_data().map_err(io_err(path, "syncing"))?;
        // Clear the bitmap and the AL ring in 1 MiB pieces.
        let zeros = vec![0u8; 1 << 20];
        let mut off = layout.bitmap_offset();
        while off < need {
            let n = (need - off).min(zeros.len() as u64) as usize;
            file.write_all_at(&zeros[..n], off)
                .map_err(io_err(path, "writing"))?;
            off += n as u64;
        }
        let al = format::encode_al(layout, resource_id, 1, &[]).map_err(invalid)?;
        file.write_all_at(&al, layout.al_block_offset(1))
            .map_err(io_err(path, "writing"))?;
        file.sync_data().map_err(io_err(path, "syncing"))?;
        // Both slots valid from the start: any later torn update leaves the other.
        let mut store = MetaStore {
            file,
            path: path.to_owned(),
            sb,
            slot: 1,
            al_seq: 1,
        };
        store.write_superblock(1)?;
        store.write_superblock(2)?;
        Ok(store)
    }

    /// Reads the area as it is, checked only for integrity (for dump-md).
    pub fn inspect(path: &Path, resource: &str) -> Result<Inspection, MetaError> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(MetaError::Missing {
                    path: path.to_owned(),
                    resource: resource.to_owned(),
                })
            }
            Err(e) => return Err(io_err(path, "opening")(e)),
        };
        Self::read_all(file, path, resource)
    }

    fn read_all(mut file: File, path: &Path, resource: &str) -> Result<Inspection, MetaError> {
        let corrupt = |detail: String| MetaError::Corrupt {
            path: path.to_owned(),
            resource: resource.to_owned(),
            detail,
        };
        let have = length(&mut file, path)?;
        let head = read_at(&file, path, 0, have.min(2 * BLOCK as u64))?;
        let mut slots = [Slot::Blank, Slot::Blank];
        for (i, s) in slots.iter_mut().enumerate() {
            let start = (i * BLOCK).min(head.len());
            let b = &head[start..(start + BLOCK).min(head.len())];
            *s = if b.len() == BLOCK {
                format::decode_slot(b)
            } else if b.starts_with(&format::MAGIC) {
                Slot::Damaged("the file ends inside it".into())
            } else if b.iter().all(|&x| x == 0) {
                Slot::Blank
            } else {
                Slot::Foreign
            };
        }
        let (sb, slot, note) = format::pick(&slots).map_err(|e| match e {
            PickError::NotMetadata => MetaError::NotMetadata {
                path: path.to_owned(),
                resource: resource.to_owned(),
            },
            PickError::Newer(v) => MetaError::Newer {
                path: path.to_owned(),
                found: v,
            },
            PickError::Corrupt(d) => corrupt(d),
        })?;
        let mut warnings: Vec<String> = note.into_iter().collect();
        let layout = sb.layout;
        if have < layout.total_len() {
            return Err(corrupt(format!(
                "the area is {have} bytes but its superblock describes {} (truncated?)",
                layout.total_len()
            )));
        }
        let bitmap = clean_tail(
            &layout,
            format::decode_words(&read_at(
                &file,
                path,
                layout.bitmap_offset(),
                layout.bitmap_words() * 8,
            )?),
        );
        let ring = read_at(
            &file,
            path,
            layout.al_offset(),
            u64::from(layout.al_ring_blocks) * BLOCK as u64,
        )?;
        let blocks: Vec<AlBlock> = ring
            .chunks(BLOCK)
            .map(|b| format::decode_al(&layout, sb.resource_id, b))
            .collect();
        let (al, notes) = format::pick_al(&blocks);
        let Some((al_seq, activity_log)) = al else {
            return Err(corrupt(format!(
                "no readable activity-log transaction ({})",
                if notes.is_empty() {
                    "all blocks empty".to_string()
                } else {
                    notes.join("; ")
                }
            )));
        };
        warnings.extend(notes);
        Ok(Inspection {
            superblock: sb,
            slot,
            bitmap,
            activity_log,
            al_seq,
            warnings,
        })
    }

    /// Opens this node's metadata for a daemon: locks it, checks it belongs to `expect`, and
    /// returns what the core restarts from. Writes nothing.
    pub fn open(path: &Path, expect: &Expect) -> Result<(MetaStore, Restored), MetaError> {
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(MetaError::Missing {
                    path: path.to_owned(),
                    resource: expect.resource.to_owned(),
                })
            }
            Err(e) => return Err(io_err(path, "opening")(e)),
        };
        lock(&file, path, expect.resource)?;
        let dup = file.try_clone().map_err(io_err(path, "opening"))?;
        let ins = Self::read_all(dup, path, expect.resource)?;
        let sb = &ins.superblock;
        let foreign = |problem: String, fix: String| MetaError::Foreign {
            path: path.to_owned(),
            problem,
            fix,
        };
        if sb.resource != expect.resource {
            return Err(foreign(
                format!(
                    "belongs to resource {:?}, not {:?}",
                    sb.resource, expect.resource
                ),
                format!(
                    "point `meta =` of node {} at resource {}'s metadata, or run `twinblk create-md {} --force` to replace it (a full resync)",
                    expect.node, expect.resource, expect.resource
                ),
            ));
        }
        if sb.node != expect.node {
            return Err(foreign(
                format!("is node {:?}'s, not {:?}'s", sb.node, expect.node),
                format!(
                    "each node needs its own metadata: check `meta =` of node {} (the nodes' paths may be swapped), or run `twinblk create-md {} --force` on this node (a full resync)",
                    expect.node, expect.resource
                ),
            ));
        }
        if sb.layout.size != expect.size {
            return Err(foreign(
                format!(
                    "describes a device of {} bytes, but the disk has {} bytes",
                    sb.layout.size, expect.size
                ),
                format!(
                    "the disk changed size: restore its old size, or run `twinblk create-md {} --force` for the new size (a full resync)",
                    expect.resource
                ),
            ));
        }
        for w in &ins.warnings {
            warn!(path = %path.display(), "metadata: {w} (survived; the next save rewrites it)");
        }
        let restored = Restored {
            meta: ins.superblock.meta,
            bitmap: ins.bitmap,
            activity_log: ins.activity_log,
        };
        Ok((
            MetaStore {
                file,
                path: path.to_owned(),
                sb: ins.superblock,
                slot: ins.slot,
                al_seq: ins.al_seq,
            },
            restored,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn layout(&self) -> &Layout {
        &self.sb.layout
    }
    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    fn write_superblock(&mut self, seq: u64) -> Result<(), MetaError> {
        let mut sb = self.sb.clone();
        sb.seq = seq;
        let bytes = format::encode_superblock(&sb).map_err(|e| MetaError::Invalid {
            path: self.path.clone(),
            detail: e.to_string(),
        })?;
        // Never the slot in effect, even if it sits where its sequence would not put it.
        let slot = 1 - self.slot.min(1);
        let off = (slot * BLOCK) as u64;
        self.file
            .write_all_at(&bytes, off)
            .map_err(io_err(&self.path, "writing the superblock"))?;
        self.file
            .sync_data()
            .map_err(io_err(&self.path, "syncing the superblock"))?;
        self.sb = sb;
        self.slot = slot;
        Ok(())
    }

    /// Saves the core's [`Meta`] (into the slot not in effect); durable on return.
    pub fn save_meta(&mut self, meta: &Meta) -> Result<(), MetaError> {
        let old = self.sb.meta;
        self.sb.meta = *meta;
        let r = self.write_superblock(self.sb.seq + 1);
        if r.is_err() {
            self.sb.meta = old;
        }
        r
    }

    /// Saves bitmap words `[first_word, first_word + words.len())`; durable on return.
    pub fn save_bitmap(&mut self, first_word: u64, words: &[u64]) -> Result<(), MetaError> {
        let total = self.sb.layout.bitmap_words();
        let end = first_word.checked_add(words.len() as u64);
        if end.map_or(true, |e| e > total) {
            return Err(MetaError::Invalid {
                path: self.path.clone(),
                detail: format!(
                    "bitmap words {first_word}..+{} are past the bitmap's {total} words",
                    words.len()
                ),
            });
        }
        if words.is_empty() {
            return Ok(());
        }
        let off = self.sb.layout.bitmap_offset() + first_word * 8;
        self.file
            .write_all_at(&format::encode_words(words), off)
            .map_err(io_err(&self.path, "writing the bitmap"))?;
        self.file
            .sync_data()
            .map_err(io_err(&self.path, "syncing the bitmap"))
    }

    /// Saves an activity-log transaction naming exactly `extents`; durable on return.
    pub fn save_activity_log(&mut self, extents: &[u64]) -> Result<(), MetaError> {
        let seq = self.al_seq + 1;
        write_al(
            &self.file,
            &self.path,
            &self.sb.layout,
            self.sb.resource_id,
            seq,
            extents,
        )?;
        self.al_seq = seq;
        Ok(())
    }

    /// A writer for the activity-log ring alone, usable on another thread while this store
    /// keeps saving the superblock and bitmap (disjoint parts of the area). From then on write
    /// the log only through it: it continues the ring where this store is.
    pub fn activity_log_writer(&self) -> Result<AlWriter, MetaError> {
        let file = self
            .file
            .try_clone()
            .map_err(io_err(&self.path, "opening the activity log"))?;
        Ok(AlWriter {
            file,
            path: self.path.clone(),
            layout: self.sb.layout,
            resource_id: self.sb.resource_id,
            seq: self.al_seq,
        })
    }
}

/// Writes activity-log transactions into the ring of one metadata area (see
/// [`MetaStore::activity_log_writer`]).
#[derive(Debug)]
pub struct AlWriter {
    file: File,
    path: PathBuf,
    layout: Layout,
    resource_id: u64,
    seq: u64,
}

impl AlWriter {
    /// Saves an activity-log transaction naming exactly `extents`; durable on return.
    pub fn save(&mut self, extents: &[u64]) -> Result<(), MetaError> {
        let seq = self.seq + 1;
        write_al(
            &self.file,
            &self.path,
            &self.layout,
            self.resource_id,
            seq,
            extents,
        )?;
        self.seq = seq;
        Ok(())
    }
}

fn write_al(
    file: &File,
    path: &Path,
    layout: &Layout,
    resource_id: u64,
    seq: u64,
    extents: &[u64],
) -> Result<(), MetaError> {
    let block =
        format::encode_al(layout, resource_id, seq, extents).map_err(|e| MetaError::Invalid {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
    file.write_all_at(&block, layout.al_block_offset(seq))
        .map_err(io_err(path, "writing the activity log"))?;
    file.sync_data()
        .map_err(io_err(path, "syncing the activity log"))
}

#[cfg(test)]
mod tests;
