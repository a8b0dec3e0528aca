//! Regression test for a full disk (issue "Faults a node meets"): after the first ENOSPC every
//! write failed with redb's "Previous I/O error occurred" even after space was freed, until the
//! node restarted. Now the write says the disk is full, reads go on, and the store reopens its
//! database by itself once space is freed, without losing an acknowledged write.
//!
//! The data directory is a small tmpfs; where mounting is not allowed the test says so and
//! skips.

use std::path::{Path, PathBuf};
use std::process::Command;

use propd_merkle::{Property, Shape, TagValue};
use propd_store::{Query, RedbStore, StoreConfig, StoreError, StoreHealth};

use crate::{entity_of, groups, live};

/// A tmpfs of a few MiB mounted on a temporary directory, unmounted on drop.
struct Tmpfs {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path).ok()?;
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .ok()?;
        mounted
            .status
            .success()
            .then_some(Tmpfs { _dir: dir, path })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

fn big(i: usize) -> Property {
    live(
        "h",
        "n",
        &format!("{i:05}"),
        1,
        &[("blob", TagValue::Binary(vec![i as u8; 2000]))],
    )
}

fn open(dir: &Path) -> RedbStore {
    RedbStore::open(StoreConfig::new(dir, groups(), Shape::default()))
        .unwrap_or_else(|error| panic!("{error}"))
}

#[test]
fn a_full_disk_fails_writes_by_name_and_the_store_recovers_once_space_is_freed() {
    let Some(tmpfs) = Tmpfs::mount("4m") else {
        #[allow(clippy::print_stderr, reason = "a skipped test says why")]
        {
            eprintln!("skipped: mounting a tmpfs is not allowed here");
        }
        return;
    };
    let filler = tmpfs.path.join("filler");
    std::fs::write(&filler, vec![1u8; 2 << 20]).unwrap_or_else(|e| panic!("{e}"));
    let data = tmpfs.path.join("data");
    let store = open(&data);

    let mut acknowledged = Vec::new();
    let full = loop {
        let property = big(acknowledged.len());
        match store.apply(property.clone()) {
            Ok(_) => acknowledged.push(property),
            Err(error) => break error,
        }
        assert!(acknowledged.len() < 10_000, "the tmpfs never filled");
    };
    assert!(matches!(full, StoreError::DiskFull { .. }), "{full}");
    assert!(full.to_string().contains("disk full"), "{full}");
    assert!(matches!(store.health(), StoreHealth::DiskFull(_)));
    assert!(store.writes_failing());
    let again = store.apply(big(99_999));
    assert!(
        matches!(again, Err(StoreError::DiskFull { .. })),
        "{again:?}"
    );
    assert_eq!(
        store.get(&entity_of(&acknowledged[0])).ok().flatten(),
        Some(acknowledged[0].clone()),
        "reads go on while the disk is full"
    );

    assert_eq!(
        store.recover().ok(),
        Some(false),
        "no recovery while the disk has no room for a property"
    );
    assert!(matches!(store.health(), StoreHealth::DiskFull(_)));

    std::fs::remove_file(&filler).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        store.recover().unwrap_or_else(|e| panic!("{e}")),
        "writes work once space is freed"
    );
    assert_eq!(store.health(), StoreHealth::Ok);
    assert!(!store.writes_failing());
    let after = big(acknowledged.len());
    store
        .apply(after.clone())
        .unwrap_or_else(|e| panic!("a write after freeing space: {e}"));
    acknowledged.push(after);
    assert_eq!(
        store
            .query(&Query::group("h"))
            .unwrap_or_else(|e| panic!("{e}")),
        acknowledged
    );
    drop(store);
    assert_eq!(
        open(&data)
            .query(&Query::group("h"))
            .unwrap_or_else(|e| panic!("{e}")),
        acknowledged,
        "every acknowledged write is on disk"
    );
}
