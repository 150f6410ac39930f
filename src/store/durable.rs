//! Making many files durable together, without flushing anybody else's.
//!
//! Owns: [`sync_files_together`] and [`sync_dirs_together`] (one `fdatasync`/`fsync` per file
//! or folder, issued from a few threads at once), and [`start_writeback`] (asks the kernel to
//! begin writing a file's dirty pages now, without waiting). Does not own: what is written,
//! where, or when a file gets its name (the callers decide that: bytes durable first, then the
//! name, then the folder).
//!
//! Why not `syncfs`: it flushes every dirty page of the whole file system, including files of
//! other processes that never asked for it. A sending node's outbox copies are written without
//! a flush on purpose (they are deleted once the partner's receipt arrives, so on the happy path
//! their pages never reach the disk); a receiver on the same disk calling `syncfs` would write
//! them anyway and wait for it. One `fdatasync` per file costs a journal commit each when issued
//! one after the other, but issued from several threads at once the file system groups them into
//! shared commits (ext4's and xfs's journals batch concurrent commits) and the disk queue stays
//! full, so a group of files costs about what its bytes cost.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// At most this many threads flush at once (enough to keep a disk queue full; each costs a
/// thread stack, no more).
const FLUSHERS: usize = 8;

/// Runs `flush` on every item from a few threads at once; the first failure is returned with
/// its item (after every thread has stopped).
fn in_parallel<T: Sync>(
    items: &[T],
    flush: impl Fn(&T) -> std::io::Result<()> + Sync,
) -> Result<(), (usize, std::io::Error)> {
    if items.len() <= 1 {
        return items
            .iter()
            .enumerate()
            .try_for_each(|(i, t)| flush(t).map_err(|e| (i, e)));
    }
    let next = AtomicUsize::new(0);
    let failed: std::sync::Mutex<Option<(usize, std::io::Error)>> = Default::default();
    let work = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(item) = items.get(i) else { break };
        if let Err(e) = flush(item) {
            failed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert((i, e));
            // Stop the others early: the group fails as a whole.
            next.store(items.len(), Ordering::Relaxed);
            break;
        }
    };
    let threads = items.len().min(FLUSHERS);
    std::thread::scope(|scope| {
        for _ in 1..threads {
            // A thread that cannot start leaves its share to the others.
            let _ = std::thread::Builder::new()
                .name("flush".into())
                .spawn_scoped(scope, work);
        }
        work();
    });
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(f) => Err(f),
        None => Ok(()),
    }
}

/// Makes the bytes of every open file in `files` durable (`fdatasync` each, several at once).
pub fn sync_open_files(files: &[&fs::File]) -> Result<(), std::io::Error> {
    in_parallel(files, |f| f.sync_data()).map_err(|(_, e)| e)
}

/// Makes the bytes of every file in `paths` durable (`fdatasync` each, several at once).
/// On failure, says which file.
pub fn sync_files_together(paths: &[&Path]) -> Result<(), (PathBuf, std::io::Error)> {
    in_parallel(paths, |p| fs::File::open(p)?.sync_data())
        .map_err(|(i, e)| (paths[i].to_path_buf(), e))
}

/// Makes the entries of every folder in `dirs` durable (`fsync` each, several at once): a
/// rename or link into a folder is durable once the folder is.
pub fn sync_dirs_together(dirs: &[&Path]) -> Result<(), (PathBuf, std::io::Error)> {
    in_parallel(dirs, |d| fs::File::open(d)?.sync_all())
        .map_err(|(i, e)| (dirs[i].to_path_buf(), e))
}

/// Asks the kernel to start writing `file`'s dirty pages to disk now, in the background, so that
/// a later flush finds little left to do while the disk works during the rest of the transfer.
/// Only advice (Linux: `POSIX_FADV_DONTNEED` starts write-back of dirty pages and drops clean
/// ones; pages still dirty or under write-back stay cached): its result is moot.
pub fn start_writeback(file: &fs::File) {
    #[cfg(target_os = "linux")]
    let _ = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed);
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_files_and_folders_are_flushed_and_a_missing_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<PathBuf> = (0..20)
            .map(|i| {
                let p = dir.path().join(format!("{i}.bin"));
                fs::write(&p, vec![i as u8; 1000]).unwrap();
                p
            })
            .collect();
        let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
        sync_files_together(&refs).unwrap();
        sync_dirs_together(&[dir.path()]).unwrap();
        let opened: Vec<fs::File> = paths.iter().map(|p| fs::File::open(p).unwrap()).collect();
        sync_open_files(&opened.iter().collect::<Vec<_>>()).unwrap();

        let gone = dir.path().join("gone.bin");
        let mut with_missing = refs.clone();
        with_missing.insert(7, &gone);
        let (path, e) = sync_files_together(&with_missing).unwrap_err();
        assert_eq!(path, gone);
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }
}
