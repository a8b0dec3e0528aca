//! Node configuration: a TOML file, `PROPD_*` environment variables and flags, merged in that
//! order of increasing precedence over safe single-node defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use propd_merkle::{Algorithm, Shape, ShapeError};
use propd_store::{ConfigError as StoreConfigError, GroupDef, Groups};
use serde::Deserialize;

use crate::membership::{DEFAULT_PREFIX, EtcdConfig, EtcdTls};
use crate::tls::TlsPaths;

/// The largest `shard_num` of a group: every shard is a tree and a schedule entry on each of
/// its copies, so a typo must not ask for millions of them.
pub(crate) const MAX_SHARD_NUM: u32 = 65_536;
/// The largest `replicas` of a group (copies are also capped at the member count).
pub(crate) const MAX_REPLICAS: u32 = 255;
/// The largest `write_acks` (it is capped at the copies of the shard written).
pub(crate) const MAX_WRITE_ACKS: u32 = MAX_REPLICAS + 1;
/// Room left in one gRPC message around the largest property: a request or a sync page carries
/// the property with a few fields of its own.
const MESSAGE_HEADROOM: usize = 64 * 1024;
/// The largest `max_property_bytes`: a property must fit in one gRPC message with its request.
pub(crate) const MAX_PROPERTY_BYTES_LIMIT: usize =
    propd_proto::MAX_MESSAGE_BYTES - MESSAGE_HEADROOM;
/// The largest `repair.max_streams`: each open stream holds a task and a store snapshot.
pub(crate) const MAX_REPAIR_STREAMS: u32 = 4_096;
/// The default `repair.max_streams`.
pub(crate) const DEFAULT_MAX_STREAMS: u32 = 128;
/// The default `repair.max_streams_per_peer`.
pub(crate) const DEFAULT_MAX_STREAMS_PER_PEER: u32 = 32;
/// The largest `repair.throttle_bytes_per_second` (1 TiB/s; 0 means no limit).
pub(crate) const MAX_THROTTLE_BYTES_PER_SECOND: u64 = 1 << 40;
/// The shortest non-zero duration of any key: the gossip counts time in milliseconds.
const MIN_DURATION: Duration = Duration::from_millis(1);
const DAY: u64 = 24 * 60 * 60;
/// The longest `repair.period` and `repair.verify_interval`.
pub(crate) const MAX_PERIOD: Duration = Duration::from_secs(365 * DAY);
/// The longest `repair.sync_timeout`.
pub(crate) const MAX_SYNC_TIMEOUT: Duration = Duration::from_secs(7 * DAY);
/// The longest `repair.round_timeout`.
pub(crate) const MAX_ROUND_TIMEOUT: Duration = Duration::from_secs(30 * DAY);
/// The longest `repair.tombstone_grace`.
pub(crate) const MAX_TOMBSTONE_GRACE: Duration = Duration::from_secs(3650 * DAY);

/// Why a configuration cannot be used. Each message names the key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum ConfigError {
    /// The file could not be read.
    #[error("reading config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for our keys.
    #[error("parsing config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said, with the line.
        message: String,
    },
    /// A key has a value we cannot use.
    #[error("config key `{key}`: {message}")]
    Invalid {
        /// The key, as written in the file (`repair.period`).
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        message: message.into(),
    }
}

/// One data node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Member {
    /// Unique node id.
    pub(crate) id: String,
    /// Its gRPC address.
    pub(crate) addr: SocketAddr,
}

/// A `[[groups]]` entry as written in a file; it becomes the store's [`GroupDef`], the one
/// definition of a group, validated by [`Groups::new`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupEntry {
    name: String,
    shard_num: u32,
    #[serde(default)]
    replicas: u32,
}

fn group_entries<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Vec<GroupDef>>, D::Error> {
    let entries = Option::<Vec<GroupEntry>>::deserialize(deserializer)?;
    Ok(entries.map(|entries| {
        entries
            .into_iter()
            .map(|e| GroupDef::new(e.name, e.shard_num, e.replicas))
            .collect()
    }))
}

/// Background repair settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RepairConfig {
    /// Whether background rounds run at all (admin-started rounds always may).
    pub(crate) enabled: bool,
    /// Every (group, shard) with two or more copies is repaired within this period.
    pub(crate) period: Duration,
    /// Optional cron window: background rounds start only at times it matches.
    pub(crate) cron: Option<String>,
    /// Bound on one pairwise sync.
    pub(crate) sync_timeout: Duration,
    /// Bound on one whole propagation.
    pub(crate) round_timeout: Duration,
    /// How often each shard's tree is verified against a full rebuild.
    pub(crate) verify_interval: Duration,
    /// Tombstones younger than this are never purged.
    pub(crate) tombstone_grace: Duration,
    /// Repair traffic limit in bytes per second; 0 for none.
    pub(crate) throttle_bytes_per_second: u64,
    /// Repair streams this node serves at once, from all peers together.
    pub(crate) max_streams: u32,
    /// Repair streams this node serves at once for one peer.
    pub(crate) max_streams_per_peer: u32,
    /// How fast the scrub rereads stored rows to check them against their digests, in bytes
    /// per second; 0 turns the scrub off.
    pub(crate) scrub_bytes_per_second: u64,
}

/// The default scrub rate: 1 MiB/s, a full pass over 3.6 GB of rows an hour.
pub(crate) const DEFAULT_SCRUB_BYTES_PER_SECOND: u64 = 1 << 20;

impl Default for RepairConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            period: Duration::from_secs(10 * 60),
            cron: None,
            sync_timeout: Duration::from_secs(10 * 60),
            round_timeout: Duration::from_secs(60 * 60),
            verify_interval: Duration::from_secs(60 * 60),
            tombstone_grace: Duration::from_secs(7 * 24 * 60 * 60),
            throttle_bytes_per_second: 0,
            max_streams: DEFAULT_MAX_STREAMS,
            max_streams_per_peer: DEFAULT_MAX_STREAMS_PER_PEER,
            scrub_bytes_per_second: DEFAULT_SCRUB_BYTES_PER_SECOND,
        }
    }
}

/// The whole, validated configuration of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Config {
    /// This node's id; must be one of `members` when members are given.
    pub(crate) node_id: String,
    /// gRPC address: property API, gossip, repair and admin.
    pub(crate) listen: SocketAddr,
    /// HTTP address: the status page, `/metrics` and `/health`.
    pub(crate) http: SocketAddr,
    /// Where the store keeps its files.
    pub(crate) data_dir: PathBuf,
    /// The data nodes of the cluster, this one included, sorted by id.
    pub(crate) members: Vec<Member>,
    /// The groups every node serves, validated.
    pub(crate) groups: Groups,
    /// Copies that must acknowledge a coordinated write.
    pub(crate) write_acks: u32,
    /// Largest accepted property, in canonical bytes.
    pub(crate) max_property_bytes: usize,
    /// Bound on clock differences between nodes and on how far a client-chosen time may be
    /// from the coordinator's clock (docs/protocol.md, "The life of a delete").
    pub(crate) max_clock_skew: Duration,
    /// Background repair.
    pub(crate) repair: RepairConfig,
    /// `store.group_commit`: synced writes that wait for the same sync share one transaction.
    pub(crate) group_commit: bool,
    /// `[metrics]`: what `/metrics` exposes.
    pub(crate) metrics: MetricsConfig,
    /// `[telemetry]`: where round traces go.
    pub(crate) telemetry: TelemetryConfig,
    /// The shape of every tree in the store; recorded at creation, it cannot change after.
    pub(crate) tree: Shape,
    /// How log lines are written.
    pub(crate) log_format: LogFormat,
    /// `[etcd]`: membership and groups from etcd; `None`: the members and groups above.
    pub(crate) etcd: Option<EtcdConfig>,
    /// `[tls]`: mutual TLS on every port and every dial; `None` serves plaintext.
    pub(crate) tls: Option<TlsPaths>,
    /// `insecure`: plaintext on a non-loopback address was asked for explicitly.
    pub(crate) insecure: bool,
    /// Start with an empty store when the data file exists but is damaged (empty, truncated,
    /// unreadable); the damaged file is kept as `propd.redb.damaged`. Off by default: such a
    /// node refuses to start.
    pub(crate) allow_empty_store: bool,
}

/// The `[metrics]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct MetricsConfig {
    /// Label repair and apply metrics by shard as well as group (more series: one per shard).
    pub(crate) shard_labels: bool,
}

/// The `[telemetry]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TelemetryConfig {
    /// OTLP/gRPC endpoint (`http://host:port`) every round's trace is exported to; none: off.
    pub(crate) otlp_endpoint: Option<String>,
}

/// How log lines are written on stderr: `log_format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The largest accepted `max_clock_skew`: clocks a day apart are a broken setup, not skew.
const MAX_CLOCK_SKEW_LIMIT: Duration = Duration::from_secs(24 * 3600);

/// The single-node default address of the gRPC port; the CLI's default `--server`.
pub(crate) const DEFAULT_LISTEN: &str = "127.0.0.1:7001";
/// The default `max_clock_skew`.
pub(crate) const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(30);
/// The single-node default HTTP address.
pub(crate) const DEFAULT_HTTP: &str = "127.0.0.1:8001";

/// Values from one source (file, environment or flags); `None` means "not given here".
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Partial {
    /// `node_id`
    pub(crate) node_id: Option<String>,
    /// `listen`
    pub(crate) listen: Option<String>,
    /// `http`
    pub(crate) http: Option<String>,
    /// `data_dir`
    pub(crate) data_dir: Option<PathBuf>,
    /// `write_acks`
    pub(crate) write_acks: Option<u32>,
    /// `max_property_bytes`
    pub(crate) max_property_bytes: Option<usize>,
    /// `max_clock_skew`
    pub(crate) max_clock_skew: Option<String>,
    /// `allow_empty_store`
    pub(crate) allow_empty_store: Option<bool>,
    /// `[[members]]`
    pub(crate) members: Option<Vec<Member>>,
    /// `[[groups]]`
    #[serde(default, deserialize_with = "group_entries")]
    pub(crate) groups: Option<Vec<GroupDef>>,
    /// `log_format`: `text` or `json`
    pub(crate) log_format: Option<String>,
    /// `[repair]`
    #[serde(default)]
    pub(crate) repair: PartialRepair,
    /// `[metrics]`
    #[serde(default)]
    pub(crate) metrics: PartialMetrics,
    /// `[telemetry]`
    #[serde(default)]
    pub(crate) telemetry: PartialTelemetry,
    /// `[store]`
    #[serde(default)]
    pub(crate) store: PartialStore,
    /// `[tree]`
    #[serde(default)]
    pub(crate) tree: PartialTree,
    /// `[etcd]`
    #[serde(default)]
    pub(crate) etcd: PartialEtcd,
    /// `insecure`
    pub(crate) insecure: Option<bool>,
    /// `[tls]`
    #[serde(default)]
    pub(crate) tls: PartialTls,
}

/// The `[etcd]` table from one source.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PartialEtcd {
    /// `etcd.endpoints`
    pub(crate) endpoints: Option<Vec<String>>,
    /// `etcd.prefix`
    pub(crate) prefix: Option<String>,
    /// `etcd.tls_ca`
    pub(crate) tls_ca: Option<PathBuf>,
    /// `etcd.tls_cert`
    pub(crate) tls_cert: Option<PathBuf>,
    /// `etcd.tls_key`
    pub(crate) tls_key: Option<PathBuf>,
}

impl PartialEtcd {
    pub(crate) fn resolve(self) -> Result<Option<EtcdConfig>, ConfigError> {
        let Some(endpoints) = self.endpoints.filter(|e| !e.is_empty()) else {
            let given = [
                ("etcd.prefix", self.prefix.is_some()),
                ("etcd.tls_ca", self.tls_ca.is_some()),
                ("etcd.tls_cert", self.tls_cert.is_some()),
                ("etcd.tls_key", self.tls_key.is_some()),
            ];
            if let Some((key, _)) = given.iter().find(|(_, given)| *given) {
                return Err(invalid(key, "is given without `etcd.endpoints`"));
            }
            return Ok(None);
        };
        for endpoint in &endpoints {
            let rest = endpoint
                .strip_prefix("http://")
                .or_else(|| endpoint.strip_prefix("https://"));
            if rest.is_none_or(str::is_empty) {
                return Err(invalid(
                    "etcd.endpoints",
                    format!("`{endpoint}` is not an http:// or https:// URL"),
                ));
            }
        }
        let prefix = self.prefix.unwrap_or_else(|| DEFAULT_PREFIX.to_owned());
        if !prefix.starts_with('/') || prefix.ends_with('/') || prefix.len() < 2 {
            return Err(invalid(
                "etcd.prefix",
                format!("`{prefix}` must start with `/`, not end with `/`, and name something"),
            ));
        }
        let identity = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid(
                    "etcd.tls_key",
                    "is missing: `etcd.tls_cert` is given",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "etcd.tls_cert",
                    "is missing: `etcd.tls_key` is given",
                ));
            }
        };
        let tls = match self.tls_ca {
            Some(ca) => Some(EtcdTls { ca, identity }),
            None if identity.is_some() => {
                return Err(invalid(
                    "etcd.tls_ca",
                    "is missing: a client certificate for etcd goes with the CA that signs etcd's",
                ));
            }
            None => None,
        };
        let scheme = if tls.is_some() { "https://" } else { "http://" };
        if let Some(other) = endpoints.iter().find(|e| !e.starts_with(scheme)) {
            return Err(invalid(
                "etcd.endpoints",
                if tls.is_some() {
                    format!(
                        "`{other}` is plaintext while `etcd.tls_ca` is given: every endpoint is https://"
                    )
                } else {
                    format!(
                        "`{other}` is https:// and needs `etcd.tls_ca` (the CA that signs etcd's certificate)"
                    )
                },
            ));
        }
        Ok(Some(EtcdConfig {
            endpoints,
            prefix,
            tls,
        }))
    }
}

/// The `[store]` table from one source.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PartialStore {
    /// `store.group_commit`
    pub(crate) group_commit: Option<bool>,
}

/// The `[metrics]` table from one source.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PartialMetrics {
    /// `metrics.shard_labels`
    pub(crate) shard_labels: Option<bool>,
}

/// The `[telemetry]` table from one source.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PartialTelemetry {
    /// `telemetry.otlp_endpoint`
    pub(crate) otlp_endpoint: Option<String>,
}

/// The `[tree]` table from one source: the shape of every tree of the store.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PartialTree {
    /// `tree.algorithm`: `sha512` or `blake3`
    pub(crate) algorithm: Option<String>,
    /// `tree.slot_count`
    pub(crate) slot_count: Option<u32>,
    /// `tree.fanout`
    pub(crate) fanout: Option<u32>,
    /// `tree.depth`
    pub(crate) depth: Option<u32>,
    /// `tree.digest_width`
    pub(crate) digest_width: Option<u32>,
}

/// The `[tls]` table from one source.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PartialTls {
    /// `tls.cert`
    pub(crate) cert: Option<PathBuf>,
    /// `tls.key`
    pub(crate) key: Option<PathBuf>,
    /// `tls.ca`
    pub(crate) ca: Option<PathBuf>,
}

/// The `[repair]` table from one source.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PartialRepair {
    /// `repair.enabled`
    pub(crate) enabled: Option<bool>,
    /// `repair.period`
    pub(crate) period: Option<String>,
    /// `repair.cron`
    pub(crate) cron: Option<String>,
    /// `repair.sync_timeout`
    pub(crate) sync_timeout: Option<String>,
    /// `repair.round_timeout`
    pub(crate) round_timeout: Option<String>,
    /// `repair.verify_interval`
    pub(crate) verify_interval: Option<String>,
    /// `repair.tombstone_grace`
    pub(crate) tombstone_grace: Option<String>,
    /// `repair.throttle_bytes_per_second`
    pub(crate) throttle_bytes_per_second: Option<u64>,
    /// `repair.max_streams`
    pub(crate) max_streams: Option<u32>,
    /// `repair.max_streams_per_peer`
    pub(crate) max_streams_per_peer: Option<u32>,
    /// `repair.scrub_bytes_per_second`
    pub(crate) scrub_bytes_per_second: Option<u64>,
}

impl Partial {
    /// Reads a TOML file.
    pub(crate) fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|error| ConfigError::Parse {
            path: path.to_owned(),
            message: error.to_string(),
        })
    }

    /// Values of `self` win over `lower`.
    #[must_use]
    pub(crate) fn over(self, lower: Partial) -> Partial {
        let r = self.repair;
        let l = lower.repair;
        let t = self.tree;
        let u = lower.tree;
        Partial {
            node_id: self.node_id.or(lower.node_id),
            listen: self.listen.or(lower.listen),
            http: self.http.or(lower.http),
            data_dir: self.data_dir.or(lower.data_dir),
            write_acks: self.write_acks.or(lower.write_acks),
            max_property_bytes: self.max_property_bytes.or(lower.max_property_bytes),
            max_clock_skew: self.max_clock_skew.or(lower.max_clock_skew),
            allow_empty_store: self.allow_empty_store.or(lower.allow_empty_store),
            members: self.members.or(lower.members),
            groups: self.groups.or(lower.groups),
            log_format: self.log_format.or(lower.log_format),
            tree: PartialTree {
                algorithm: t.algorithm.or(u.algorithm),
                slot_count: t.slot_count.or(u.slot_count),
                fanout: t.fanout.or(u.fanout),
                depth: t.depth.or(u.depth),
                digest_width: t.digest_width.or(u.digest_width),
            },
            repair: PartialRepair {
                enabled: r.enabled.or(l.enabled),
                period: r.period.or(l.period),
                cron: r.cron.or(l.cron),
                sync_timeout: r.sync_timeout.or(l.sync_timeout),
                round_timeout: r.round_timeout.or(l.round_timeout),
                verify_interval: r.verify_interval.or(l.verify_interval),
                tombstone_grace: r.tombstone_grace.or(l.tombstone_grace),
                throttle_bytes_per_second: r
                    .throttle_bytes_per_second
                    .or(l.throttle_bytes_per_second),
                max_streams: r.max_streams.or(l.max_streams),
                max_streams_per_peer: r.max_streams_per_peer.or(l.max_streams_per_peer),
                scrub_bytes_per_second: r.scrub_bytes_per_second.or(l.scrub_bytes_per_second),
            },
            store: PartialStore {
                group_commit: self.store.group_commit.or(lower.store.group_commit),
            },
            metrics: PartialMetrics {
                shard_labels: self.metrics.shard_labels.or(lower.metrics.shard_labels),
            },
            telemetry: PartialTelemetry {
                otlp_endpoint: self
                    .telemetry
                    .otlp_endpoint
                    .or(lower.telemetry.otlp_endpoint),
            },
            etcd: PartialEtcd {
                endpoints: self.etcd.endpoints.or(lower.etcd.endpoints),
                prefix: self.etcd.prefix.or(lower.etcd.prefix),
                tls_ca: self.etcd.tls_ca.or(lower.etcd.tls_ca),
                tls_cert: self.etcd.tls_cert.or(lower.etcd.tls_cert),
                tls_key: self.etcd.tls_key.or(lower.etcd.tls_key),
            },
            insecure: self.insecure.or(lower.insecure),
            tls: PartialTls {
                cert: self.tls.cert.or(lower.tls.cert),
                key: self.tls.key.or(lower.tls.key),
                ca: self.tls.ca.or(lower.tls.ca),
            },
        }
    }

    /// Fills what is missing with the defaults and validates the result.
    pub(crate) fn resolve(self) -> Result<Config, ConfigError> {
        let node_id = self.node_id.unwrap_or_else(|| "n1".to_owned());
        if node_id.is_empty() {
            return Err(invalid("node_id", "must not be empty"));
        }
        let listen = parse_addr("listen", self.listen.as_deref().unwrap_or(DEFAULT_LISTEN))?;
        let http = parse_addr("http", self.http.as_deref().unwrap_or(DEFAULT_HTTP))?;
        let data_dir = self
            .data_dir
            .unwrap_or_else(|| PathBuf::from("data").join(&node_id));
        let members = resolve_members(&node_id, listen, self.members)?;
        let groups = resolve_groups(self.groups)?;
        let write_acks = bounded(
            "write_acks",
            self.write_acks.unwrap_or(1),
            1,
            MAX_WRITE_ACKS,
        )?;
        let max_property_bytes = bounded(
            "max_property_bytes",
            self.max_property_bytes
                .unwrap_or(propd_store::DEFAULT_MAX_PROPERTY_BYTES),
            1,
            MAX_PROPERTY_BYTES_LIMIT,
        )?;
        let log_format = match self.log_format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(invalid(
                    "log_format",
                    format!("`{other}` is neither `text` nor `json`"),
                ));
            }
        };
        let max_clock_skew = duration_or(
            "max_clock_skew",
            self.max_clock_skew,
            DEFAULT_MAX_CLOCK_SKEW,
            MAX_CLOCK_SKEW_LIMIT,
        )?;
        Ok(Config {
            node_id,
            listen,
            http,
            data_dir,
            members,
            groups,
            write_acks,
            max_property_bytes,
            max_clock_skew,
            repair: self.repair.resolve()?,
            group_commit: self.store.group_commit.unwrap_or(true),
            metrics: MetricsConfig {
                shard_labels: self.metrics.shard_labels.unwrap_or(false),
            },
            telemetry: TelemetryConfig {
                otlp_endpoint: self
                    .telemetry
                    .otlp_endpoint
                    .map(check_otlp_endpoint)
                    .transpose()?,
            },
            tree: self.tree.resolve()?,
            log_format,
            etcd: self.etcd.resolve()?,
            tls: resolve_tls(self.tls, self.insecure.unwrap_or(false), &[listen, http])?,
            insecure: self.insecure.unwrap_or(false),
            allow_empty_store: self.allow_empty_store.unwrap_or(false),
        })
    }
}

/// `value` when it lies in `min..=max`; otherwise an error naming `key` and the bounds.
fn bounded<T: PartialOrd + std::fmt::Display>(
    key: &str,
    value: T,
    min: T,
    max: T,
) -> Result<T, ConfigError> {
    if value < min || value > max {
        return Err(invalid(
            key,
            format!("{value} is outside the accepted {min}..={max}"),
        ));
    }
    Ok(value)
}

/// The members sorted by id, checked: unique non-empty ids, `node_id` among them. Without
/// members, this node alone at its `listen` address.
fn resolve_members(
    node_id: &str,
    listen: SocketAddr,
    members: Option<Vec<Member>>,
) -> Result<Vec<Member>, ConfigError> {
    let mut members = members.unwrap_or_else(|| {
        vec![Member {
            id: node_id.to_owned(),
            addr: listen,
        }]
    });
    members.sort_by(|a, b| a.id.cmp(&b.id));
    for pair in members.windows(2) {
        if pair[0].id == pair[1].id {
            return Err(invalid(
                "members",
                format!("node id `{}` is listed twice", pair[0].id),
            ));
        }
    }
    if let Some(member) = members.iter().find(|m| m.id.is_empty()) {
        return Err(invalid(
            "members",
            format!("a member at {} has an empty id", member.addr),
        ));
    }
    let mut by_addr = std::collections::BTreeMap::new();
    for member in &members {
        if let Some(other) = by_addr.insert(member.addr, &member.id) {
            return Err(invalid(
                "members",
                format!(
                    "`{other}` and `{}` have the same address {}: one node would count as two copies",
                    member.id, member.addr
                ),
            ));
        }
    }
    let Some(me) = members.iter().find(|m| m.id == node_id) else {
        return Err(invalid(
            "node_id",
            format!("`{node_id}` is not one of the members ({})", ids(&members)),
        ));
    };
    check_listen(listen, me)?;
    Ok(members)
}

/// The node must listen where the other members reach it: `listen` and its own member address
/// have the same port, and the same IP unless `listen` is a wildcard (`0.0.0.0`, `[::]`), which
/// serves every address of the host (a node may listen on all interfaces and be reached at one).
fn check_listen(listen: SocketAddr, me: &Member) -> Result<(), ConfigError> {
    let same_port = listen.port() == me.addr.port();
    let same_ip = listen.ip().is_unspecified() || listen.ip() == me.addr.ip();
    if same_port && same_ip {
        return Ok(());
    }
    Err(invalid(
        "listen",
        format!(
            "{listen} is not where the members reach `{}` ({}): the port must be the same, and the IP too unless listen is 0.0.0.0 or [::]",
            me.id, me.addr
        ),
    ))
}

/// `[tls]`: all three files or none; without them, every address must be loopback unless
/// `insecure` says plaintext on the network is meant.
fn resolve_tls(
    tls: PartialTls,
    insecure: bool,
    addrs: &[SocketAddr],
) -> Result<Option<TlsPaths>, ConfigError> {
    match (tls.cert, tls.key, tls.ca) {
        (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsPaths { cert, key, ca })),
        (None, None, None) => {
            if let Some(addr) = addrs.iter().find(|a| !a.ip().is_loopback())
                && !insecure
            {
                return Err(invalid(
                    "tls",
                    format!(
                        "{addr} is not a loopback address: give [tls] cert, key and ca, or set `insecure = true` to serve plaintext"
                    ),
                ));
            }
            Ok(None)
        }
        (cert, key, _) => {
            let missing = if cert.is_none() {
                "tls.cert"
            } else if key.is_none() {
                "tls.key"
            } else {
                "tls.ca"
            };
            Err(invalid(
                missing,
                "missing: [tls] needs cert, key and ca together",
            ))
        }
    }
}

/// The groups validated by the store's rule, the one definition of a valid group; without
/// groups, one `default` group of one shard.
fn resolve_groups(groups: Option<Vec<GroupDef>>) -> Result<Groups, ConfigError> {
    let groups = groups.unwrap_or_else(|| vec![GroupDef::new("default", 1, 0)]);
    for group in &groups {
        let over = |value: u32, max: u32| {
            format!(
                "group `{}`: {value} is more than the limit of {max}",
                group.name
            )
        };
        if group.shard_num > MAX_SHARD_NUM {
            return Err(invalid(
                "groups.shard_num",
                over(group.shard_num, MAX_SHARD_NUM),
            ));
        }
        if group.replicas > MAX_REPLICAS {
            return Err(invalid(
                "groups.replicas",
                over(group.replicas, MAX_REPLICAS),
            ));
        }
    }
    Groups::new(groups).map_err(|error| {
        let key = match error {
            StoreConfigError::ZeroShards { .. } => "groups.shard_num",
            _ => "groups.name",
        };
        invalid(key, error.to_string())
    })
}

impl PartialRepair {
    /// The `[repair]` table with defaults filled in, checked.
    fn resolve(self) -> Result<RepairConfig, ConfigError> {
        let defaults = RepairConfig::default();
        let repair = RepairConfig {
            enabled: self.enabled.unwrap_or(defaults.enabled),
            period: duration_or("repair.period", self.period, defaults.period, MAX_PERIOD)?,
            cron: self.cron,
            sync_timeout: duration_or(
                "repair.sync_timeout",
                self.sync_timeout,
                defaults.sync_timeout,
                MAX_SYNC_TIMEOUT,
            )?,
            round_timeout: duration_or(
                "repair.round_timeout",
                self.round_timeout,
                defaults.round_timeout,
                MAX_ROUND_TIMEOUT,
            )?,
            verify_interval: duration_or(
                "repair.verify_interval",
                self.verify_interval,
                defaults.verify_interval,
                MAX_PERIOD,
            )?,
            tombstone_grace: duration_or(
                "repair.tombstone_grace",
                self.tombstone_grace,
                defaults.tombstone_grace,
                MAX_TOMBSTONE_GRACE,
            )?,
            throttle_bytes_per_second: bounded(
                "repair.throttle_bytes_per_second",
                self.throttle_bytes_per_second.unwrap_or(0),
                0,
                MAX_THROTTLE_BYTES_PER_SECOND,
            )?,
            max_streams: bounded(
                "repair.max_streams",
                self.max_streams.unwrap_or(defaults.max_streams),
                1,
                MAX_REPAIR_STREAMS,
            )?,
            max_streams_per_peer: bounded(
                "repair.max_streams_per_peer",
                self.max_streams_per_peer
                    .unwrap_or(defaults.max_streams_per_peer),
                1,
                MAX_REPAIR_STREAMS,
            )?,
            scrub_bytes_per_second: bounded(
                "repair.scrub_bytes_per_second",
                self.scrub_bytes_per_second
                    .unwrap_or(defaults.scrub_bytes_per_second),
                0,
                MAX_THROTTLE_BYTES_PER_SECOND,
            )?,
        };
        if repair.period >= repair.tombstone_grace {
            return Err(invalid(
                "repair.period",
                "must be shorter than repair.tombstone_grace, or deletes could be purged before every copy saw them",
            ));
        }
        if let Some(cron) = &repair.cron {
            crate::schedule::CronWindow::parse(cron)
                .map_err(|message| invalid("repair.cron", message))?;
        }
        Ok(repair)
    }
}

impl PartialTree {
    /// The `[tree]` table over the default shape, checked by the shape's own rules.
    fn resolve(self) -> Result<Shape, ConfigError> {
        let defaults = Shape::default();
        let algorithm = match self.algorithm.as_deref() {
            None => defaults.algorithm,
            Some("sha512") => Algorithm::Sha512,
            Some("blake3") => Algorithm::Blake3,
            Some(other) => {
                return Err(invalid(
                    "tree.algorithm",
                    format!("`{other}` is neither `sha512` nor `blake3`"),
                ));
            }
        };
        let shape = Shape {
            algorithm,
            slot_count: self.slot_count.unwrap_or(defaults.slot_count),
            fanout: self.fanout.unwrap_or(defaults.fanout),
            depth: self.depth.unwrap_or(defaults.depth),
            digest_width: self.digest_width.unwrap_or(defaults.digest_width),
            ..defaults
        };
        shape.validate().map_err(|error| match error {
            ShapeError::OutOfRange {
                field,
                value,
                min,
                max,
            } => invalid(
                &tree_key(field),
                format!("{value} is outside the accepted {min}..={max}"),
            ),
            other => invalid(
                &tree_key("slot_count"),
                format!("with tree.fanout and tree.depth: {other}"),
            ),
        })?;
        Ok(shape)
    }
}

/// The config key of each shape field, as [`ShapeError`] and the store name them.
fn tree_key(field: &str) -> String {
    format!("tree.{field}")
}

/// Says which `[tree]` keys differ between the shape recorded in a store and the configured
/// one, each with both values: the error of a node whose tree shape changed over existing data.
pub(crate) fn shape_change(stored: &Shape, given: &Shape) -> String {
    let fields: [(&str, String, String); 5] = [
        (
            "algorithm",
            algorithm_name(stored.algorithm),
            algorithm_name(given.algorithm),
        ),
        (
            "slot_count",
            stored.slot_count.to_string(),
            given.slot_count.to_string(),
        ),
        (
            "fanout",
            stored.fanout.to_string(),
            given.fanout.to_string(),
        ),
        ("depth", stored.depth.to_string(), given.depth.to_string()),
        (
            "digest_width",
            stored.digest_width.to_string(),
            given.digest_width.to_string(),
        ),
    ];
    let changed: Vec<String> = fields
        .iter()
        .filter(|(_, stored, given)| stored != given)
        .map(|(field, stored, given)| {
            format!("config key `{}`: the store was created with {stored}, the configuration gives {given}", tree_key(field))
        })
        .collect();
    if changed.is_empty() {
        return format!(
            "the store's tree shape ({stored}) differs from the configured one ({given})"
        );
    }
    format!(
        "{}; a tree shape cannot change over existing data (set the recorded values, or start with an empty data_dir)",
        changed.join("; ")
    )
}

/// The name of an algorithm as `tree.algorithm` spells it.
fn algorithm_name(algorithm: Algorithm) -> String {
    match algorithm {
        Algorithm::Sha512 => "sha512",
        Algorithm::Blake3 => "blake3",
    }
    .to_owned()
}

impl Config {
    /// The configuration as TOML-like lines, printed at start so an operator sees what runs.
    pub(crate) fn describe(&self) -> String {
        let mut out = String::new();
        let mut line = |text: String| {
            out.push_str(&text);
            out.push('\n');
        };
        line(format!("node_id = {:?}", self.node_id));
        line(format!("listen = \"{}\"", self.listen));
        line(format!("http = \"{}\"", self.http));
        line(format!(
            "data_dir = {:?}",
            self.data_dir.display().to_string()
        ));
        line(format!("write_acks = {}", self.write_acks));
        line(format!("max_property_bytes = {}", self.max_property_bytes));
        line(format!(
            "log_format = \"{}\"",
            match self.log_format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            }
        ));
        line(format!(
            "max_clock_skew = \"{}\"",
            format_duration(self.max_clock_skew)
        ));
        line(format!("allow_empty_store = {}", self.allow_empty_store));
        for member in &self.members {
            line(format!(
                "[[members]] id = {:?}, addr = \"{}\"",
                member.id, member.addr
            ));
        }
        for group in self.groups.iter() {
            line(format!(
                "[[groups]] name = {:?}, shard_num = {}, replicas = {}",
                group.name, group.shard_num, group.replicas
            ));
        }
        let r = &self.repair;
        line(format!(
            "[repair] enabled = {}, period = \"{}\", cron = {}, sync_timeout = \"{}\", round_timeout = \"{}\", verify_interval = \"{}\", tombstone_grace = \"{}\", throttle_bytes_per_second = {}, scrub_bytes_per_second = {}, max_streams = {}, max_streams_per_peer = {}",
            r.enabled,
            format_duration(r.period),
            r.cron
                .as_deref()
                .map_or_else(|| "none".to_owned(), |c| format!("{c:?}")),
            format_duration(r.sync_timeout),
            format_duration(r.round_timeout),
            format_duration(r.verify_interval),
            format_duration(r.tombstone_grace),
            r.throttle_bytes_per_second,
            r.scrub_bytes_per_second,
            r.max_streams,
            r.max_streams_per_peer,
        ));
        line(format!("[store] group_commit = {}", self.group_commit));
        line(format!(
            "[metrics] shard_labels = {}",
            self.metrics.shard_labels
        ));
        line(format!(
            "[telemetry] otlp_endpoint = {}",
            self.telemetry
                .otlp_endpoint
                .as_deref()
                .map_or_else(|| "none".to_owned(), |e| format!("{e:?}")),
        ));
        if let Some(etcd) = &self.etcd {
            line(format!(
                "[etcd] endpoints = {:?}, prefix = {:?}, {} (members and groups come from etcd)",
                etcd.endpoints,
                etcd.prefix,
                match &etcd.tls {
                    None => "plaintext".to_owned(),
                    Some(tls) => format!(
                        "TLS: tls_ca = {:?}, {}",
                        tls.ca,
                        tls.identity.as_ref().map_or_else(
                            || "no client certificate".to_owned(),
                            |(cert, key)| format!("tls_cert = {cert:?}, tls_key = {key:?}")
                        )
                    ),
                }
            ));
        }
        let t = &self.tree;
        line(format!(
            "[tree] algorithm = \"{}\", slot_count = {}, fanout = {}, depth = {}, digest_width = {}",
            algorithm_name(t.algorithm),
            t.slot_count,
            t.fanout,
            t.depth,
            t.digest_width
        ));
        match &self.tls {
            Some(tls) => line(format!(
                "[tls] cert = {:?}, key = {:?}, ca = {:?}",
                tls.cert.display().to_string(),
                tls.key.display().to_string(),
                tls.ca.display().to_string()
            )),
            None => line(format!(
                "[tls] none (plaintext), insecure = {}",
                self.insecure
            )),
        }
        out
    }
}

/// An OTLP/gRPC endpoint: an `http://` or `https://` URL with a host.
fn check_otlp_endpoint(endpoint: String) -> Result<String, ConfigError> {
    let key = "telemetry.otlp_endpoint";
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|error| invalid(key, format!("`{endpoint}` is not a URL: {error}")))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(invalid(
            key,
            format!("`{endpoint}` must be http://HOST:PORT or https://HOST:PORT"),
        ));
    }
    Ok(endpoint)
}

fn ids(members: &[Member]) -> String {
    members
        .iter()
        .map(|m| m.id.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn parse_addr(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| {
        invalid(
            key,
            format!("`{text}` is not an address like 127.0.0.1:7001"),
        )
    })
}

/// The duration at `key`, or `default` when it is not given; zero, below a millisecond or
/// above `max` (a whole number of days) is refused.
fn duration_or(
    key: &str,
    text: Option<String>,
    default: Duration,
    max: Duration,
) -> Result<Duration, ConfigError> {
    let Some(text) = text else {
        return Ok(default);
    };
    let duration = parse_duration(&text).map_err(|message| invalid(key, message))?;
    if duration.is_zero() {
        return Err(invalid(key, "must be longer than zero"));
    }
    if duration < MIN_DURATION || duration > max {
        return Err(invalid(
            key,
            format!(
                "`{text}` is outside the accepted {}..={}d",
                format_duration(MIN_DURATION),
                max.as_secs() / DAY
            ),
        ));
    }
    Ok(duration)
}

/// Parses a duration with `humantime`: a number and a unit (`250ms`, `30s`, `10m`, `24h`,
/// `7d`), or several (`1h 30m`); units may be spelled out (`2days`, `1hour`).
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|error| {
        format!("`{text}` is not a duration like \"30s\", \"10m\" or \"24h\": {error}")
    })
}

/// Formats a duration the way [`parse_duration`] reads it back (`10m`, `7days`, `1h 30m`).
pub(crate) fn format_duration(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_file_gives_one_local_node_with_a_default_group() {
        let config = Partial::default().resolve().unwrap();
        assert_eq!(config.node_id, "n1");
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.members.len(), 1);
        assert_eq!(
            config.groups.iter().collect::<Vec<_>>(),
            vec![&GroupDef::new("default", 1, 0)]
        );
        assert_eq!(config.write_acks, 1);
        assert_eq!(config.max_clock_skew, Duration::from_secs(30));
        assert!(config.describe().contains("name = \"default\""));
        assert!(config.describe().contains("max_clock_skew = \"30s\""));
    }

    #[test]
    fn the_documented_file_parses_and_flags_win_over_it() {
        let file: Partial = toml::from_str(
            r#"
            node_id = "n1"
            listen = "127.0.0.1:7001"
            http = "127.0.0.1:8001"
            data_dir = "data/n1"
            [[members]]
            id = "n2"
            addr = "127.0.0.1:7002"
            [[members]]
            id = "n1"
            addr = "127.0.0.1:7001"
            [[groups]]
            name = "g"
            shard_num = 4
            replicas = 2
            [repair]
            enabled = true
            period = "30s"
            "#,
        )
        .unwrap();
        let flags = Partial {
            http: Some("127.0.0.1:9009".into()),
            ..Partial::default()
        };
        let config = flags.over(file).resolve().unwrap();
        assert_eq!(config.http.to_string(), "127.0.0.1:9009");
        assert_eq!(config.members[0].id, "n1", "members are sorted by id");
        assert_eq!(config.repair.period, Duration::from_secs(30));
        assert_eq!(config.groups.get("g").map(|g| g.shard_num), Some(4));
    }

    #[test]
    fn group_commit_is_on_unless_the_store_table_turns_it_off() {
        assert!(Partial::default().resolve().unwrap().group_commit);
        let file: Partial = toml::from_str("[store]\ngroup_commit = false\n").unwrap();
        let config = Partial::default().over(file).resolve().unwrap();
        assert!(!config.group_commit);
        assert!(config.describe().contains("[store] group_commit = false"));
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases: Vec<(Partial, &str)> = vec![
            (
                Partial {
                    listen: Some("nowhere".into()),
                    ..Partial::default()
                },
                "`listen`",
            ),
            (
                Partial {
                    node_id: Some("n9".into()),
                    members: Some(vec![Member {
                        id: "n1".into(),
                        addr: "127.0.0.1:7001".parse().unwrap(),
                    }]),
                    ..Partial::default()
                },
                "`node_id`",
            ),
            (
                Partial {
                    groups: Some(vec![GroupDef::new("a/b", 1, 0)]),
                    ..Partial::default()
                },
                "`groups.name`",
            ),
            (
                Partial {
                    groups: Some(vec![GroupDef::new("g", 0, 0)]),
                    ..Partial::default()
                },
                "`groups.shard_num`",
            ),
            (
                Partial {
                    groups: Some(vec![GroupDef::new("g", 1, 0), GroupDef::new("g", 2, 0)]),
                    ..Partial::default()
                },
                "`groups.name`",
            ),
            (
                Partial {
                    max_clock_skew: Some("0s".into()),
                    ..Partial::default()
                },
                "`max_clock_skew`",
            ),
            (
                Partial {
                    max_clock_skew: Some("soon".into()),
                    ..Partial::default()
                },
                "`max_clock_skew`",
            ),
            (
                Partial {
                    repair: PartialRepair {
                        period: Some("10 parsecs".into()),
                        ..PartialRepair::default()
                    },
                    ..Partial::default()
                },
                "`repair.period`",
            ),
            (
                Partial {
                    repair: PartialRepair {
                        period: Some("8d".into()),
                        ..PartialRepair::default()
                    },
                    ..Partial::default()
                },
                "`repair.period`",
            ),
        ];
        for (partial, key) in cases {
            let error = partial.resolve().unwrap_err().to_string();
            assert!(error.contains(key), "`{error}` should name {key}");
        }
    }

    fn file(text: &str) -> Partial {
        toml::from_str(text).unwrap_or_else(|error| panic!("{text}: {error}"))
    }

    fn refusal(partial: Partial) -> String {
        partial.resolve().unwrap_err().to_string()
    }

    #[test]
    fn two_members_at_one_address_are_refused() {
        let error = refusal(file(
            "[[members]]\nid = \"n1\"\naddr = \"127.0.0.1:7001\"\n[[members]]\nid = \"n2\"\naddr = \"127.0.0.1:7001\"\n",
        ));
        assert!(error.contains("`members`"), "{error}");
        assert!(error.contains("`n1` and `n2`"), "{error}");
    }

    #[test]
    fn an_absurd_shard_num_or_replica_count_is_refused() {
        let error = refusal(file("[[groups]]\nname = \"g\"\nshard_num = 100000000\n"));
        assert!(error.contains("`groups.shard_num`"), "{error}");
        assert!(error.contains("65536"), "{error}");
        file("[[groups]]\nname = \"g\"\nshard_num = 65536\n")
            .resolve()
            .expect("the bound itself is accepted");
        let error = refusal(file(
            "[[groups]]\nname = \"g\"\nshard_num = 1\nreplicas = 256\n",
        ));
        assert!(error.contains("`groups.replicas`"), "{error}");
    }

    #[test]
    fn every_zero_duration_is_refused() {
        for key in [
            "period",
            "sync_timeout",
            "round_timeout",
            "verify_interval",
            "tombstone_grace",
        ] {
            let error = refusal(file(&format!("[repair]\n{key} = \"0s\"\n")));
            assert!(error.contains(&format!("`repair.{key}`")), "{error}");
            assert!(error.contains("longer than zero"), "{error}");
        }
        let error = refusal(file("[repair]\nsync_timeout = \"500us\"\n"));
        assert!(error.contains("`repair.sync_timeout`"), "{error}");
        let error = refusal(file("[repair]\nround_timeout = \"400d\"\n"));
        assert!(error.contains("`repair.round_timeout`"), "{error}");
        assert!(error.contains("1ms..=30d"), "{error}");
    }

    #[test]
    fn a_listen_address_the_members_do_not_reach_is_refused() {
        let members = "[[members]]\nid = \"n1\"\naddr = \"10.0.0.1:7001\"\n[[members]]\nid = \"n2\"\naddr = \"10.0.0.2:7001\"\n";
        for listen in ["10.0.0.1:7002", "10.0.0.2:7001", "0.0.0.0:7002"] {
            let error = refusal(file(&format!("listen = \"{listen}\"\n{members}")));
            assert!(error.contains("`listen`"), "{listen}: {error}");
            assert!(error.contains("10.0.0.1:7001"), "{listen}: {error}");
        }
        for listen in ["10.0.0.1:7001", "0.0.0.0:7001", "[::]:7001"] {
            file(&format!(
                "listen = \"{listen}\"\ninsecure = true\n{members}"
            ))
            .resolve()
            .unwrap_or_else(|error| panic!("{listen}: {error}"));
        }
    }

    #[test]
    fn numbers_above_their_bounds_are_refused() {
        for (text, key) in [
            (
                format!("max_property_bytes = {}\n", MAX_PROPERTY_BYTES_LIMIT + 1),
                "`max_property_bytes`",
            ),
            (
                "max_property_bytes = 0\n".to_owned(),
                "`max_property_bytes`",
            ),
            ("write_acks = 1000\n".to_owned(), "`write_acks`"),
            ("write_acks = 0\n".to_owned(), "`write_acks`"),
            (
                format!(
                    "[repair]\nthrottle_bytes_per_second = {}\n",
                    MAX_THROTTLE_BYTES_PER_SECOND + 1
                ),
                "`repair.throttle_bytes_per_second`",
            ),
            (
                "[repair]\nmax_streams = 0\n".to_owned(),
                "`repair.max_streams`",
            ),
            (
                format!(
                    "[repair]\nmax_streams_per_peer = {}\n",
                    MAX_REPAIR_STREAMS + 1
                ),
                "`repair.max_streams_per_peer`",
            ),
            ("[tree]\nfanout = 1\n".to_owned(), "`tree.fanout`"),
            (
                "[tree]\nslot_count = 70000\n".to_owned(),
                "`tree.slot_count`",
            ),
            ("[tree]\ndepth = 9\n".to_owned(), "`tree.depth`"),
            (
                "[tree]\ndigest_width = 65\n".to_owned(),
                "`tree.digest_width`",
            ),
            (
                "[tree]\nslot_count = 65536\nfanout = 256\ndepth = 3\n".to_owned(),
                "`tree.slot_count`",
            ),
            (
                "[tree]\nalgorithm = \"md5\"\n".to_owned(),
                "`tree.algorithm`",
            ),
            ("log_format = \"xml\"\n".to_owned(), "`log_format`"),
        ] {
            let error = refusal(file(&text));
            assert!(error.contains(key), "{text}: `{error}` should name {key}");
        }
    }

    #[test]
    fn the_tree_shape_and_log_format_come_from_the_config() {
        let config = file(
            "log_format = \"json\"\n[tree]\nalgorithm = \"blake3\"\nslot_count = 8\nfanout = 4\ndepth = 2\ndigest_width = 32\n",
        )
        .resolve()
        .unwrap();
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(
            config.tree,
            Shape {
                algorithm: Algorithm::Blake3,
                slot_count: 8,
                fanout: 4,
                depth: 2,
                digest_width: 32,
                ..Shape::default()
            }
        );
        assert!(config.describe().contains("algorithm = \"blake3\""));
        let config = Partial::default().resolve().unwrap();
        assert_eq!(config.tree, Shape::default());
        assert_eq!(config.log_format, LogFormat::Text);
    }

    #[test]
    fn a_shape_change_names_each_changed_key_with_both_values() {
        let stored = Shape::default();
        let given = Shape {
            algorithm: Algorithm::Blake3,
            fanout: 8,
            ..stored
        };
        let text = shape_change(&stored, &given);
        assert!(
            text.contains("`tree.algorithm`: the store was created with sha512, the configuration gives blake3"),
            "{text}"
        );
        assert!(
            text.contains(
                "`tree.fanout`: the store was created with 16, the configuration gives 8"
            ),
            "{text}"
        );
        assert!(!text.contains("tree.depth"), "{text}");
    }

    #[test]
    fn a_file_group_without_replicas_has_none() {
        let file: Partial = toml::from_str("[[groups]]\nname = \"g\"\nshard_num = 2\n").unwrap();
        assert_eq!(file.groups, Some(vec![GroupDef::new("g", 2, 0)]));
        let error = toml::from_str::<Partial>("[[groups]]\nname = \"g\"\nshards = 2\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("shards"), "{error}");
    }

    #[test]
    fn unknown_keys_in_the_file_are_refused() {
        let error = toml::from_str::<Partial>("nodeid = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(error.contains("nodeid"), "{error}");
    }

    #[test]
    fn tls_is_all_three_files_and_plaintext_off_loopback_must_be_asked_for() {
        let network = Partial {
            listen: Some("0.0.0.0:7001".into()),
            ..Partial::default()
        };
        let error = network.clone().resolve().unwrap_err().to_string();
        assert!(
            error.contains("config key `tls`") && error.contains("insecure"),
            "{error}"
        );
        let insecure = Partial {
            insecure: Some(true),
            ..network.clone()
        }
        .resolve()
        .unwrap();
        assert!(insecure.insecure && insecure.tls.is_none());
        let half = Partial {
            tls: PartialTls {
                cert: Some("n1.pem".into()),
                key: Some("n1.key".into()),
                ca: None,
            },
            ..network.clone()
        };
        let error = half.resolve().unwrap_err().to_string();
        assert!(error.contains("`tls.ca`"), "{error}");
        let full = Partial {
            tls: PartialTls {
                cert: Some("n1.pem".into()),
                key: Some("n1.key".into()),
                ca: Some("ca.pem".into()),
            },
            ..network
        }
        .resolve()
        .unwrap();
        assert_eq!(full.tls.unwrap().ca, PathBuf::from("ca.pem"));
        assert!(Partial::default().resolve().unwrap().tls.is_none());
    }

    #[test]
    fn durations_keep_their_forms_and_round_trip() {
        for (text, seconds) in [
            ("30s", 30),
            ("10m", 600),
            ("2h", 7_200),
            ("7d", 604_800),
            ("1h 30m", 5_400),
            ("2days", 172_800),
        ] {
            let duration = parse_duration(text).unwrap();
            assert_eq!(duration, Duration::from_secs(seconds), "{text}");
            assert_eq!(
                parse_duration(&format_duration(duration)).unwrap(),
                duration
            );
        }
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(format_duration(Duration::from_secs(600)), "10m");
        assert!(parse_duration("ten minutes").is_err());
        assert!(parse_duration("10").is_err());
    }

    #[test]
    fn metrics_and_telemetry_tables_parse_and_a_bad_endpoint_names_its_key() {
        let file: Partial = toml::from_str(
            "[metrics]\nshard_labels = true\n[telemetry]\notlp_endpoint = \"http://127.0.0.1:4317\"\n",
        )
        .unwrap();
        let config = file.resolve().unwrap();
        assert!(config.metrics.shard_labels);
        assert_eq!(
            config.telemetry.otlp_endpoint.as_deref(),
            Some("http://127.0.0.1:4317")
        );
        let defaults = Partial::default().resolve().unwrap();
        assert!(!defaults.metrics.shard_labels);
        assert_eq!(defaults.telemetry.otlp_endpoint, None);
        for endpoint in ["127.0.0.1:4317", "ftp://collector:4317", "http://"] {
            let partial = Partial {
                telemetry: PartialTelemetry {
                    otlp_endpoint: Some(endpoint.to_owned()),
                },
                ..Partial::default()
            };
            let error = partial.resolve().unwrap_err().to_string();
            assert!(
                error.contains("`telemetry.otlp_endpoint`"),
                "{endpoint}: `{error}` names the key"
            );
        }
    }

    #[test]
    fn tls_to_etcd_goes_with_https_endpoints_and_a_ca() {
        let etcd = |endpoint: &str, ca: Option<&str>, cert: Option<&str>, key: Option<&str>| {
            PartialEtcd {
                endpoints: Some(vec![endpoint.to_owned()]),
                prefix: None,
                tls_ca: ca.map(PathBuf::from),
                tls_cert: cert.map(PathBuf::from),
                tls_key: key.map(PathBuf::from),
            }
            .resolve()
        };
        let plain = etcd("http://e:2379", None, None, None)
            .expect("valid")
            .expect("etcd");
        assert_eq!(plain.tls, None);
        let tls = etcd(
            "https://e:2379",
            Some("ca.pem"),
            Some("c.pem"),
            Some("c.key"),
        )
        .expect("valid")
        .expect("etcd");
        assert_eq!(
            tls.tls,
            Some(EtcdTls {
                ca: PathBuf::from("ca.pem"),
                identity: Some((PathBuf::from("c.pem"), PathBuf::from("c.key"))),
            })
        );
        let without_identity = etcd("https://e:2379", Some("ca.pem"), None, None)
            .expect("valid")
            .expect("etcd");
        assert_eq!(without_identity.tls.expect("tls").identity, None);
        for (wrong, key, says) in [
            (
                etcd("https://e:2379", None, None, None),
                "etcd.endpoints",
                "needs `etcd.tls_ca`",
            ),
            (
                etcd("http://e:2379", Some("ca.pem"), None, None),
                "etcd.endpoints",
                "is plaintext",
            ),
            (
                etcd("https://e:2379", Some("ca.pem"), Some("c.pem"), None),
                "etcd.tls_key",
                "is missing",
            ),
            (
                etcd("https://e:2379", Some("ca.pem"), None, Some("c.key")),
                "etcd.tls_cert",
                "is missing",
            ),
            (
                etcd("https://e:2379", None, Some("c.pem"), Some("c.key")),
                "etcd.tls_ca",
                "is missing",
            ),
        ] {
            let error = wrong.expect_err(says).to_string();
            assert!(error.contains(key) && error.contains(says), "{error}");
        }
        let error = PartialEtcd {
            tls_ca: Some(PathBuf::from("ca.pem")),
            ..PartialEtcd::default()
        }
        .resolve()
        .expect_err("no endpoints")
        .to_string();
        assert!(
            error.contains("etcd.tls_ca") && error.contains("without `etcd.endpoints`"),
            "{error}"
        );
    }
}
