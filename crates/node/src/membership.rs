//! Membership and groups kept in etcd (optional; the static file is the default).
//!
//! Keys under the cluster's prefix `P` (several clusters may share one etcd):
//!
//! - `P/members/<id>`: the member record (JSON `{"addr", "state", "slot"}`), durable. Placement
//!   uses the members whose state is `active`; a `draining` member still serves and is reached,
//!   but holds no copies in the new placement, so its shards move away; `slot` is the name its
//!   rendezvous weights are computed from (its own id, or the id of the member it replaced).
//! - `P/alive/<id>`: the member's address under a lease that the running node keeps alive, so
//!   `member list` tells who runs. A lease that lapses changes nothing else: health never
//!   changes placement.
//! - `P/groups/<name>`: a group (JSON `{"shard_num", "replicas"}`).
//! - `P/moves/<group>/<shard>`: a shard on the move (JSON `{"group", "shard", "leaving"}`): its
//!   old holders, kept in its node list until its new copies complete a round (`moves`). Every
//!   change of members or groups is one transaction that also writes the moves it causes, on
//!   condition that nothing under `members/`, `groups/` or `moves/` changed since it was read;
//!   the origin of the round that ends a move deletes its key, on the same condition.
//!
//! A node registers itself, reads everything, watches the prefix and applies each change to its
//! placement and peers. When etcd cannot be reached it keeps serving on the last membership it
//! saw (also kept in `<data_dir>/membership.json`, so a restart without etcd starts on it), says
//! so in `status` and `/health`, and catches up when etcd answers again.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use propd_store::{GroupDef, Groups};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::auth::AuthLayer;
use crate::config::{Config, Member};
use crate::moves::{MoveRecord, Moves};
use crate::node::{NodeState, lock, now_millis};
use crate::placement::Placement;

/// How long a node's `alive` lease lives without a keep-alive.
const LEASE_TTL_SECONDS: i64 = 10;
/// How often the lease is kept alive.
const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(3);
/// Bound on connecting to etcd and on each call.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause between attempts to reach etcd again.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// How long a starting node tries etcd before it falls back on the membership it saw last.
const START_PATIENCE: Duration = Duration::from_secs(10);
/// The file under `data_dir` that keeps the last membership seen.
const LAST_SEEN_FILE: &str = "membership.json";

/// The `[etcd]` table: where membership and groups live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EtcdConfig {
    /// `etcd.endpoints`: client URLs (`http://127.0.0.1:2379`).
    pub(crate) endpoints: Vec<String>,
    /// `etcd.prefix`: the key prefix of this cluster (several clusters may share one etcd).
    pub(crate) prefix: String,
    /// `etcd.tls_*`: TLS to etcd (`https://` endpoints); `None`: plaintext (`http://`).
    pub(crate) tls: Option<EtcdTls>,
}

/// TLS to etcd: the CA that signs etcd's certificate, and this client's certificate for an etcd
/// that asks for one (`--client-cert-auth`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EtcdTls {
    /// `etcd.tls_ca` (PEM).
    pub(crate) ca: PathBuf,
    /// `etcd.tls_cert` and `etcd.tls_key` (PEM), given together.
    pub(crate) identity: Option<(PathBuf, PathBuf)>,
}

impl EtcdTls {
    /// The client's TLS settings, its files read now; an error names the key of the file that
    /// could not be read.
    fn options(&self) -> Result<etcd_client::TlsOptions, MembershipError> {
        let read = |key: &'static str, path: &Path| {
            std::fs::read(path).map_err(|e| MembershipError::TlsFile {
                key,
                path: path.to_owned(),
                message: e.to_string(),
            })
        };
        let mut options = etcd_client::TlsOptions::new().ca_certificate(
            etcd_client::Certificate::from_pem(read("etcd.tls_ca", &self.ca)?),
        );
        if let Some((cert, key)) = &self.identity {
            options = options.identity(etcd_client::Identity::from_pem(
                read("etcd.tls_cert", cert)?,
                read("etcd.tls_key", key)?,
            ));
        }
        Ok(options)
    }
}

/// The default `etcd.prefix`.
pub(crate) const DEFAULT_PREFIX: &str = "/propd";

/// Why membership in etcd could not be read or changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum MembershipError {
    /// etcd could not be reached or refused a call.
    #[error("etcd at {endpoints}: {source}")]
    Etcd {
        /// The endpoints tried.
        endpoints: String,
        /// What the client said.
        source: etcd_client::Error,
    },
    /// A record in etcd is not what propd writes.
    #[error("etcd key `{key}`: {message}")]
    Record {
        /// The key.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// A change that the rules of membership refuse; the message names the rule.
    #[error("{0}")]
    Refused(String),
    /// A TLS file for etcd could not be read.
    #[error("`{key}`: cannot read {}: {message}", path.display())]
    TlsFile {
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

/// A member's state in etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub(crate) enum MemberState {
    /// Holds copies.
    #[default]
    Active,
    /// Leaving: holds no copies in the placement; its shards move to the others.
    Draining,
}

/// `P/members/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MemberRecord {
    /// Where the member is reached.
    pub(crate) addr: SocketAddr,
    /// Active or draining.
    #[serde(default)]
    pub(crate) state: MemberState,
    /// The name its placement weights come from: its id, or the member it replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) slot: Option<String>,
}

/// `P/groups/<name>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GroupRecord {
    /// Shards of the group (fixed once created).
    pub(crate) shard_num: u32,
    /// Copies beyond the first.
    pub(crate) replicas: u32,
}

/// Everything under a cluster's prefix, read at one etcd revision.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ClusterRecords {
    /// The etcd revision it was read at.
    pub(crate) revision: i64,
    /// Members by id.
    pub(crate) members: BTreeMap<String, MemberRecord>,
    /// Ids whose `alive` key exists (their node runs and reaches etcd).
    pub(crate) alive: Vec<String>,
    /// Groups by name.
    pub(crate) groups: BTreeMap<String, GroupRecord>,
    /// Shards on the move.
    #[serde(default)]
    pub(crate) moves: Vec<MoveRecord>,
}

impl ClusterRecords {
    /// The members as the placement sees them: `(slot, member)` of every active member.
    pub(crate) fn placement_members(&self) -> Vec<(String, Member)> {
        self.members
            .iter()
            .filter(|(_, record)| record.state == MemberState::Active)
            .map(|(id, record)| {
                (
                    record.slot.clone().unwrap_or_else(|| id.clone()),
                    Member {
                        id: id.clone(),
                        addr: record.addr,
                    },
                )
            })
            .collect()
    }

    /// The placement of these records over every group in them; `None` when the groups are
    /// not valid.
    pub(crate) fn placement(&self) -> Option<Placement> {
        let groups = Groups::new(
            self.groups
                .iter()
                .map(|(name, g)| GroupDef::new(name, g.shard_num, g.replicas)),
        )
        .ok()?;
        Some(Placement::with_slots(self.placement_members(), groups))
    }

    /// The moves that a change from `self` to `after` leaves pending: those pending before,
    /// plus every copy that leaves a shard's node list, less the members that left the
    /// membership (`moves::Moves::placement_changed`).
    pub(crate) fn moves_after(&self, after: &ClusterRecords) -> Vec<MoveRecord> {
        let (Some(old), Some(new)) = (self.placement(), after.placement()) else {
            return self.moves.clone();
        };
        let mut moves = Moves::from_records(&self.moves);
        let members = after.members.keys().cloned().collect();
        moves.placement_changed(&old, &new, &members);
        moves.records()
    }

    /// The node list of (group, shard) in these records: its copies, then its old holders.
    fn node_list(&self, group: &str, shard: u32) -> Option<Vec<String>> {
        let placement = self.placement()?;
        let def = placement.group(group)?;
        let mut ids: Vec<String> = placement
            .node_list(def, shard)
            .iter()
            .map(|m| m.id.clone())
            .collect();
        for record in self
            .moves
            .iter()
            .filter(|m| m.group == group && m.shard == shard)
        {
            ids.extend(record.leaving.iter().cloned());
        }
        Some(ids)
    }

    /// Every member, active or draining (all are reached).
    pub(crate) fn all_members(&self) -> Vec<Member> {
        self.members
            .iter()
            .map(|(id, record)| Member {
                id: id.clone(),
                addr: record.addr,
            })
            .collect()
    }

    /// The groups a store opened with `known` serves, with etcd's replicas; groups in etcd that
    /// the store does not know (created after it opened) are left out and returned apart, and so
    /// is a group whose shard count differs (the store's count stays: it cannot change).
    pub(crate) fn groups_for(&self, known: &Groups) -> (Vec<GroupDef>, Vec<String>) {
        let mut served = Vec::new();
        let mut waiting = Vec::new();
        for def in known.iter() {
            match self.groups.get(&def.name) {
                Some(record) if record.shard_num == def.shard_num => {
                    served.push(GroupDef::new(&def.name, def.shard_num, record.replicas));
                }
                _ => served.push(def.clone()),
            }
        }
        for (name, record) in &self.groups {
            match known.get(name) {
                None => waiting.push(name.clone()),
                Some(def) if def.shard_num != record.shard_num => waiting.push(name.clone()),
                Some(_) => {}
            }
        }
        (served, waiting)
    }

    /// These records with group `name`'s replicas set to `replicas`; refused when the group
    /// does not exist, when `shard_num` asks for another shard count than the group's (it never
    /// changes), or when the replicas are out of bounds. Pure: `Registry::alter_group` writes it.
    pub(crate) fn with_group_replicas(
        &self,
        name: &str,
        replicas: u32,
        shard_num: Option<u32>,
    ) -> Result<(ClusterRecords, GroupRecord), MembershipError> {
        let Some(current) = self.groups.get(name).copied() else {
            return Err(MembershipError::Refused(format!(
                "group `{name}` does not exist (`group create` makes it)"
            )));
        };
        if let Some(asked) = shard_num.filter(|asked| *asked != current.shard_num) {
            return Err(MembershipError::Refused(format!(
                "group `{name}` has {} shards and keeps them: an entity's shard is its hash modulo the shard count, so changing the count ({asked} asked) would move every entity; create a new group instead",
                current.shard_num
            )));
        }
        let altered = GroupRecord {
            replicas,
            ..current
        };
        check_group_bounds(name, altered)?;
        let mut after = self.clone();
        after.groups.insert(name.to_owned(), altered);
        Ok((after, altered))
    }

    /// These records with member `id` draining; refused for an unknown id and for the last
    /// active member (its copies would have nowhere to go). Pure: `Registry::drain` writes it.
    pub(crate) fn with_member_draining(
        &self,
        id: &str,
    ) -> Result<(ClusterRecords, MemberRecord), MembershipError> {
        let Some(mut record) = self.members.get(id).cloned() else {
            return Err(MembershipError::Refused(format!("`{id}` is not a member")));
        };
        let active = self
            .members
            .values()
            .filter(|m| m.state == MemberState::Active)
            .count();
        if record.state == MemberState::Active && active <= 1 {
            return Err(MembershipError::Refused(format!(
                "`{id}` is the last active member: its copies would have nowhere to go"
            )));
        }
        record.state = MemberState::Draining;
        let mut after = self.clone();
        after.members.insert(id.to_owned(), record.clone());
        Ok((after, record))
    }

    /// These records without member `id`; refused unless it is draining and hands over no shard
    /// any more. Pure: `Registry::remove` writes it.
    pub(crate) fn without_member(&self, id: &str) -> Result<(ClusterRecords, ()), MembershipError> {
        match self.members.get(id) {
            None => Err(MembershipError::Refused(format!("`{id}` is not a member"))),
            Some(record) if record.state == MemberState::Active => {
                Err(MembershipError::Refused(format!(
                    "`{id}` is active: a member is removed only after `member drain` has moved its copies (or `member replace` gives its place to another)"
                )))
            }
            Some(_) => {
                let handing: Vec<String> = self
                    .moves
                    .iter()
                    .filter(|m| m.leaving.iter().any(|l| l == id))
                    .map(|m| format!("{}/{}", m.group, m.shard))
                    .collect();
                if !handing.is_empty() {
                    return Err(MembershipError::Refused(format!(
                        "`{id}` still hands over shards {handing:?}: a draining member is removed once their new copies completed a round (`status` lists the moves)"
                    )));
                }
                let mut after = self.clone();
                after.members.remove(id);
                Ok((after, ()))
            }
        }
    }

    /// These records with `new` in member `old`'s place (its placement slot, its address until
    /// `new` registers its own); refused for an unknown `old` and an existing `new`. Pure:
    /// `Registry::replace` writes it.
    pub(crate) fn with_replacement(
        &self,
        old: &str,
        new: &str,
    ) -> Result<(ClusterRecords, MemberRecord), MembershipError> {
        let Some(record) = self.members.get(old).cloned() else {
            return Err(MembershipError::Refused(format!("`{old}` is not a member")));
        };
        if self.members.contains_key(new) {
            return Err(MembershipError::Refused(format!(
                "`{new}` is already a member: a replacement is a new id (or restart `{old}` itself with an empty disk)"
            )));
        }
        let replacement = MemberRecord {
            slot: Some(record.slot.clone().unwrap_or_else(|| old.to_owned())),
            ..record
        };
        let mut after = self.clone();
        after.members.remove(old);
        after.members.insert(new.to_owned(), replacement.clone());
        Ok((after, replacement))
    }
}

/// What the node knows of its membership source, for `status` and `/health`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct MembershipView {
    /// `static` (the file) or `etcd`.
    pub(crate) source: &'static str,
    /// Whether etcd answers now (always true for `static`).
    pub(crate) connected: bool,
    /// The etcd revision of the membership in use (0 for `static`).
    pub(crate) revision: i64,
    /// Since when etcd could not be reached, unix milliseconds.
    pub(crate) unreachable_since_ms: Option<u64>,
    /// The last error talking to etcd.
    pub(crate) last_error: Option<String>,
    /// Groups in etcd that this node serves only after a restart (created after its store
    /// opened, or whose shard count differs from the store's).
    pub(crate) groups_waiting_for_restart: Vec<String>,
}

impl MembershipView {
    /// The view of a node whose membership is the static file.
    pub(crate) fn fixed() -> Self {
        Self {
            source: "static",
            connected: true,
            revision: 0,
            unreachable_since_ms: None,
            last_error: None,
            groups_waiting_for_restart: Vec::new(),
        }
    }

    /// One line for `/health` and the `status` command.
    pub(crate) fn summary(&self) -> String {
        match (self.source, self.connected) {
            ("static", _) => "membership from the config file".to_owned(),
            (_, true) => format!("membership from etcd (revision {})", self.revision),
            (_, false) => format!(
                "etcd unreachable since {} ms (unix): serving on the last membership seen (revision {}){}",
                self.unreachable_since_ms.unwrap_or_default(),
                self.revision,
                self.last_error
                    .as_deref()
                    .map(|e| format!("; {e}"))
                    .unwrap_or_default()
            ),
        }
    }
}

fn member_key(prefix: &str, id: &str) -> String {
    format!("{prefix}/members/{id}")
}

fn alive_key(prefix: &str, id: &str) -> String {
    format!("{prefix}/alive/{id}")
}

fn group_key(prefix: &str, name: &str) -> String {
    format!("{prefix}/groups/{name}")
}

fn move_key(prefix: &str, group: &str, shard: u32) -> String {
    format!("{prefix}/moves/{group}/{shard}")
}

/// How often a membership change is tried again when another change came in between.
const CHANGE_ATTEMPTS: usize = 20;

/// A connection to the etcd of one cluster.
#[derive(Clone)]
pub(crate) struct Registry {
    client: Client,
    config: EtcdConfig,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// Connects (bounded by the call timeout).
    pub(crate) async fn connect(config: &EtcdConfig) -> Result<Self, MembershipError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), CALL_TIMEOUT)
            .with_keep_alive_while_idle(true);
        if let Some(tls) = &config.tls {
            options = options.with_tls(tls.options()?);
        }
        let connect = Client::connect(&config.endpoints, Some(options));
        let client = match tokio::time::timeout(CALL_TIMEOUT, connect).await {
            Ok(result) => result.map_err(|source| etcd_error(config, source))?,
            Err(_) => {
                return Err(etcd_error(
                    config,
                    etcd_client::Error::InvalidArgs(format!("no answer within {CALL_TIMEOUT:?}")),
                ));
            }
        };
        Ok(Self {
            client,
            config: config.clone(),
        })
    }

    fn error(&self, source: etcd_client::Error) -> MembershipError {
        etcd_error(&self.config, source)
    }

    fn prefix(&self) -> &str {
        &self.config.prefix
    }

    /// Reads every record of the cluster at one revision.
    pub(crate) async fn read(&mut self) -> Result<ClusterRecords, MembershipError> {
        let root = format!("{}/", self.prefix());
        let response = bounded(
            self.client
                .get(root.clone(), Some(GetOptions::new().with_prefix())),
        )
        .await
        .map_err(|source| self.error(source))?;
        let mut records = ClusterRecords {
            revision: response.header().map_or(0, |h| h.revision()),
            ..ClusterRecords::default()
        };
        for kv in response.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let rest = &key[root.len()..];
            let record = |message: String| MembershipError::Record {
                key: key.clone(),
                message,
            };
            if let Some(id) = rest.strip_prefix("members/") {
                let member: MemberRecord =
                    serde_json::from_slice(kv.value()).map_err(|e| record(e.to_string()))?;
                records.members.insert(id.to_owned(), member);
            } else if let Some(id) = rest.strip_prefix("alive/") {
                records.alive.push(id.to_owned());
            } else if let Some(name) = rest.strip_prefix("groups/") {
                let group: GroupRecord =
                    serde_json::from_slice(kv.value()).map_err(|e| record(e.to_string()))?;
                records.groups.insert(name.to_owned(), group);
            } else if rest.starts_with("moves/") {
                let moving: MoveRecord =
                    serde_json::from_slice(kv.value()).map_err(|e| record(e.to_string()))?;
                records.moves.push(moving);
            }
        }
        Ok(records)
    }

    /// Registers node `id` at `addr`: a new member is added as active; a known one keeps its
    /// state and slot and gets the address. Returns the record as stored.
    pub(crate) async fn register(
        &mut self,
        id: &str,
        addr: SocketAddr,
    ) -> Result<MemberRecord, MembershipError> {
        self.change(|records| {
            let mut after = records.clone();
            let record = match records.members.get(id) {
                Some(known) => MemberRecord {
                    addr,
                    ..known.clone()
                },
                None => MemberRecord {
                    addr,
                    state: MemberState::Active,
                    slot: None,
                },
            };
            after.members.insert(id.to_owned(), record.clone());
            Ok((after, record))
        })
        .await
    }

    /// Applies one change of members or groups: reads everything, lets `change` make the
    /// records after it (or refuse), and writes the difference together with the moves it
    /// causes in one transaction, on condition that no member, group or move changed since the
    /// read; tried again when one did.
    async fn change<T>(
        &mut self,
        change: impl Fn(&ClusterRecords) -> Result<(ClusterRecords, T), MembershipError>,
    ) -> Result<T, MembershipError> {
        for _ in 0..CHANGE_ATTEMPTS {
            let before = self.read().await?;
            let (mut after, answer) = change(&before)?;
            after.moves = before.moves_after(&after);
            let mut ops = Vec::new();
            for (id, record) in &after.members {
                if before.members.get(id) != Some(record) {
                    ops.push(TxnOp::put(
                        member_key(self.prefix(), id),
                        to_json(&member_key(self.prefix(), id), record)?,
                        None,
                    ));
                }
            }
            for id in before.members.keys() {
                if !after.members.contains_key(id) {
                    ops.push(TxnOp::delete(member_key(self.prefix(), id), None));
                }
            }
            for (name, record) in &after.groups {
                if before.groups.get(name) != Some(record) {
                    ops.push(TxnOp::put(
                        group_key(self.prefix(), name),
                        to_json(&group_key(self.prefix(), name), record)?,
                        None,
                    ));
                }
            }
            for moving in &after.moves {
                if !before.moves.contains(moving) {
                    let key = move_key(self.prefix(), &moving.group, moving.shard);
                    ops.push(TxnOp::put(key.as_str(), to_json(&key, moving)?, None));
                }
            }
            for moving in &before.moves {
                if !after
                    .moves
                    .iter()
                    .any(|m| m.group == moving.group && m.shard == moving.shard)
                {
                    ops.push(TxnOp::delete(
                        move_key(self.prefix(), &moving.group, moving.shard),
                        None,
                    ));
                }
            }
            if ops.is_empty() {
                return Ok(answer);
            }
            let txn = Txn::new()
                .when(self.unchanged_since(before.revision))
                .and_then(ops);
            let response = bounded(self.client.txn(txn))
                .await
                .map_err(|source| self.error(source))?;
            if response.succeeded() {
                return Ok(answer);
            }
            tracing::debug!(
                revision = before.revision,
                "etcd: the membership changed meanwhile; reading it again"
            );
        }
        Err(MembershipError::Refused(format!(
            "the membership kept changing; gave up after {CHANGE_ATTEMPTS} attempts"
        )))
    }

    /// The condition that no member, group or move changed after `revision`.
    fn unchanged_since(&self, revision: i64) -> Vec<Compare> {
        ["members/", "groups/", "moves/"]
            .iter()
            .map(|kind| {
                Compare::mod_revision(
                    format!("{}/{kind}", self.prefix()),
                    CompareOp::Less,
                    revision + 1,
                )
                .with_prefix()
            })
            .collect()
    }

    /// Ends the move of (group, shard) after a round over `covered` completed: deletes its
    /// record when the round covered the shard's whole node list as etcd has it now, on
    /// condition that nothing changed since that read. Returns whether it ended it.
    pub(crate) async fn end_move(
        &mut self,
        group: &str,
        shard: u32,
        covered: &[String],
    ) -> Result<bool, MembershipError> {
        let records = self.read().await?;
        if !records
            .moves
            .iter()
            .any(|m| m.group == group && m.shard == shard)
        {
            return Ok(false);
        }
        let Some(list) = records.node_list(group, shard) else {
            return Ok(false);
        };
        if !list.iter().all(|id| covered.contains(id)) {
            return Ok(false);
        }
        let txn = Txn::new()
            .when(self.unchanged_since(records.revision))
            .and_then([TxnOp::delete(move_key(self.prefix(), group, shard), None)]);
        let response = bounded(self.client.txn(txn))
            .await
            .map_err(|source| self.error(source))?;
        Ok(response.succeeded())
    }

    /// Creates each group that etcd does not have yet (the file's groups seed a new cluster).
    pub(crate) async fn seed_groups(&mut self, groups: &Groups) -> Result<(), MembershipError> {
        for def in groups.iter() {
            let record = GroupRecord {
                shard_num: def.shard_num,
                replicas: def.replicas,
            };
            self.create_if_absent(&group_key(self.prefix(), &def.name), &record)
                .await?;
        }
        Ok(())
    }

    /// Puts `value` at `key` only if the key does not exist; returns whether it was created.
    async fn create_if_absent<T: Serialize>(
        &mut self,
        key: &str,
        value: &T,
    ) -> Result<bool, MembershipError> {
        let bytes = serde_json::to_vec(value).map_err(|e| MembershipError::Record {
            key: key.to_owned(),
            message: e.to_string(),
        })?;
        let txn = Txn::new()
            .when([Compare::version(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, bytes, None)]);
        let response = bounded(self.client.txn(txn))
            .await
            .map_err(|source| self.error(source))?;
        Ok(response.succeeded())
    }

    /// Creates group `name`; refused when it exists.
    pub(crate) async fn create_group(
        &mut self,
        name: &str,
        record: GroupRecord,
    ) -> Result<(), MembershipError> {
        check_new_group(name, record)?;
        if self
            .create_if_absent(&group_key(self.prefix(), name), &record)
            .await?
        {
            Ok(())
        } else {
            Err(MembershipError::Refused(format!(
                "group `{name}` exists: a group is created once; `group alter` changes its replicas"
            )))
        }
    }

    /// Changes the replicas of group `name` (its shard count never changes).
    pub(crate) async fn alter_group(
        &mut self,
        name: &str,
        replicas: u32,
        shard_num: Option<u32>,
    ) -> Result<GroupRecord, MembershipError> {
        self.change(|records| records.with_group_replicas(name, replicas, shard_num))
            .await
    }

    /// Marks member `id` as draining: it keeps serving, and its copies move to the others.
    pub(crate) async fn drain(&mut self, id: &str) -> Result<MemberRecord, MembershipError> {
        self.change(|records| records.with_member_draining(id))
            .await
    }

    /// Removes member `id`; only a draining member whose shards all moved may go (drain hands
    /// its copies over first).
    pub(crate) async fn remove(&mut self, id: &str) -> Result<(), MembershipError> {
        self.change(|records| records.without_member(id)).await
    }

    /// Gives member `old`'s place to `new`: `new` holds exactly the copies `old` held (it
    /// takes over `old`'s placement slot) and is filled by repair; `old` leaves at once. `new`
    /// is reached at `old`'s address until it registers its own.
    pub(crate) async fn replace(
        &mut self,
        old: &str,
        new: &str,
    ) -> Result<MemberRecord, MembershipError> {
        self.change(|records| records.with_replacement(old, new))
            .await
    }
}

fn to_json<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>, MembershipError> {
    serde_json::to_vec(value).map_err(|e| MembershipError::Record {
        key: key.to_owned(),
        message: e.to_string(),
    })
}

/// Refuses a group that `group create` may not make: an invalid name, or shards or replicas
/// out of bounds.
pub(crate) fn check_new_group(name: &str, record: GroupRecord) -> Result<(), MembershipError> {
    Groups::new([GroupDef::new(name, record.shard_num, record.replicas)])
        .map_err(|e| MembershipError::Refused(e.to_string()))?;
    check_group_bounds(name, record)
}

fn check_group_bounds(name: &str, record: GroupRecord) -> Result<(), MembershipError> {
    if record.shard_num == 0 || record.shard_num > crate::config::MAX_SHARD_NUM {
        return Err(MembershipError::Refused(format!(
            "group `{name}`: shards must be 1..={}",
            crate::config::MAX_SHARD_NUM
        )));
    }
    if record.replicas > crate::config::MAX_REPLICAS {
        return Err(MembershipError::Refused(format!(
            "group `{name}`: replicas must be 0..={}",
            crate::config::MAX_REPLICAS
        )));
    }
    Ok(())
}

fn etcd_error(config: &EtcdConfig, source: etcd_client::Error) -> MembershipError {
    MembershipError::Etcd {
        endpoints: config.endpoints.join(","),
        source,
    }
}

/// Bounds one etcd call by the call timeout.
async fn bounded<T>(
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, etcd_client::Error> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| {
            Err(etcd_client::Error::InvalidArgs(format!(
                "no answer within {CALL_TIMEOUT:?}"
            )))
        })
}

fn last_seen_path(data_dir: &Path) -> PathBuf {
    data_dir.join(LAST_SEEN_FILE)
}

/// Writes the membership seen to `<data_dir>/membership.json` (write, then rename).
fn save_last_seen(data_dir: &Path, records: &ClusterRecords) -> std::io::Result<()> {
    std::fs::create_dir_all(data_dir)?;
    let path = last_seen_path(data_dir);
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(records).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, path)
}

fn load_last_seen(data_dir: &Path) -> Option<ClusterRecords> {
    let bytes = std::fs::read(last_seen_path(data_dir)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Fills `config`'s members and groups from etcd before the node opens its store: registers
/// this node, seeds the file's groups into a cluster that has none of that name, and reads
/// everything. When etcd does not answer within a few seconds, the membership seen last (from
/// the data directory) is used; with neither, the node cannot start.
pub(crate) async fn prepare(mut config: Config) -> anyhow::Result<(Config, ClusterRecords, bool)> {
    use anyhow::Context as _;
    let etcd = config
        .etcd
        .clone()
        .context("prepare needs an [etcd] table")?;
    // A TLS file that cannot be read is the operator's to fix: said at once, not retried.
    if let Some(tls) = &etcd.tls {
        tls.options()?;
    }
    let deadline = tokio::time::Instant::now() + START_PATIENCE;
    let (records, connected) = loop {
        match join(&etcd, &config).await {
            Ok(records) => break (records, true),
            Err(error) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(%error, "etcd: not reachable yet; trying again");
                tokio::time::sleep(RETRY_EVERY).await;
            }
            Err(error) => match load_last_seen(&config.data_dir) {
                Some(records) => {
                    tracing::warn!(%error, revision = records.revision, "etcd unreachable: starting on the last membership seen");
                    break (records, false);
                }
                None => {
                    return Err(anyhow::Error::new(error)).context(
                        "etcd is unreachable and this node never saw a membership (no membership.json in its data_dir)",
                    );
                }
            },
        }
    };
    apply_to_config(&mut config, &records)?;
    if connected {
        let _ = save_last_seen(&config.data_dir, &records);
    }
    Ok((config, records, connected))
}

async fn join(etcd: &EtcdConfig, config: &Config) -> Result<ClusterRecords, MembershipError> {
    let mut registry = Registry::connect(etcd).await?;
    let me = config
        .members
        .iter()
        .find(|m| m.id == config.node_id)
        .map_or(config.listen, |m| m.addr);
    registry.register(&config.node_id, me).await?;
    registry.seed_groups(&config.groups).await?;
    registry.read().await
}

/// Members and groups of `config` from the records (the store will open with these groups).
fn apply_to_config(config: &mut Config, records: &ClusterRecords) -> anyhow::Result<()> {
    config.members = records.all_members();
    config.members.sort_by(|a, b| a.id.cmp(&b.id));
    let groups: Vec<GroupDef> = records
        .groups
        .iter()
        .map(|(name, g)| GroupDef::new(name, g.shard_num, g.replicas))
        .collect();
    if !groups.is_empty() {
        config.groups = Groups::new(groups)
            .map_err(|e| anyhow::anyhow!("the groups in etcd are not valid: {e}"))?;
    }
    Ok(())
}

/// The placement, moves, peers and the members allowed in (with TLS) of `node` from the
/// records.
fn apply(node: &NodeState, records: &ClusterRecords, auth: &AuthLayer) {
    let (groups, waiting) = records.groups_for(&node.store.groups());
    let groups = match Groups::new(groups) {
        Ok(groups) => groups,
        Err(error) => {
            tracing::warn!(%error, "etcd: the groups are not valid; keeping the current ones");
            node.placement().group_set().clone()
        }
    };
    let placement = Placement::with_slots(records.placement_members(), groups);
    node.set_membership(placement, Moves::from_records(&records.moves));
    let members = records.all_members();
    if let Err(error) = node.peers.set_members(&members, node.config.tls.as_ref()) {
        tracing::warn!(%error, "etcd: the channels to the members could not be remade");
    }
    // With TLS, a member's certificate may call everything: the set follows the membership, so
    // that a member that joined is let in and one removed is not.
    auth.set_members(members.into_iter().map(|m| m.id).collect());
    let mut view = lock(&node.membership);
    view.revision = records.revision;
    view.groups_waiting_for_restart = waiting;
}

/// Adds to the store every group that etcd has and the store does not (created while the node
/// runs), so that the node serves it at once.
async fn serve_new_groups(node: &Arc<NodeState>, records: &ClusterRecords) {
    let known = node.store.groups();
    let new: Vec<GroupDef> = records
        .groups
        .iter()
        .filter(|(name, _)| known.get(name).is_none())
        .map(|(name, g)| GroupDef::new(name, g.shard_num, g.replicas))
        .collect();
    if new.is_empty() {
        return;
    }
    let store = Arc::clone(&node.store);
    match tokio::task::spawn_blocking(move || store.add_groups(&new)).await {
        Ok(Ok(added)) => tracing::info!(?added, "etcd: serving the groups created meanwhile"),
        Ok(Err(error)) => {
            tracing::warn!(%error, "etcd: a new group could not be added to the store")
        }
        Err(error) => tracing::warn!(%error, "etcd: adding new groups stopped"),
    }
}

/// A round over `covered` completed for (group, shard) (`origin`: this node started it): a
/// move it finishes ends here; the origin ends it in etcd too, and a node that no longer holds
/// the shard drops its rows.
pub(crate) fn round_completed(
    node: &Arc<NodeState>,
    group: &str,
    shard: u32,
    covered: &[String],
    origin: bool,
) {
    if !node.round_completed(group, shard, covered) {
        return;
    }
    let Some(etcd) = node.config.etcd.clone() else {
        return;
    };
    let node = Arc::clone(node);
    let (group, covered) = (group.to_owned(), covered.to_vec());
    tokio::spawn(async move {
        if origin {
            let ended = match Registry::connect(&etcd).await {
                Ok(mut registry) => registry.end_move(&group, shard, &covered).await,
                Err(error) => Err(error),
            };
            match ended {
                Ok(true) => tracing::info!(group, shard, "etcd: move ended"),
                Ok(false) => tracing::info!(
                    group,
                    shard,
                    "etcd: the move is not over there (the membership changed meanwhile); a later round ends it"
                ),
                Err(error) => {
                    tracing::warn!(group, shard, %error, "etcd: the move could not be ended; a later round ends it");
                }
            }
        }
        drop_handed_over(node).await;
    });
}

/// Drops the rows of every shard whose copy this node kept and no longer holds (its move
/// ended: the new copies completed a round). Only with membership from etcd, and only while
/// etcd answers, so that a node serving on an old membership drops nothing.
pub(crate) async fn drop_handed_over(node: Arc<NodeState>) {
    if node.config.etcd.is_none() || !lock(&node.membership).connected {
        return;
    }
    let done = tokio::task::spawn_blocking(move || {
        let placement = node.placement();
        for known in node.store.groups().iter() {
            let Some(def) = placement.group(&known.name) else {
                continue;
            };
            for shard in 0..def.shard_num {
                if node.holds(def, shard) {
                    continue;
                }
                match node.store.holds_rows(&def.name, shard) {
                    Ok(false) => {}
                    Ok(true) => match node.store.drop_shard(&def.name, shard) {
                        Ok(rows) => tracing::info!(
                            group = def.name,
                            shard,
                            rows,
                            "handed over: dropped this node's old copy (the new copies completed a round)"
                        ),
                        Err(error) => {
                            tracing::warn!(group = def.name, shard, %error, "dropping a handed-over copy failed");
                        }
                    },
                    Err(error) => {
                        tracing::warn!(group = def.name, shard, %error, "reading a handed-over copy failed");
                    }
                }
            }
        }
    })
    .await;
    if let Err(error) = done {
        tracing::warn!(%error, "dropping handed-over copies stopped");
    }
}

/// The view of a node whose membership comes from etcd, before the first change.
pub(crate) fn initial_view(records: &ClusterRecords, connected: bool) -> MembershipView {
    MembershipView {
        source: "etcd",
        connected,
        revision: records.revision,
        unreachable_since_ms: (!connected).then(now_millis),
        last_error: None,
        groups_waiting_for_restart: Vec::new(),
    }
}

/// Keeps this node registered and its membership current until shutdown: one session at a
/// time (register, lease, read, watch); when a session fails, the node says so and tries again
/// every second, serving on what it saw last.
pub(crate) async fn run(
    node: Arc<NodeState>,
    etcd: EtcdConfig,
    records: ClusterRecords,
    auth: AuthLayer,
    mut shutdown: watch::Receiver<bool>,
) {
    apply(&node, &records, &auth);
    loop {
        let result = tokio::select! {
            result = session(&node, &etcd, &auth) => result,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        if let Err(error) = result {
            let mut view = lock(&node.membership);
            if view.connected {
                tracing::warn!(%error, "etcd: lost; serving on the last membership seen");
                view.connected = false;
                view.unreachable_since_ms = Some(now_millis());
            }
            view.last_error = Some(error.to_string());
        }
        tokio::select! {
            () = tokio::time::sleep(RETRY_EVERY) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

async fn session(
    node: &Arc<NodeState>,
    etcd: &EtcdConfig,
    auth: &AuthLayer,
) -> Result<(), MembershipError> {
    // The member record was written when the node started (`prepare`); a session does not
    // write it again, so a member removed while its node runs stays removed.
    let mut registry = Registry::connect(etcd).await?;
    let me = node
        .config
        .members
        .iter()
        .find(|m| m.id == node.me())
        .map_or(node.config.listen, |m| m.addr);
    let lease = bounded(registry.client.lease_grant(LEASE_TTL_SECONDS, None))
        .await
        .map_err(|source| registry.error(source))?;
    let alive = alive_key(&etcd.prefix, node.me());
    bounded(registry.client.put(
        alive.as_str(),
        me.to_string(),
        Some(PutOptions::new().with_lease(lease.id())),
    ))
    .await
    .map_err(|source| registry.error(source))?;
    let records = registry.read().await?;
    let revision = records.revision;
    serve_new_groups(node, &records).await;
    apply(node, &records, auth);
    let _ = save_last_seen(&node.config.data_dir, &records);
    {
        let mut view = lock(&node.membership);
        if !view.connected {
            tracing::info!(revision, "etcd: reached again; membership caught up");
        }
        view.connected = true;
        view.unreachable_since_ms = None;
        view.last_error = None;
    }
    tokio::spawn(drop_handed_over(Arc::clone(node)));
    let (mut keeper, mut keep_alive) = bounded(registry.client.lease_keep_alive(lease.id()))
        .await
        .map_err(|source| registry.error(source))?;
    let root = format!("{}/", etcd.prefix);
    let mut stream = bounded(
        registry.client.watch(
            root.as_str(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        ),
    )
    .await
    .map_err(|source| registry.error(source))?;
    let mut ticker = tokio::time::interval(KEEP_ALIVE_EVERY);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                keeper.keep_alive().await.map_err(|source| registry.error(source))?;
                let answer = bounded(keep_alive.message()).await.map_err(|source| registry.error(source))?;
                if answer.is_none_or(|a| a.ttl() <= 0) {
                    return Err(MembershipError::Refused("the alive lease lapsed".to_owned()));
                }
            }
            message = stream.message() => {
                let Some(response) = message.map_err(|source| registry.error(source))? else {
                    return Err(MembershipError::Refused("etcd ended the watch".to_owned()));
                };
                if response.canceled() {
                    return Err(MembershipError::Refused(format!("etcd cancelled the watch: {}", response.cancel_reason())));
                }
                let changed = response.events().iter().any(|event| {
                    // A node's own lease renewals never show here; any put or delete does.
                    matches!(event.event_type(), EventType::Put | EventType::Delete)
                });
                if changed {
                    let records = registry.read().await?;
                    tracing::info!(revision = records.revision, members = records.members.len(), groups = records.groups.len(), "etcd: membership changed");
                    serve_new_groups(node, &records).await;
                    apply(node, &records, auth);
                    let _ = save_last_seen(&node.config.data_dir, &records);
                    tokio::spawn(drop_handed_over(Arc::clone(node)));
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn member(port: u16, state: MemberState) -> MemberRecord {
        MemberRecord {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            state,
            slot: None,
        }
    }

    /// n1 and n2 active, n3 draining, group `g` of 8 shards and one replica.
    pub(crate) fn records() -> ClusterRecords {
        ClusterRecords {
            revision: 7,
            members: [
                ("n1".to_owned(), member(7001, MemberState::Active)),
                ("n2".to_owned(), member(7002, MemberState::Active)),
                ("n3".to_owned(), member(7003, MemberState::Draining)),
            ]
            .into_iter()
            .collect(),
            alive: vec!["n1".to_owned()],
            groups: [(
                "g".to_owned(),
                GroupRecord {
                    shard_num: 8,
                    replicas: 1,
                },
            )]
            .into_iter()
            .collect(),
            moves: Vec::new(),
        }
    }

    fn refusal<T: std::fmt::Debug>(result: Result<T, MembershipError>) -> String {
        match result {
            Err(MembershipError::Refused(rule)) => rule,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn altering_a_group_changes_its_replicas_and_never_its_shard_count() {
        let before = records();
        let (after, altered) = before
            .with_group_replicas("g", 2, None)
            .expect("replicas may change");
        assert_eq!(
            altered,
            GroupRecord {
                shard_num: 8,
                replicas: 2
            }
        );
        assert_eq!(after.groups["g"], altered);
        assert_eq!(after.members, before.members);
        // Giving the current shard count is allowed; another one is refused with the reason.
        assert!(before.with_group_replicas("g", 2, Some(8)).is_ok());
        let rule = refusal(before.with_group_replicas("g", 2, Some(16)));
        assert!(
            rule.contains("has 8 shards and keeps them") && rule.contains("16 asked"),
            "{rule}"
        );
        let rule = refusal(before.with_group_replicas("g", crate::config::MAX_REPLICAS + 1, None));
        assert!(
            rule.contains(&format!(
                "replicas must be 0..={}",
                crate::config::MAX_REPLICAS
            )),
            "{rule}"
        );
        let rule = refusal(before.with_group_replicas("h", 1, None));
        assert!(rule.contains("group `h` does not exist"), "{rule}");
    }

    #[test]
    fn a_new_group_must_have_a_valid_name_and_bounded_shards_and_replicas() {
        let ok = GroupRecord {
            shard_num: 4,
            replicas: 1,
        };
        assert!(check_new_group("h", ok).is_ok());
        let max_shards = crate::config::MAX_SHARD_NUM;
        let max_replicas = crate::config::MAX_REPLICAS;
        for (record, says) in [
            (
                GroupRecord { shard_num: 0, ..ok },
                "shard_num must be at least 1".to_owned(),
            ),
            (
                GroupRecord {
                    shard_num: max_shards + 1,
                    ..ok
                },
                format!("shards must be 1..={max_shards}"),
            ),
            (
                GroupRecord {
                    replicas: max_replicas + 1,
                    ..ok
                },
                format!("replicas must be 0..={max_replicas}"),
            ),
        ] {
            let rule = refusal(check_new_group("h", record));
            assert!(rule.contains(&says), "{record:?}: {rule}");
        }
        // A name an entity key cannot carry is refused by the group rules of the store.
        let rule = refusal(check_new_group("a/b", ok));
        assert!(rule.contains("must not contain '/'"), "{rule}");
    }

    #[test]
    fn draining_keeps_at_least_one_active_member() {
        let before = records();
        let (after, record) = before.with_member_draining("n2").expect("n1 stays active");
        assert_eq!(record.state, MemberState::Draining);
        assert_eq!(after.members["n2"].state, MemberState::Draining);
        let rule = refusal(after.with_member_draining("n1"));
        assert!(rule.contains("`n1` is the last active member"), "{rule}");
        // Draining a draining member again changes nothing and is not refused.
        assert!(after.with_member_draining("n3").is_ok());
        let rule = refusal(before.with_member_draining("n9"));
        assert_eq!(rule, "`n9` is not a member");
    }

    #[test]
    fn only_a_drained_member_that_hands_over_nothing_is_removed() {
        let mut before = records();
        let rule = refusal(before.without_member("n1"));
        assert!(
            rule.contains("`n1` is active") && rule.contains("member drain"),
            "{rule}"
        );
        before.moves.push(MoveRecord {
            group: "g".to_owned(),
            shard: 3,
            leaving: vec!["n3".to_owned()],
        });
        let rule = refusal(before.without_member("n3"));
        assert!(rule.contains("still hands over shards [\"g/3\"]"), "{rule}");
        before.moves.clear();
        let (after, ()) = before
            .without_member("n3")
            .expect("n3 handed everything over");
        assert!(!after.members.contains_key("n3"));
        assert_eq!(after.members.len(), 2);
        assert_eq!(refusal(before.without_member("n9")), "`n9` is not a member");
    }

    #[test]
    fn a_replacement_takes_the_old_members_slot_and_address() {
        let before = records();
        let (after, record) = before.with_replacement("n2", "n5").expect("a new id");
        assert_eq!(record.slot.as_deref(), Some("n2"));
        assert_eq!(record.addr, before.members["n2"].addr);
        assert!(!after.members.contains_key("n2"));
        assert_eq!(after.members["n5"], record);
        // A replacement of a replacement keeps the original slot.
        let (_, again) = after.with_replacement("n5", "n6").expect("a new id");
        assert_eq!(again.slot.as_deref(), Some("n2"));
        let rule = refusal(before.with_replacement("n2", "n1"));
        assert!(rule.contains("`n1` is already a member"), "{rule}");
        assert_eq!(
            refusal(before.with_replacement("n9", "n5")),
            "`n9` is not a member"
        );
    }
}
