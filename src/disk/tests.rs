//! Disk tests on real files under /var/tmp (ext4 here, so O_DIRECT works), on loop devices and a
//! tiny tmpfs when running as root. Every behaviour test runs once per engine.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn tmpfile() -> tempfile::NamedTempFile {
    tempfile::Builder::new()
        .prefix("twinblk-disk-test")
        .tempfile_in("/var/tmp")
        .expect("temp file in /var/tmp")
}

fn opts(engine: EngineKind, size: u64) -> DiskOptions {
    DiskOptions {
        engine,
        size: Some(size),
        ..Default::default()
    }
}

/// A long-lived runtime for the inline engine's completion reaper: the tests open disks outside
/// any runtime and drive them from short-lived ones, so the reaper must live elsewhere (which also
/// checks that callers on other runtimes are completed correctly).
fn reaper_rt() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// `Disk::open` inside the reaper runtime's context.
fn open_disk(path: &Path, o: &DiskOptions) -> Result<Disk, DiskError> {
    let _g = reaper_rt().enter();
    Disk::open(path, o)
}

fn open_disk_align(path: &Path, o: &DiskOptions, align: Option<u32>) -> Result<Disk, DiskError> {
    let _g = reaper_rt().enter();
    Disk::open_with_align(path, o, align)
}

fn open(path: &Path, engine: EngineKind, size: u64) -> Disk {
    let d = open_disk(path, &opts(engine, size)).expect("open disk");
    assert_eq!(d.engine(), engine, "engine fell back");
    d
}

/// A deterministic byte pattern distinct per `seed`.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn buf(d: &Disk, data: &[u8]) -> IoBuf {
    let mut b = d.alloc(data.len());
    b.copy_from_slice(data);
    b
}

fn is_root() -> bool {
    // SAFETY: trivial syscall.
    unsafe { libc::geteuid() == 0 }
}

/// A loop device over a file, detached on drop.
struct Loop {
    dev: PathBuf,
    _backing: tempfile::NamedTempFile,
}

impl Loop {
    fn new(size: u64, sector: u32) -> Option<Loop> {
        if !is_root() {
            eprintln!("skipping: loop devices need root");
            return None;
        }
        let backing = tmpfile();
        backing.as_file().set_len(size).ok()?;
        let out = Command::new("losetup")
            .args(["-f", "--show", "--sector-size", &sector.to_string()])
            .arg(backing.path())
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "skipping: losetup failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
        Some(Loop {
            dev,
            _backing: backing,
        })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

// ---------------------------------------------------------------- behaviour, per engine

fn aligned_round_trip(engine: EngineKind) {
    let f = tmpfile();
    let d = open(f.path(), engine, 8 << 20);
    assert_eq!(d.size(), 8 << 20);
    rt().block_on(async {
        let small = pattern(1, 4096);
        d.write(8192, buf(&d, &small), false).await.unwrap();
        let big = pattern(2, 1 << 20);
        d.write(1 << 20, buf(&d, &big), false).await.unwrap();
        assert_eq!(&d.read(8192, 4096).await.unwrap()[..], &small[..]);
        assert_eq!(&d.read(1 << 20, 1 << 20).await.unwrap()[..], &big[..]);
        // Untouched space reads as zeroes.
        assert!(d.read(0, 8192).await.unwrap().iter().all(|&b| b == 0));
        assert_eq!(d.read(0, 0).await.unwrap().len(), 0);
    });
    // Visible to an independent reader of the file: the data reached the file.
    let on_disk = std::fs::read(f.path()).unwrap();
    assert_eq!(&on_disk[8192..12288], &pattern(1, 4096)[..]);
}

/// Random aligned and unaligned writes and reads, checked against an in-memory model.
fn unaligned_matches_model(engine: EngineKind) {
    for align in [None, Some(4096)] {
        let f = tmpfile();
        let size = 256 * 1024u64;
        let d = open_disk_align(f.path(), &opts(engine, size), align).unwrap();
        let mut model = vec![0u8; size as usize];
        let mut rng = pattern(align.unwrap_or(1) as u64, 4096 * 4);
        let mut next = move || {
            let v = u64::from_le_bytes(rng[..8].try_into().unwrap());
            rng.rotate_left(8);
            v
        };
        rt().block_on(async {
            for i in 0..300u64 {
                let off = next() % (size - 1);
                let max = (size - off).min(20_000);
                let len = 1 + next() % max;
                if i % 3 == 2 {
                    let got = d.read(off, len as u32).await.unwrap();
                    assert_eq!(&got[..], &model[off as usize..(off + len) as usize]);
                } else {
                    let data = pattern(i + 100, len as usize);
                    d.write(off, buf(&d, &data), i % 7 == 0).await.unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&data);
                }
            }
            assert_eq!(&d.read(0, size as u32).await.unwrap()[..], &model[..]);
        });
    }
}

/// Disjoint 512-byte sectors of the same 4 KiB block written concurrently: each is a
/// read-modify-write of the whole block, so without the range lock updates get lost.
fn concurrent_rmw_same_block(engine: EngineKind) {
    let f = tmpfile();
    let d = open_disk_align(f.path(), &opts(engine, 1 << 20), Some(4096)).unwrap();
    let rt = rt();
    for round in 0..20u64 {
        let block = (round % 4) * 4096;
        // One task also rewrites the whole block (aligned, shared lock) in the middle of it all.
        let full = pattern(round * 1000 + 999, 4096);
        let mut tasks = Vec::new();
        for s in 0..8u64 {
            let d = d.clone();
            tasks.push(rt.spawn(async move {
                let data = pattern(round * 1000 + s, 512);
                d.write(block + s * 512, buf(&d, &data), false).await
            }));
        }
        {
            let d = d.clone();
            let full = full.clone();
            tasks.push(rt.spawn(async move { d.write(block, buf(&d, &full), false).await }));
        }
        rt.block_on(async {
            for t in tasks {
                t.await.unwrap().unwrap();
            }
            let got = d.read(block, 4096).await.unwrap();
            // Some serial order: every sector is either its own write or the full-block write's.
            for s in 0..8usize {
                let sector = &got[s * 512..(s + 1) * 512];
                let own = pattern(round * 1000 + s as u64, 512);
                assert!(
                    sector == &own[..] || sector == &full[s * 512..(s + 1) * 512],
                    "round {round} sector {s} lost its update"
                );
            }
        });
    }
    // And without the full-block writer every sector must hold its own pattern.
    rt.block_on(async {
        for round in 0..20u64 {
            let block = 8 * 4096 + (round % 4) * 4096;
            let mut tasks = Vec::new();
            for s in 0..8u64 {
                let d = d.clone();
                tasks.push(tokio::spawn(async move {
                    let data = pattern(round * 77 + s, 512);
                    d.write(block + s * 512, buf(&d, &data), false).await
                }));
            }
            for t in tasks {
                t.await.unwrap().unwrap();
            }
            let got = d.read(block, 4096).await.unwrap();
            for s in 0..8usize {
                assert_eq!(
                    &got[s * 512..(s + 1) * 512],
                    &pattern(round * 77 + s as u64, 512)[..],
                    "round {round} sector {s} lost its update"
                );
            }
        }
    });
}

fn trim_reads_back_zero(engine: EngineKind) {
    let f = tmpfile();
    let d = open(f.path(), engine, 4 << 20);
    rt().block_on(async {
        let data = pattern(5, 1 << 20);
        d.write(0, buf(&d, &data), false).await.unwrap();
        d.trim(65536, 131072).await.unwrap();
        let got = d.read(0, 1 << 20).await.unwrap();
        assert!(got[65536..196608].iter().all(|&b| b == 0));
        assert_eq!(&got[..65536], &data[..65536]);
        assert_eq!(&got[196608..], &data[196608..]);
        // Unaligned trim: only whole blocks go; partial blocks keep their data.
        d.trim(300_000, 10_000).await.unwrap();
        let got = d.read(299_008, 12_288).await.unwrap();
        let a = d.inner.io_align as usize;
        let first_whole = 300_000usize.div_ceil(a) * a;
        assert_eq!(
            &got[..first_whole - 299_008],
            &data[299_008..first_whole],
            "data before the first whole block survives"
        );
    });
}

fn write_zeroes_variants(engine: EngineKind) {
    let f = tmpfile();
    let d = open(f.path(), engine, 4 << 20);
    rt().block_on(async {
        let data = pattern(6, 2 << 20);
        for may_trim in [false, true] {
            d.write(0, buf(&d, &data), false).await.unwrap();
            let mut model = data.clone();
            for (off, len) in [(4096u64, 65536u64), (100_001, 70_000), (700, 100)] {
                d.write_zeroes(off, len, may_trim).await.unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            assert_eq!(&d.read(0, 2 << 20).await.unwrap()[..], &model[..]);
        }
        d.write_zeroes(0, 0, false).await.unwrap();
    });
}

fn flush_and_fua(engine: EngineKind) {
    let f = tmpfile();
    let d = open(f.path(), engine, 1 << 20);
    rt().block_on(async {
        let data = pattern(7, 8192);
        d.write(4096, buf(&d, &data), true).await.unwrap();
        d.write(3, buf(&d, &data[..10]), true).await.unwrap();
        d.flush().await.unwrap();
        d.write(0, d.alloc(0), true).await.unwrap();
    });
    let on_disk = std::fs::read(f.path()).unwrap();
    assert_eq!(&on_disk[4096..12288], &pattern(7, 8192)[..]);
    assert_eq!(&on_disk[3..13], &pattern(7, 8192)[..10]);
}

fn read_only_refuses_writes(engine: EngineKind) {
    let f = tmpfile();
    drop(open(f.path(), engine, 1 << 20));
    let o = DiskOptions {
        engine,
        read_only: true,
        ..Default::default()
    };
    let d = open_disk(f.path(), &o).unwrap();
    assert!(d.read_only());
    rt().block_on(async {
        for e in [
            d.write(0, d.alloc(4096), false).await.unwrap_err(),
            d.trim(0, 4096).await.unwrap_err(),
            d.write_zeroes(0, 4096, false).await.unwrap_err(),
        ] {
            assert_eq!(e.errno(), libc::EPERM, "{e}");
        }
        d.read(0, 4096).await.unwrap();
        d.flush().await.unwrap();
    });
}

fn out_of_range_is_an_error(engine: EngineKind) {
    let f = tmpfile();
    let d = open(f.path(), engine, 1 << 20);
    rt().block_on(async {
        let errs = [
            d.read(1 << 20, 1).await.unwrap_err(),
            d.read(u64::MAX, 4096).await.unwrap_err(),
            d.read(u64::MAX - 10, u32::MAX).await.unwrap_err(),
            d.write(u64::MAX - 100, d.alloc(512), false)
                .await
                .unwrap_err(),
            d.write((1 << 20) - 100, d.alloc(512), true)
                .await
                .unwrap_err(),
            d.trim(u64::MAX, u64::MAX).await.unwrap_err(),
            d.write_zeroes(4096, u64::MAX - 1, true).await.unwrap_err(),
        ];
        for e in errs {
            assert_eq!(e.errno(), libc::EINVAL, "{e}");
        }
        // The last bytes are fine.
        d.write((1 << 20) - 100, d.alloc(100), true).await.unwrap();
        assert_eq!(d.read((1 << 20) - 1, 1).await.unwrap().len(), 1);
    });
}

/// A read's sub-slice (unaligned address) written back at an aligned offset.
fn write_back_unaligned_buffer(engine: EngineKind) {
    let f = tmpfile();
    let d = open(f.path(), engine, 1 << 20);
    rt().block_on(async {
        let data = pattern(8, 16384);
        d.write(0, buf(&d, &data), false).await.unwrap();
        let sub = d.read(100, 4096).await.unwrap();
        assert_ne!(sub.addr() % 512, 0);
        d.write(65536, sub, false).await.unwrap();
        assert_eq!(&d.read(65536, 4096).await.unwrap()[..], &data[100..4196]);
    });
}

fn block_device_4k(engine: EngineKind) {
    block_device(engine, 4096);
}

fn block_device_512(engine: EngineKind) {
    block_device(engine, 512);
}

fn block_device(engine: EngineKind, sector: u32) {
    let Some(lo) = Loop::new(8 << 20, sector) else {
        return;
    };
    let o = DiskOptions {
        engine,
        ..Default::default()
    };
    let d = open_disk(&lo.dev, &o).unwrap();
    assert!(d.is_block_device());
    assert_eq!(d.size(), 8 << 20);
    assert_eq!(d.block_size(), sector);
    rt().block_on(async {
        let data = pattern(9, 1 << 20);
        d.write(0, buf(&d, &data), true).await.unwrap();
        let mut model = data.clone();
        // A 512-byte client write on the device (RMW on a 4K device).
        let s = pattern(10, 512);
        d.write(1536, buf(&d, &s), false).await.unwrap();
        model[1536..2048].copy_from_slice(&s);
        d.write_zeroes(65536, 65536, false).await.unwrap();
        model[65536..131072].fill(0);
        d.write_zeroes(200_000, 5000, true).await.unwrap();
        model[200_000..205_000].fill(0);
        d.trim(524_288, 65536).await.unwrap(); // contents unspecified afterwards
        let got = d.read(0, 524_288).await.unwrap();
        assert_eq!(&got[..], &model[..524_288]);
        d.flush().await.unwrap();
    });
    // A size that disagrees with the device is refused.
    let bad = DiskOptions {
        engine,
        size: Some(4 << 20),
        ..Default::default()
    };
    assert!(open_disk(&lo.dev, &bad).is_err());
}

/// ENOSPC on a 1 MiB tmpfs (O_DIRECT works on tmpfs since Linux 6.6; buffered otherwise).
fn enospc_maps_to_enospc(engine: EngineKind) {
    if !is_root() {
        eprintln!("skipping ENOSPC test: mounting a tiny tmpfs needs root");
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("twinblk-enospc")
        .tempdir_in("/var/tmp")
        .unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "none"])
        .arg(dir.path())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("skipping ENOSPC test: cannot mount tmpfs");
        return;
    }
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _um = Umount(dir.path().to_owned());
    let path = dir.path().join("disk.img");
    let mut o = opts(engine, 8 << 20);
    let d = match open_disk(&path, &o) {
        Ok(d) => d,
        Err(_) => {
            o.cache = CacheMode::Writeback;
            open_disk(&path, &o).unwrap()
        }
    };
    rt().block_on(async {
        let e = d.write(0, d.alloc(4 << 20), false).await.unwrap_err();
        assert_eq!(e.errno(), libc::ENOSPC, "{e}");
        // The disk keeps working for what fits.
        d.write(0, d.alloc(4096), false).await.unwrap();
    });
}

fn writeback_mode(engine: EngineKind) {
    let f = tmpfile();
    let o = DiskOptions {
        engine,
        cache: CacheMode::Writeback,
        size: Some(100_000), // no alignment needed without O_DIRECT
        ..Default::default()
    };
    let d = open_disk(f.path(), &o).unwrap();
    assert_eq!(d.size(), 100_000);
    rt().block_on(async {
        let data = pattern(11, 777);
        d.write(99_000, buf(&d, &data), true).await.unwrap();
        assert_eq!(&d.read(99_000, 777).await.unwrap()[..], &data[..]);
        d.write_zeroes(99_100, 900, false).await.unwrap();
        let got = d.read(99_000, 1000).await.unwrap();
        assert_eq!(&got[..100], &data[..100]);
        assert!(got[100..].iter().all(|&b| b == 0));
    });
}

/// `write_then`, the event loop's way to write: each write reports once, with its own result;
/// the data lands; a flush asked after a reported write covers it; unaligned and out-of-range
/// writes go the slow way with the same result as `write`; and a write never overtakes a
/// read-modify-write holding its blocks.
fn write_then_reports_each_write(engine: EngineKind) {
    let f = tmpfile();
    let d = open(f.path(), engine, 1 << 20);
    let rt = rt();
    rt.block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let report = |id: u64| {
            let tx = tx.clone();
            move |r: Result<(), DiskError>| {
                let _ = tx.send((id, r.map_err(|e| e.errno())));
            }
        };
        for i in 0..8u64 {
            let order = if i % 2 == 0 {
                SubmitOrder::Now
            } else {
                SubmitOrder::AfterWokenTasks
            };
            d.write_then(
                i * 4096,
                buf(&d, &pattern(i, 4096)),
                i == 7,
                order,
                report(i),
            );
        }
        // A network frame's payload: in unaligned memory (copied, then written directly).
        let mut frame = vec![0u8; 4097];
        frame[1..].copy_from_slice(&pattern(11, 4096));
        let payload = IoBuf::from_bytes(bytes::Bytes::from(frame).slice(1..));
        d.write_then(11 * 4096, payload, false, SubmitOrder::Now, report(11));
        // Unaligned (a read-modify-write underneath) and out of range.
        d.write_then(
            8 * 4096 + 3,
            buf(&d, &pattern(8, 100)),
            false,
            SubmitOrder::Now,
            report(8),
        );
        d.write_then(
            1 << 20,
            buf(&d, &pattern(9, 4096)),
            false,
            SubmitOrder::Now,
            report(9),
        );
        let mut got = Vec::new();
        for _ in 0..11 {
            got.push(rx.recv().await.unwrap());
        }
        got.sort();
        let want: Vec<_> = (0..9u64)
            .map(|i| (i, Ok(())))
            .chain([(9, Err(libc::EINVAL)), (11, Ok(()))])
            .collect();
        assert_eq!(got, want);
        assert!(rx.try_recv().is_err(), "a write reported twice");
        for i in (0..8u64).chain([11]) {
            assert_eq!(
                &d.read(i * 4096, 4096).await.unwrap()[..],
                &pattern(i, 4096)[..]
            );
        }
        assert_eq!(
            &d.read(8 * 4096 + 3, 100).await.unwrap()[..],
            &pattern(8, 100)[..]
        );
        // A reported write counts for the next flush: it runs an fdatasync.
        d.flush().await.unwrap();
        let before = d.flushes_issued();
        d.write_then(
            10 * 4096,
            buf(&d, &pattern(10, 4096)),
            false,
            SubmitOrder::Now,
            report(10),
        );
        assert_eq!(rx.recv().await.unwrap(), (10, Ok(())));
        d.flush().await.unwrap();
        assert_eq!(
            d.flushes_issued(),
            before + 1,
            "the flush thought nothing was written"
        );

        // A partial-block write holds block 16: a whole-block write there waits for it.
        let a = d.inner.io_align;
        let held = d.inner.lock.exclusive(16 * 4096 / a, 17 * 4096 / a).await;
        d.write_then(
            16 * 4096,
            buf(&d, &pattern(16, 4096)),
            false,
            SubmitOrder::Now,
            report(16),
        );
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(
            rx.try_recv().is_err(),
            "the write overtook the read-modify-write"
        );
        assert!(
            d.read(16 * 4096, 4096)
                .await
                .unwrap()
                .iter()
                .all(|&b| b == 0),
            "the write landed under the read-modify-write"
        );
        drop(held);
        assert_eq!(rx.recv().await.unwrap(), (16, Ok(())));
        assert_eq!(
            &d.read(16 * 4096, 4096).await.unwrap()[..],
            &pattern(16, 4096)[..]
        );
    });
    // A read-only disk refuses, through the callback.
    drop(d);
    let o = DiskOptions {
        engine,
        read_only: true,
        ..Default::default()
    };
    let d = open_disk(f.path(), &o).unwrap();
    rt.block_on(async {
        let (tx, rx) = tokio::sync::oneshot::channel();
        d.write_then(0, d.alloc(4096), false, SubmitOrder::Now, move |r| {
            let _ = tx.send(r.map_err(|e| e.errno()));
        });
        assert_eq!(rx.await.unwrap(), Err(libc::EPERM));
    });
}

macro_rules! for_each_engine {
    ($($name:ident),* $(,)?) => {
        mod uring_engine {
            $( #[test] fn $name() { super::$name(super::EngineKind::Uring) } )*
        }
        mod threads_engine {
            $( #[test] fn $name() { super::$name(super::EngineKind::Threads) } )*
        }
        mod uring_inline_engine {
            $( #[test] fn $name() { super::$name(super::EngineKind::UringInline) } )*
        }
    };
}

for_each_engine!(
    aligned_round_trip,
    unaligned_matches_model,
    concurrent_rmw_same_block,
    trim_reads_back_zero,
    write_zeroes_variants,
    flush_and_fua,
    read_only_refuses_writes,
    out_of_range_is_an_error,
    write_back_unaligned_buffer,
    block_device_4k,
    block_device_512,
    enospc_maps_to_enospc,
    writeback_mode,
    write_then_reports_each_write,
);

// ---------------------------------------------------------------- open, size, alignment

#[test]
fn size_creates_and_extends_never_shrinks() {
    let dir = tempfile::Builder::new()
        .prefix("twinblk-size")
        .tempdir_in("/var/tmp")
        .unwrap();
    let p = dir.path().join("img");
    // Missing file without size: a clear error naming the path.
    let e = Disk::open(&p, &DiskOptions::default()).unwrap_err();
    assert!(e.to_string().contains("img"), "{e}");
    let d = Disk::open(&p, &opts(EngineKind::Threads, 1 << 20)).unwrap();
    assert_eq!(d.size(), 1 << 20);
    drop(d);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
    let d = Disk::open(&p, &opts(EngineKind::Threads, 4 << 20)).unwrap();
    assert_eq!(d.size(), 4 << 20);
    drop(d);
    assert_eq!(
        Disk::open(&p, &opts(EngineKind::Threads, 4 << 20))
            .unwrap()
            .size(),
        4 << 20
    );
    let e = Disk::open(&p, &opts(EngineKind::Threads, 1 << 20)).unwrap_err();
    assert!(e.to_string().contains("never shrunk"), "{e}");
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 4 << 20);
    let d = Disk::open(&p, &DiskOptions::default()).unwrap();
    assert_eq!(d.size(), 4 << 20);
    // O_DIRECT needs a block-multiple size.
    let e = Disk::open(&p, &opts(EngineKind::Threads, (8 << 20) + 100)).unwrap_err();
    assert!(e.to_string().contains("multiple"), "{e}");
}

#[test]
fn unaligned_existing_file_exports_aligned_part() {
    let f = tmpfile();
    f.as_file().set_len(10_000).unwrap();
    let d = Disk::open(f.path(), &DiskOptions::default()).unwrap();
    assert_eq!(
        d.size() % u64::from(d.block_size().min(d.inner.io_align as u32)),
        0
    );
    assert!(d.size() <= 10_000 && d.size() >= 10_000 - 4096);
}

#[test]
fn no_odirect_filesystem_names_the_fix() {
    let o = DiskOptions {
        read_only: true,
        ..Default::default()
    };
    let e = Disk::open(Path::new("/proc/version"), &o).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("/proc/version"), "{msg}");
    assert!(
        msg.contains("O_DIRECT") && msg.contains("--cache writeback"),
        "{msg}"
    );
}

#[test]
fn file_block_size_follows_dio_alignment() {
    let f = tmpfile();
    let d = Disk::open(f.path(), &opts(EngineKind::Threads, 1 << 20)).unwrap();
    let dio = file::file_dio_align(f.as_file()).unwrap_or(512);
    let want = if dio <= 512 { 512 } else { 4096 };
    assert_eq!(d.block_size(), want);
    assert!(d.inner.io_align >= 512 && d.inner.io_align % 512 == 0);
}

#[test]
fn errno_mapping() {
    let io = |errno| DiskError::Io {
        op: "write",
        offset: 0,
        len: 0,
        source: std::io::Error::from_raw_os_error(errno),
    };
    assert_eq!(io(libc::ENOSPC).errno(), libc::ENOSPC);
    assert_eq!(io(libc::EDQUOT).errno(), libc::ENOSPC);
    assert_eq!(io(libc::EIO).errno(), libc::EIO);
    assert_eq!(io(libc::EBADMSG).errno(), libc::EIO);
    assert_eq!(io(libc::EROFS).errno(), libc::EPERM);
    let other = DiskError::Io {
        op: "read",
        offset: 0,
        len: 0,
        source: std::io::Error::other("x"),
    };
    assert_eq!(other.errno(), libc::EIO);
}

#[test]
fn default_engine_is_usable() {
    let f = tmpfile();
    let d = Disk::open(f.path(), &opts(EngineKind::default(), 1 << 20)).unwrap();
    rt().block_on(async {
        d.write(0, d.alloc(4096), false).await.unwrap();
        d.read(0, 4096).await.unwrap();
    });
}

#[test]
fn inline_without_runtime_falls_back_to_uring() {
    let f = tmpfile();
    let d = Disk::open(f.path(), &opts(EngineKind::UringInline, 1 << 20)).unwrap();
    assert_eq!(d.engine(), EngineKind::Uring);
    rt().block_on(async {
        d.write(0, buf(&d, &pattern(13, 4096)), false)
            .await
            .unwrap();
        assert_eq!(&d.read(0, 4096).await.unwrap()[..], &pattern(13, 4096)[..]);
    });
}

#[test]
fn current_thread_runtime_works() {
    let f = tmpfile();
    for engine in [
        EngineKind::Uring,
        EngineKind::Threads,
        EngineKind::UringInline,
    ] {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            // Opened on this runtime: the inline engine's reaper runs on the same thread.
            let d = Disk::open(f.path(), &opts(engine, 1 << 20)).expect("open disk");
            assert_eq!(d.engine(), engine, "engine fell back");
            let data = pattern(12, 4096);
            let mut set = tokio::task::JoinSet::new();
            for i in 0..64u64 {
                let d = d.clone();
                let data = data.clone();
                set.spawn(async move { d.write(i * 4096, buf(&d, &data), false).await });
            }
            while let Some(r) = set.join_next().await {
                r.unwrap().unwrap();
            }
            assert_eq!(&d.read(63 * 4096, 4096).await.unwrap()[..], &data[..]);
        });
    }
}

/// The threaded ring completes through a task on the runtime it was opened on; once that runtime
/// is gone, it must complete ops itself instead of losing them.
#[test]
fn uring_outlives_the_runtime_it_was_opened_on() {
    let f = tmpfile();
    let d = {
        let first = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let d = first
            .block_on(async { Disk::open(f.path(), &opts(EngineKind::Uring, 1 << 20)) })
            .expect("open disk");
        assert_eq!(d.engine(), EngineKind::Uring, "engine fell back");
        first.block_on(async {
            d.write(0, buf(&d, &pattern(21, 4096)), false)
                .await
                .unwrap();
        });
        d
    };
    rt().block_on(async {
        for i in 1..8u64 {
            d.write(i * 4096, buf(&d, &pattern(21 + i, 4096)), false)
                .await
                .unwrap();
        }
        for i in 0..8u64 {
            let got = d.read(i * 4096, 4096).await.unwrap();
            assert_eq!(&got[..], &pattern(21 + i, 4096)[..], "block {i}");
        }
    });
}

/// CPU time this thread has used.
fn thread_cpu() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec for the call to fill.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(r, 0, "clock_gettime");
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// With polling on, the inline engine completes every op through the poll loop (its driver
/// shares the thread with the callers), and once the disk goes idle it sleeps again instead of
/// spinning on: an idle export must cost no CPU.
#[test]
fn polling_engine_completes_io_and_sleeps_when_idle() {
    let f = tmpfile();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let o = DiskOptions {
            poll: std::time::Duration::from_millis(2),
            ..opts(EngineKind::UringInline, 1 << 20)
        };
        let d = Disk::open(f.path(), &o).expect("open disk");
        assert_eq!(d.engine(), EngineKind::UringInline, "engine fell back");
        for round in 0..3u64 {
            let mut set = tokio::task::JoinSet::new();
            for i in 0..64u64 {
                let d = d.clone();
                let data = pattern(round * 100 + i, 4096);
                set.spawn(async move { d.write(i * 4096, buf(&d, &data), false).await });
            }
            while let Some(r) = set.join_next().await {
                r.unwrap().unwrap();
            }
            d.flush().await.unwrap();
            for i in 0..64u64 {
                let got = d.read(i * 4096, 4096).await.unwrap();
                assert_eq!(&got[..], &pattern(round * 100 + i, 4096)[..], "block {i}");
            }
        }
        // Idle for 300 ms on the driver's own thread: a driver that kept polling would burn
        // about all of it; one that went to sleep after its 2 ms window burns next to nothing.
        let before = thread_cpu();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let used = thread_cpu() - before;
        assert!(
            used < std::time::Duration::from_millis(150),
            "idle disk used {used:?} of CPU in 300 ms: the engine kept polling"
        );
    });
}

/// FLUSHes that arrive together share one fdatasync, a FLUSH with nothing written since the last
/// one costs none, and a write after it gets one of its own; every engine, on a real file.
#[test]
fn concurrent_flushes_share_one_fdatasync() {
    for engine in [
        EngineKind::Uring,
        EngineKind::Threads,
        EngineKind::UringInline,
    ] {
        let f = tmpfile();
        let d = open(f.path(), engine, 1 << 20);
        rt().block_on(async {
            for i in 0..16u64 {
                d.write(i * 4096, buf(&d, &pattern(i, 4096)), false)
                    .await
                    .unwrap();
            }
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..32 {
                let d = d.clone();
                set.spawn(async move { d.flush().await });
            }
            while let Some(r) = set.join_next().await {
                r.unwrap().unwrap();
            }
            // All 32 asked after the same writes: the first flush covers them; the rest either
            // shared it or, arriving while it ran, found it covered them once it finished.
            assert_eq!(d.flushes_issued(), 1, "{engine:?}");
            d.flush().await.unwrap();
            assert_eq!(d.flushes_issued(), 1, "{engine:?}: nothing new to flush");
            d.write(0, buf(&d, &pattern(99, 4096)), false)
                .await
                .unwrap();
            d.flush().await.unwrap();
            assert_eq!(d.flushes_issued(), 2, "{engine:?}");
            // A FUA write of no bytes is a flush too.
            d.write(4096, buf(&d, &pattern(98, 4096)), false)
                .await
                .unwrap();
            d.write(0, buf(&d, &[]), true).await.unwrap();
            assert_eq!(d.flushes_issued(), 3, "{engine:?}");
        });
        let on_disk = std::fs::read(f.path()).unwrap();
        assert_eq!(&on_disk[..4096], &pattern(99, 4096)[..]);
    }
}
