//! The on-disk cache: a second load is a hit with the same result, and an entry that is not exactly
//! what this user wrote for this key (tampered, renamed, a link, writable by others) is never used.

use gpuslice_ptx::cache::{key, Cache, CacheError};
use gpuslice_ptx::slice_module;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

const SUITE: &str = include_str!("fixtures/suite.ptx");
const EDGE: &str = include_str!("fixtures/edge.ptx");

fn entry(dir: &Path, ptx: &str) -> PathBuf {
    dir.join(format!("{}.slice", key(ptx)))
}

fn open(dir: &Path) -> Cache {
    Cache::open(dir, 1 << 20).unwrap()
}

#[test]
fn second_load_is_a_hit_with_the_same_result() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("gpuslice").join("ptx");
    let cache = open(&dir);
    let (first, hit) = cache.get_or_slice(SUITE).unwrap();
    assert!(!hit);
    assert_eq!(first, slice_module(SUITE).unwrap());
    let (second, hit) = cache.get_or_slice(SUITE).unwrap();
    assert!(hit);
    assert_eq!(second, first);
    // Created private: the directory 0700, the entry 0600.
    assert_eq!(fs::metadata(entry(&dir, SUITE)).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
}

#[test]
fn tampered_renamed_linked_or_shared_entries_are_misses() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path());
    cache.get_or_slice(SUITE).unwrap();
    let path = entry(dir.path(), SUITE);
    let good = fs::read_to_string(&path).unwrap();

    // A body changed after the header was written (say, someone's own code in place of a kernel).
    fs::write(&path, good.replace("%gpuslice0, %gpuslice0, %gpuslice6", "%gpuslice0, %gpuslice6, %gpuslice6")).unwrap();
    assert!(cache.get(SUITE).is_none());

    // Another key's valid entry under this key's name.
    cache.get_or_slice(EDGE).unwrap();
    fs::copy(entry(dir.path(), EDGE), &path).unwrap();
    assert!(cache.get(SUITE).is_none());

    // A link to a valid entry.
    fs::remove_file(&path).unwrap();
    let elsewhere = dir.path().join("elsewhere");
    fs::write(&elsewhere, &good).unwrap();
    symlink(&elsewhere, &path).unwrap();
    assert!(cache.get(SUITE).is_none());

    // The valid entry, but writable by the group.
    fs::remove_file(&path).unwrap();
    fs::write(&path, &good).unwrap();
    assert!(cache.get(SUITE).is_some());
    fs::set_permissions(&path, fs::Permissions::from_mode(0o620)).unwrap();
    assert!(cache.get(SUITE).is_none());

    // A miss is sliced again and replaces the bad entry.
    let (again, hit) = cache.get_or_slice(SUITE).unwrap();
    assert!(!hit);
    assert_eq!(again, slice_module(SUITE).unwrap());
    assert!(cache.get(SUITE).is_some());
}

#[test]
fn a_directory_others_can_write_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
    assert!(matches!(Cache::open(&shared, 1 << 20), Err(CacheError::NotPrivate(..))));
}

#[test]
fn the_size_cap_removes_the_oldest_entries() {
    let dir = tempfile::tempdir().unwrap();
    let one = fs::metadata({
        let c = open(dir.path());
        c.get_or_slice(SUITE).unwrap();
        entry(dir.path(), SUITE)
    })
    .unwrap()
    .len();
    fs::remove_file(entry(dir.path(), SUITE)).unwrap();
    // Room for two entries of the suite's size: the third module pushes out the first.
    let cache = Cache::open(dir.path(), 2 * one + 1000).unwrap();
    let texts: Vec<String> = (0..3).map(|i| format!("{SUITE}// variant {i}\n")).collect();
    for t in &texts {
        cache.get_or_slice(t).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(cache.get(&texts[0]).is_none());
    assert!(cache.get(&texts[1]).is_some() && cache.get(&texts[2]).is_some());
    // An entry larger than the whole cap is not stored at all.
    let tiny = Cache::open(dir.path(), 100).unwrap();
    let (_, hit) = tiny.get_or_slice(EDGE).unwrap();
    assert!(!hit && !entry(dir.path(), EDGE).exists());
}
