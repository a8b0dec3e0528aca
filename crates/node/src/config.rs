//! Node configuration: a TOML file, `PROPD_*` environment variables and flags, merged in that
//! order of increasing precedence over safe single-node defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use propd_store::{ConfigError as StoreConfigError, GroupDef, Groups};
use serde::Deserialize;

use crate::tls::TlsPaths;

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
}

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
    /// HTTP address: `/metrics` and `/health`.
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
    /// Background repair.
    pub(crate) repair: RepairConfig,
    /// `[tls]`: mutual TLS on every port and every dial; `None` serves plaintext.
    pub(crate) tls: Option<TlsPaths>,
    /// `insecure`: plaintext on a non-loopback address was asked for explicitly.
    pub(crate) insecure: bool,
}

/// The single-node default address of the gRPC port; the CLI's default `--server`.
pub(crate) const DEFAULT_LISTEN: &str = "127.0.0.1:7001";
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
    /// `[[members]]`
    pub(crate) members: Option<Vec<Member>>,
    /// `[[groups]]`
    #[serde(default, deserialize_with = "group_entries")]
    pub(crate) groups: Option<Vec<GroupDef>>,
    /// `[repair]`
    #[serde(default)]
    pub(crate) repair: PartialRepair,
    /// `insecure`
    pub(crate) insecure: Option<bool>,
    /// `[tls]`
    #[serde(default)]
    pub(crate) tls: PartialTls,
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
        Partial {
            node_id: self.node_id.or(lower.node_id),
            listen: self.listen.or(lower.listen),
            http: self.http.or(lower.http),
            data_dir: self.data_dir.or(lower.data_dir),
            write_acks: self.write_acks.or(lower.write_acks),
            max_property_bytes: self.max_property_bytes.or(lower.max_property_bytes),
            members: self.members.or(lower.members),
            groups: self.groups.or(lower.groups),
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
        let write_acks = self.write_acks.unwrap_or(1);
        if write_acks == 0 {
            return Err(invalid("write_acks", "must be >= 1"));
        }
        let max_property_bytes = self.max_property_bytes.unwrap_or(1024 * 1024);
        if max_property_bytes == 0 {
            return Err(invalid("max_property_bytes", "must be >= 1"));
        }
        Ok(Config {
            node_id,
            listen,
            http,
            data_dir,
            members,
            groups,
            write_acks,
            max_property_bytes,
            repair: self.repair.resolve()?,
            tls: resolve_tls(self.tls, self.insecure.unwrap_or(false), &[listen, http])?,
            insecure: self.insecure.unwrap_or(false),
        })
    }
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
    if !members.iter().any(|m| m.id == node_id) {
        return Err(invalid(
            "node_id",
            format!("`{node_id}` is not one of the members ({})", ids(&members)),
        ));
    }
    Ok(members)
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
            period: duration_or("repair.period", self.period, defaults.period)?,
            cron: self.cron,
            sync_timeout: duration_or(
                "repair.sync_timeout",
                self.sync_timeout,
                defaults.sync_timeout,
            )?,
            round_timeout: duration_or(
                "repair.round_timeout",
                self.round_timeout,
                defaults.round_timeout,
            )?,
            verify_interval: duration_or(
                "repair.verify_interval",
                self.verify_interval,
                defaults.verify_interval,
            )?,
            tombstone_grace: duration_or(
                "repair.tombstone_grace",
                self.tombstone_grace,
                defaults.tombstone_grace,
            )?,
            throttle_bytes_per_second: self.throttle_bytes_per_second.unwrap_or(0),
        };
        if repair.period.is_zero() {
            return Err(invalid("repair.period", "must be longer than zero"));
        }
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
            "[repair] enabled = {}, period = \"{}\", cron = {}, sync_timeout = \"{}\", round_timeout = \"{}\", verify_interval = \"{}\", tombstone_grace = \"{}\", throttle_bytes_per_second = {}",
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

fn duration_or(
    key: &str,
    text: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match text {
        None => Ok(default),
        Some(text) => parse_duration(&text).map_err(|message| invalid(key, message)),
    }
}

/// Parses durations like `500ms`, `30s`, `10m`, `24h`, `7d` (one number, one unit).
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like \"30s\", \"10m\" or \"24h\""))?;
    let seconds = match unit {
        "ms" => return Ok(Duration::from_millis(value)),
        "s" => 1,
        "m" => 60,
        "h" => 60 * 60,
        "d" => 24 * 60 * 60,
        _ => return Err(format!("`{text}` has no known unit (ms, s, m, h, d)")),
    };
    value
        .checked_mul(seconds)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("`{text}` is too long"))
}

/// Formats a duration in the largest unit that divides it.
pub(crate) fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if !millis.is_multiple_of(1000) {
        return format!("{millis}ms");
    }
    let seconds = duration.as_secs();
    for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
        if seconds != 0 && seconds.is_multiple_of(size) {
            return format!("{}{unit}", seconds / size);
        }
    }
    format!("{seconds}s")
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
        assert!(config.describe().contains("name = \"default\""));
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
    fn durations_round_trip() {
        for text in ["30s", "10m", "2h", "7d", "250ms"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
        assert!(parse_duration("ten minutes").is_err());
        assert!(parse_duration("10").is_err());
    }
}
