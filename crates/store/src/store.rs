//! `RedbStore`: the node's properties on redb, with the live Merkle tree of every (group, shard)
//! kept in the same write transactions.
//!
//! This file answers "what is a store, and how is it opened?": the struct, [`RedbStore::open`],
//! its accessors and the write transaction every other room commits through. The rest of the store
//! is in rooms, one question each:
//!
//! - `writer`: how does a write reach the database (validation done, version order applied, leaf
//!   log appended, revision bumped, in one transaction shared by the writes that waited for the
//!   same sync: `crate::group_commit`)?
//! - `snapshot`: what does a reader see (a consistent view, lookups and scans)?
//! - `query`: which properties of a group match a query?
//! - `trees`: what is a shard's tree, fresh, at a snapshot?
//! - `handover`: how does a node drop a shard whose copies moved to other nodes?
//! - `maintenance`: how are trees flushed, verified and healed, and complete rounds recorded?
//! - `purge`: how are tombstones purged while writes keep flowing?
//! - `recorded`: which shape and groups was the database created with, and do they still match?
//! - `repair`: how does the repair protocol see this store?
//! - `rows`: how are stored rows and bookkeeping read back?
//! - `quarantine`: where does a row that fails its check go?

mod handover;
mod maintenance;
mod purge;
mod quarantine;
mod query;
mod recorded;
mod repair;
mod rows;
mod snapshot;
mod trees;
mod writer;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use propd_merkle::Shape;
use redb::{Database, Durability, WriteTransaction};

use crate::config::{Groups, StoreConfig, TreeUpkeep, WriteDurability};
use crate::error::{ConfigError, StoreError};
use crate::group_commit::GroupCommit;
use crate::tables::{CONFIG, CONFIG_PROBE};
use crate::validate::{GroupTable, Rules};

pub use maintenance::{
    PURGE_CHUNK, PurgeReport, PurgeState, ScrubReport, VerifyOutcome, purge_line, round_cutoff,
};
pub use purge::{PURGE_PACE, PurgePace};
pub use quarantine::QuarantinedRow;
use quarantine::RotQueue;
pub use query::{Query, QueryPage};
pub use snapshot::{ShardScan, Snapshot};
pub use trees::TreeView;
pub use writer::DeleteOutcome;
#[cfg(feature = "test-support")]
pub(crate) use writer::tombstone;

/// The node's property store on redb: one database file in the data directory, four tables per
/// (group, shard) (docs/formats.md). `Send + Sync`: share it behind an `Arc`; redb serializes
/// writers and readers never block.
#[derive(Debug)]
pub struct RedbStore {
    /// The open database; replaced by a fresh handle when a write failed on an I/O error
    /// ([`RedbStore::recover`]), because redb refuses every later write on the old one.
    db: RwLock<Option<Arc<Database>>>,
    cache_bytes: Option<usize>,
    /// The last write's I/O failure, until [`RedbStore::recover`] reopened the database and a
    /// write went through again.
    io_fault: Mutex<Option<IoFault>>,
    rules: Arc<Rules>,
    upkeep: TreeUpkeep,
    durability: WriteDurability,
    flush_threshold: u64,
    path: PathBuf,
    /// Synced property writes waiting to share a transaction; `None` when each write commits
    /// alone (group commit off, or writes not synced).
    commits: Option<GroupCommit<writer::ShardWrite, writer::Written>>,
    rot: Arc<RotQueue>,
    /// The last damage a read met, until a scrub of the whole store passes.
    damage: Mutex<Option<String>>,
    /// Write transactions other than a purge's waiting for redb's writer: a purge gives the
    /// writer up to them (`purge`).
    waiting_writes: AtomicUsize,
    /// Write transactions other than a purge's waiting for redb's writer or holding it: a purge
    /// takes the writer itself only when there is none (`purge`).
    busy_writes: AtomicUsize,
    /// The purges in progress, whose steps the property writes' transactions carry (`purge`).
    purges: purge::Purges,
    /// Synced commits since the store was opened: a purge syncs its own transactions only when
    /// no other write did for a while.
    durable_commits: AtomicU64,
}

/// Whose write transaction it is, for the count of writes waiting for the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writer {
    /// Any write but a purge's: counted while it waits for the writer.
    Counted,
    /// A purge's: never counted (a purge gives way to the others).
    Purge,
}

/// A write that failed on an I/O error.
#[derive(Debug, Clone)]
struct IoFault {
    /// What the error said.
    detail: String,
    /// Whether it was a lack of space.
    disk_full: bool,
    /// Whether the database handle still has to be reopened (redb refuses writes on it).
    reopen: bool,
}

/// Whether the store can serve, as `/health` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreHealth {
    /// Nothing wrong was seen.
    Ok,
    /// Writes fail for lack of space; reads go on. Clears by itself once space is freed.
    DiskFull(String),
    /// Writes failed on another I/O error; reads go on. Clears once a write goes through.
    WritesFailing(String),
    /// A read met a damaged page or a panic inside redb: some rows cannot be read. The message
    /// names the table and key range.
    Damaged(String),
}

impl RedbStore {
    /// Opens (or creates) the store in `config.data_dir`.
    ///
    /// The first open records the tree shape and each group's `shard_num`; a later open with
    /// another shape, or another `shard_num` for a recorded group, is refused
    /// ([`ConfigError::ShapeChanged`], [`ConfigError::ShardNumChanged`]). New groups may be added.
    pub fn open(config: StoreConfig) -> Result<Self, StoreError> {
        match RedbStore::open_file(&config) {
            Err(StoreError::DamagedFile { path, detail }) if config.start_empty_if_damaged => {
                let aside = set_aside(&path)?;
                tracing::warn!(
                    path = %path.display(),
                    kept_as = %aside.display(),
                    detail,
                    "the database file is damaged; starting with an empty store as configured"
                );
                RedbStore::open_file(&config)
            }
            other => other,
        }
    }

    /// [`RedbStore::open`] without the fallback for a damaged file.
    fn open_file(config: &StoreConfig) -> Result<Self, StoreError> {
        config.shape.validate().map_err(ConfigError::Shape)?;
        std::fs::create_dir_all(&config.data_dir).map_err(|source| StoreError::Io {
            path: config.data_dir.clone(),
            source,
        })?;
        let path = config.database_path();
        let (db, existed) = open_database(config, &path)?;
        let store = RedbStore {
            db: RwLock::new(Some(Arc::new(db))),
            cache_bytes: config.cache_bytes,
            io_fault: Mutex::new(None),
            rules: Arc::new(Rules {
                groups: GroupTable::new(config.groups.clone()),
                shape: config.shape,
                max_property_bytes: config.max_property_bytes,
                read_check: config.read_check,
            }),
            upkeep: config.tree_upkeep,
            durability: config.durability,
            flush_threshold: config.flush_threshold,
            path,
            commits: (config.group_commit && config.durability == WriteDurability::Immediate)
                .then(GroupCommit::default),
            rot: Arc::default(),
            damage: Mutex::new(None),
            waiting_writes: AtomicUsize::new(0),
            busy_writes: AtomicUsize::new(0),
            purges: purge::Purges::default(),
            durable_commits: AtomicU64::new(0),
        };
        store.guarded(|| store.check_recorded_config(existed))?;
        store.guarded(|| store.check_shard_tables())?;
        tracing::debug!(path = %store.path.display(), "store opened");
        Ok(store)
    }

    /// Whether the store can serve: [`StoreHealth::Damaged`] once a read met a damaged page,
    /// until [`RedbStore::clear_damage`] (the node calls it after a scrub of every shard passed).
    /// A write that failed on an I/O error shows as [`StoreHealth::DiskFull`] or
    /// [`StoreHealth::WritesFailing`] until [`RedbStore::recover`] got a write through.
    pub fn health(&self) -> StoreHealth {
        if let Some(fault) = &*self.io_fault.lock().unwrap_or_else(PoisonError::into_inner) {
            return if fault.disk_full {
                StoreHealth::DiskFull(fault.detail.clone())
            } else {
                StoreHealth::WritesFailing(fault.detail.clone())
            };
        }
        match &*self.damage.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(detail) => StoreHealth::Damaged(detail.clone()),
            None => StoreHealth::Ok,
        }
    }

    /// Recovers from a write's I/O failure: after a full disk, waits until the disk has room
    /// for the largest property; reopens the database (redb refuses every write on a handle
    /// that met one; acknowledged writes are on disk and come back with it), then probes with
    /// a small synced write. Returns whether writes work again; does nothing and
    /// returns true when no write failed. The node calls it every second while the store is
    /// unhealthy, so the store recovers by itself once space is freed.
    pub fn recover(&self) -> Result<bool, StoreError> {
        let Some(fault) = self.io_fault() else {
            return Ok(true);
        };
        if fault.reopen {
            self.reopen()?;
            if let Some(fault) = &mut *self.io_fault.lock().unwrap_or_else(PoisonError::into_inner)
            {
                fault.reopen = false;
            }
        }
        // The disk stays full until it has room for the largest property: a few free pages
        // inside the file would let a small probe through while real writes still fail.
        if fault.disk_full
            && free_bytes(&self.path)
                .is_some_and(|free| free < self.rules.max_property_bytes as u64 + PROBE_SLACK)
        {
            return Ok(false);
        }
        // A probe: one synced commit that allocates a page, as a property write would.
        let probed = self.write(Durability::Immediate, |txn| {
            txn.open_table(CONFIG)?
                .insert(CONFIG_PROBE, [0u8; 64].as_slice())?;
            Ok(())
        });
        match probed {
            Ok(()) => {
                self.io_fault
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                tracing::info!(path = %self.path.display(), "writes work again");
                Ok(true)
            }
            Err(StoreError::DiskFull { .. }) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Whether a write failed on an I/O error and [`RedbStore::recover`] has not got one through
    /// since.
    pub fn writes_failing(&self) -> bool {
        self.io_fault().is_some()
    }

    fn io_fault(&self) -> Option<IoFault> {
        self.io_fault
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the database handle by a fresh one on the same file. redb locks the file per
    /// handle, so the old one is dropped first: once the write lock is held nobody can take the
    /// handle, and those that took it before let go as soon as their transaction began.
    fn reopen(&self) -> Result<(), StoreError> {
        let mut slot = self.db.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(mut old) = slot.take() {
            let mut spins = 0u32;
            loop {
                match Arc::try_unwrap(old) {
                    Ok(db) => break drop(db),
                    Err(shared) if spins < 100_000 => {
                        old = shared;
                        spins += 1;
                        std::thread::yield_now();
                    }
                    Err(shared) => {
                        *slot = Some(shared);
                        return Err(StoreError::Database(redb::Error::DatabaseAlreadyOpen));
                    }
                }
            }
        }
        // A read transaction of the old handle still holds the file's lock until it ends.
        let mut attempts = 0;
        let db = loop {
            let mut builder = Database::builder();
            if let Some(bytes) = self.cache_bytes {
                builder.set_cache_size(bytes);
            }
            match builder.create(&self.path) {
                Ok(db) => break db,
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if attempts < 200 => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(error) => return Err(error.into()),
            }
        };
        *slot = Some(Arc::new(db));
        tracing::info!(path = %self.path.display(), "database reopened after an I/O error");
        Ok(())
    }

    /// The current database handle; none only while a reopen failed.
    pub(crate) fn database(&self) -> Result<Arc<Database>, StoreError> {
        self.db
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| StoreError::WritesFailing {
                path: self.path.clone(),
                detail: "the database could not be reopened after an I/O error".to_owned(),
            })
    }

    /// Forgets the damage seen so far (after a scrub of every shard read every row).
    pub fn clear_damage(&self) {
        *self.damage.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Runs a store operation at the store's boundary: a panic inside redb (it panics on some
    /// damaged pages) becomes [`StoreError::Damaged`], and damage is noted for
    /// [`RedbStore::health`].
    pub(crate) fn guarded<T>(
        &self,
        operation: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let result = catch_unwind(AssertUnwindSafe(operation)).unwrap_or_else(|panic| {
            Err(StoreError::Damaged {
                path: PathBuf::new(),
                table: "(unknown)".to_owned(),
                keys: "(unknown keys)".to_owned(),
                detail: format!("redb panicked: {}", panic_message(panic.as_ref())),
            })
        });
        let result = result.map_err(|error| match error {
            StoreError::Database(redb::Error::Corrupted(detail)) => StoreError::Damaged {
                path: self.path.clone(),
                table: "(unknown)".to_owned(),
                keys: "(unknown keys)".to_owned(),
                detail,
            },
            StoreError::Damaged {
                table,
                keys,
                detail,
                ..
            } => StoreError::Damaged {
                path: self.path.clone(),
                table,
                keys,
                detail,
            },
            error => error,
        });
        if let Err(error @ StoreError::Damaged { .. }) = &result {
            tracing::error!(%error, "the store is damaged");
            *self.damage.lock().unwrap_or_else(PoisonError::into_inner) = Some(error.to_string());
        }
        result
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tree shape of every shard.
    pub fn shape(&self) -> Shape {
        self.rules.shape
    }

    /// The group definitions (a running store may gain groups: [`RedbStore::add_groups`]).
    pub fn groups(&self) -> Arc<Groups> {
        self.rules.groups.current()
    }

    /// Runs `f` in a write transaction and commits it with the configured durability; on an
    /// error the transaction is aborted and nothing changes.
    fn write<T>(
        &self,
        durability: Durability,
        f: impl FnOnce(&WriteTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.write_as(Writer::Counted, durability, f)
    }

    /// [`RedbStore::write`] for a purge's transaction: not counted among the writes waiting for
    /// the writer.
    fn write_purge<T>(
        &self,
        durability: Durability,
        f: impl FnOnce(&WriteTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.write_as(Writer::Purge, durability, f)
    }

    fn write_as<T>(
        &self,
        writer: Writer,
        durability: Durability,
        f: impl FnOnce(&WriteTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if let Some(fault) = self.io_fault()
            && fault.reopen
        {
            // redb refuses every write on this handle; fail fast until `recover` reopens it.
            return Err(self.io_error(&fault));
        }
        let result = self.guarded(|| self.write_unguarded(writer, durability, f));
        match result {
            Err(StoreError::Database(redb::Error::Io(error))) => {
                let fault = IoFault {
                    disk_full: error.kind() == std::io::ErrorKind::StorageFull,
                    detail: error.to_string(),
                    reopen: true,
                };
                tracing::error!(path = %self.path.display(), error = fault.detail, disk_full = fault.disk_full, "a write failed on an I/O error");
                let error = self.io_error(&fault);
                *self.io_fault.lock().unwrap_or_else(PoisonError::into_inner) = Some(fault);
                Err(error)
            }
            Err(StoreError::Database(redb::Error::PreviousIo)) => {
                let fault = IoFault {
                    disk_full: false,
                    detail: "a previous write failed on an I/O error".to_owned(),
                    reopen: true,
                };
                let error = self.io_error(&fault);
                self.io_fault
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get_or_insert(fault)
                    .reopen = true;
                Err(error)
            }
            Ok(value) => {
                // A write that went through ends another I/O fault; a full disk ends only when
                // `recover`'s probe (as large as the largest property) goes through.
                let mut fault = self.io_fault.lock().unwrap_or_else(PoisonError::into_inner);
                if fault.as_ref().is_some_and(|fault| !fault.disk_full) {
                    *fault = None;
                }
                Ok(value)
            }
            Err(error) => Err(error),
        }
    }

    /// The error a write returns while `fault` stands.
    fn io_error(&self, fault: &IoFault) -> StoreError {
        if fault.disk_full {
            StoreError::DiskFull {
                path: self.path.clone(),
                detail: fault.detail.clone(),
            }
        } else {
            StoreError::WritesFailing {
                path: self.path.clone(),
                detail: fault.detail.clone(),
            }
        }
    }

    fn write_unguarded<T>(
        &self,
        writer: Writer,
        durability: Durability,
        f: impl FnOnce(&WriteTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let db = self.database()?;
        let _busy = (writer == Writer::Counted).then(|| Waiting::new(&self.busy_writes));
        let mut txn = match writer {
            Writer::Counted => {
                let _waiting = Waiting::new(&self.waiting_writes);
                db.begin_write()?
            }
            Writer::Purge => db.begin_write()?,
        };
        txn.set_durability(durability)?;
        match f(&txn) {
            Ok(value) => {
                txn.commit()?;
                if matches!(durability, Durability::Immediate) {
                    self.durable_commits.fetch_add(1, Ordering::Release);
                }
                Ok(value)
            }
            Err(error) => {
                txn.abort()?;
                Err(error)
            }
        }
    }

    /// The durability of property writes, as configured.
    fn data_durability(&self) -> Durability {
        match self.durability {
            WriteDurability::Immediate => Durability::Immediate,
            WriteDurability::NotSynced => Durability::None,
        }
    }
}

/// Opens the database file, or creates it when there is none; says whether it existed. An existing file that is empty,
/// that redb refuses, or on which redb panics is [`StoreError::DamagedFile`]: a node never
/// starts silently empty over a file it could not read.
fn open_database(config: &StoreConfig, path: &Path) -> Result<(Database, bool), StoreError> {
    let damaged = |detail: String| StoreError::DamagedFile {
        path: path.to_owned(),
        detail,
    };
    let exists = match std::fs::metadata(path) {
        Ok(meta) if meta.len() == 0 => {
            return Err(damaged("the file is empty (0 bytes)".to_owned()));
        }
        Ok(_) => true,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => false,
        Err(source) => {
            return Err(StoreError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    let mut builder = Database::builder();
    if let Some(bytes) = config.cache_bytes {
        builder.set_cache_size(bytes);
    }
    let opened = catch_unwind(AssertUnwindSafe(|| {
        if exists {
            builder.open(path)
        } else {
            builder.create(path)
        }
    }));
    match opened {
        Ok(Ok(db)) => Ok((db, exists)),
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => {
            Err(StoreError::Database(redb::Error::DatabaseAlreadyOpen))
        }
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Io(source)))) => {
            Err(StoreError::Io {
                path: path.to_owned(),
                source,
            })
        }
        Ok(Err(error)) => Err(damaged(format!("redb cannot open it: {error}"))),
        Err(panic) => Err(damaged(format!(
            "redb panicked opening it: {}",
            panic_message(panic.as_ref())
        ))),
    }
}

/// One write counted among those waiting for the writer while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Free space a disk needs beyond the largest property before a full disk counts as freed.
const PROBE_SLACK: u64 = 64 << 10;

/// The bytes free for unprivileged writes on the file system holding `path`, `None` when it
/// cannot be asked.
fn free_bytes(path: &Path) -> Option<u64> {
    let stat = rustix::fs::statvfs(path.parent().unwrap_or(path)).ok()?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Renames a damaged database file out of the way (`propd.redb.damaged`, or `.damaged.N` when
/// that exists) and returns its new path.
fn set_aside(path: &Path) -> Result<PathBuf, StoreError> {
    let io = |source| StoreError::Io {
        path: path.to_owned(),
        source,
    };
    let mut aside = path.with_extension("redb.damaged");
    let mut n = 1;
    while aside.exists() {
        aside = path.with_extension(format!("redb.damaged.{n}"));
        n += 1;
    }
    std::fs::rename(path, &aside).map_err(io)?;
    Ok(aside)
}

/// The message of a caught panic.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|text| (*text).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}
