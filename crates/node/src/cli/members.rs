//! `propd member ...` and `propd group ...`: membership and groups in etcd. These commands talk
//! to etcd, not to a node; every node watches etcd and follows.

use std::path::PathBuf;

use anyhow::{Result, anyhow};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::{Output, print};
use crate::config::PartialEtcd;
use crate::membership::{
    ClusterRecords, EtcdConfig, GroupRecord, MemberRecord, MemberState, MembershipError, Registry,
};

/// TLS to etcd, for `propd serve` and `propd member|group` alike.
#[derive(Debug, Default, Args)]
pub(super) struct EtcdTlsArgs {
    /// `etcd.tls_ca`: the CA that signs etcd's certificate (PEM): TLS to etcd (`https://`).
    #[arg(long, env = "PROPD_ETCD_TLS_CA")]
    pub(super) etcd_tls_ca: Option<PathBuf>,
    /// `etcd.tls_cert`: a client certificate for etcd (PEM), for an etcd that asks for one.
    #[arg(long, env = "PROPD_ETCD_TLS_CERT")]
    pub(super) etcd_tls_cert: Option<PathBuf>,
    /// `etcd.tls_key`: that certificate's private key (PEM).
    #[arg(long, env = "PROPD_ETCD_TLS_KEY")]
    pub(super) etcd_tls_key: Option<PathBuf>,
}

/// Where the cluster's membership lives.
#[derive(Debug, Args)]
pub(super) struct EtcdClient {
    /// etcd client URL (repeat, or comma-separate).
    #[arg(
        long = "etcd",
        env = "PROPD_ETCD_ENDPOINTS",
        value_delimiter = ',',
        required = true
    )]
    etcd_endpoints: Vec<String>,
    /// The cluster's key prefix in etcd.
    #[arg(long, env = "PROPD_ETCD_PREFIX")]
    etcd_prefix: Option<String>,
    #[command(flatten)]
    tls: EtcdTlsArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

impl EtcdClient {
    fn config(&self) -> Result<EtcdConfig> {
        PartialEtcd {
            endpoints: Some(self.etcd_endpoints.clone()),
            prefix: self.etcd_prefix.clone(),
            tls_ca: self.tls.etcd_tls_ca.clone(),
            tls_cert: self.tls.etcd_tls_cert.clone(),
            tls_key: self.tls.etcd_tls_key.clone(),
        }
        .resolve()?
        .ok_or_else(|| anyhow!("--etcd: no endpoint given"))
    }

    async fn registry(&self) -> Result<Registry> {
        Ok(Registry::connect(&self.config()?).await?)
    }
}

/// `propd member`.
#[derive(Debug, Args)]
pub(super) struct MemberArgs {
    #[command(subcommand)]
    command: MemberCommand,
}

#[derive(Debug, Subcommand)]
enum MemberCommand {
    /// The members, their state, and whether their node runs (holds its etcd lease).
    List {
        #[command(flatten)]
        etcd: EtcdClient,
    },
    /// Moves every copy off a member: it keeps serving while its shards move to the others.
    Drain {
        /// The member's id.
        id: String,
        #[command(flatten)]
        etcd: EtcdClient,
    },
    /// Removes a drained member.
    Remove {
        /// The member's id.
        id: String,
        #[command(flatten)]
        etcd: EtcdClient,
    },
    /// Gives a (dead) member's place to a new node: the new one holds the same copies and is
    /// filled by repair.
    Replace {
        /// The member that leaves.
        old: String,
        /// The id of the node that takes its place.
        new: String,
        #[command(flatten)]
        etcd: EtcdClient,
    },
}

/// `propd group`.
#[derive(Debug, Args)]
pub(super) struct GroupArgs {
    #[command(subcommand)]
    command: GroupCommand,
}

#[derive(Debug, Subcommand)]
enum GroupCommand {
    /// Creates a group (nodes serve it from their next start).
    Create {
        /// The group's name.
        name: String,
        /// Shards (fixed for the group's life).
        #[arg(long)]
        shards: u32,
        /// Copies beyond the first.
        #[arg(long, default_value_t = 0)]
        replicas: u32,
        #[command(flatten)]
        etcd: EtcdClient,
    },
    /// Changes a group's replicas (its shard count cannot change).
    Alter {
        /// The group's name.
        name: String,
        /// Copies beyond the first.
        #[arg(long)]
        replicas: u32,
        /// Refused unless it is the group's current count: given only to be told so.
        #[arg(long)]
        shards: Option<u32>,
        #[command(flatten)]
        etcd: EtcdClient,
    },
    /// The groups.
    List {
        #[command(flatten)]
        etcd: EtcdClient,
    },
}

fn refused(error: MembershipError) -> anyhow::Error {
    match error {
        MembershipError::Refused(rule) => anyhow!("refused: {rule}"),
        other => anyhow!(other),
    }
}

fn state_name(state: MemberState) -> &'static str {
    match state {
        MemberState::Active => "active",
        MemberState::Draining => "draining",
    }
}

fn members_json(records: &ClusterRecords) -> Vec<Value> {
    records
        .members
        .iter()
        .map(|(id, m)| {
            json!({
                "id": id,
                "addr": m.addr.to_string(),
                "state": state_name(m.state),
                "slot": m.slot.clone().unwrap_or_else(|| id.clone()),
                "running": records.alive.contains(id),
            })
        })
        .collect()
}

/// What a command prints: its JSON (`--output json`) and its text.
type Said = (Value, String);

/// `member list`.
fn member_list(records: &ClusterRecords) -> Said {
    let text = records
        .members
        .iter()
        .map(|(id, m)| {
            format!(
                "{id} {} {}{}{}",
                m.addr,
                state_name(m.state),
                if records.alive.contains(id) {
                    " running"
                } else {
                    " not running"
                },
                m.slot
                    .as_deref()
                    .map(|slot| format!(" (in the place of {slot})"))
                    .unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    (
        json!({"revision": records.revision, "members": members_json(records)}),
        text,
    )
}

/// `member drain ID`.
fn drained(id: &str, record: &MemberRecord) -> Said {
    (
        json!({"id": id, "state": state_name(record.state)}),
        format!("{id} is draining: its shards move to the other members"),
    )
}

/// `member remove ID`.
fn removed(id: &str) -> Said {
    (json!({"id": id, "removed": true}), format!("{id} removed"))
}

/// `member replace OLD NEW`.
fn replaced(old: &str, new: &str, record: &MemberRecord) -> Said {
    let slot = record.slot.clone().unwrap_or_else(|| old.to_owned());
    (
        json!({"old": old, "new": new, "slot": slot}),
        format!("{new} takes the place of {old}: start it; repair fills it"),
    )
}

/// `group create` and `group alter`: the group as it is now.
fn group_said(name: &str, record: GroupRecord, created: bool) -> Said {
    let text = if created {
        format!(
            "group {name} created: {} shards, {} replicas",
            record.shard_num, record.replicas
        )
    } else {
        format!(
            "group {name}: {} shards, {} replicas",
            record.shard_num, record.replicas
        )
    };
    (
        json!({"name": name, "shard_num": record.shard_num, "replicas": record.replicas}),
        text,
    )
}

/// `group list`.
fn group_list(records: &ClusterRecords) -> Said {
    let groups: Vec<Value> = records
        .groups
        .iter()
        .map(|(name, g)| json!({"name": name, "shard_num": g.shard_num, "replicas": g.replicas}))
        .collect();
    let text = records
        .groups
        .iter()
        .map(|(name, g)| format!("{name} {} shards {} replicas", g.shard_num, g.replicas))
        .collect::<Vec<_>>()
        .join("\n");
    (
        json!({"revision": records.revision, "groups": groups}),
        text,
    )
}

fn say(output: Output, (json, text): Said) -> Result<()> {
    Ok(print(output, &json, &text)?)
}

/// Runs `propd member ...`.
pub(super) async fn member(args: MemberArgs) -> Result<()> {
    match args.command {
        MemberCommand::List { etcd } => {
            let records = etcd.registry().await?.read().await?;
            say(etcd.output, member_list(&records))
        }
        MemberCommand::Drain { id, etcd } => {
            let record = etcd.registry().await?.drain(&id).await.map_err(refused)?;
            say(etcd.output, drained(&id, &record))
        }
        MemberCommand::Remove { id, etcd } => {
            etcd.registry().await?.remove(&id).await.map_err(refused)?;
            say(etcd.output, removed(&id))
        }
        MemberCommand::Replace { old, new, etcd } => {
            let record = etcd
                .registry()
                .await?
                .replace(&old, &new)
                .await
                .map_err(refused)?;
            say(etcd.output, replaced(&old, &new, &record))
        }
    }
}

/// Runs `propd group ...`.
pub(super) async fn group(args: GroupArgs) -> Result<()> {
    match args.command {
        GroupCommand::Create {
            name,
            shards,
            replicas,
            etcd,
        } => {
            let record = GroupRecord {
                shard_num: shards,
                replicas,
            };
            etcd.registry()
                .await?
                .create_group(&name, record)
                .await
                .map_err(refused)?;
            say(etcd.output, group_said(&name, record, true))
        }
        GroupCommand::Alter {
            name,
            replicas,
            shards,
            etcd,
        } => {
            let record = etcd
                .registry()
                .await?
                .alter_group(&name, replicas, shards)
                .await
                .map_err(refused)?;
            say(etcd.output, group_said(&name, record, false))
        }
        GroupCommand::List { etcd } => {
            let records = etcd.registry().await?.read().await?;
            say(etcd.output, group_list(&records))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use clap::Parser as _;
    use clap::error::ErrorKind;

    use super::super::tests::parse;
    use super::super::{Cli, Command};
    use super::*;
    use crate::membership::tests::records;
    use crate::moves::MoveRecord;

    fn member_command(line: &str) -> MemberCommand {
        match parse(line) {
            Command::Member(args) => args.command,
            other => panic!("{line}: {other:?}"),
        }
    }

    fn group_command(line: &str) -> GroupCommand {
        match parse(line) {
            Command::Group(args) => args.command,
            other => panic!("{line}: {other:?}"),
        }
    }

    fn parse_error(line: &str) -> clap::Error {
        Cli::try_parse_from(line.split(' ')).expect_err(line)
    }

    #[test]
    fn member_commands_parse_to_their_values() {
        let MemberCommand::List { etcd } = member_command(
            "propd member list --etcd http://a:2379,http://b:2379 --etcd-prefix /c1 --output json",
        ) else {
            panic!("list");
        };
        assert_eq!(etcd.etcd_endpoints, ["http://a:2379", "http://b:2379"]);
        assert_eq!(etcd.etcd_prefix.as_deref(), Some("/c1"));
        assert_eq!(etcd.output, Output::Json);

        let MemberCommand::Drain { id, etcd } =
            member_command("propd member drain n4 --etcd http://a:2379 --etcd http://b:2379")
        else {
            panic!("drain");
        };
        assert_eq!(id, "n4");
        assert_eq!(etcd.etcd_endpoints, ["http://a:2379", "http://b:2379"]);
        assert_eq!((etcd.etcd_prefix, etcd.output), (None, Output::Text));

        let MemberCommand::Remove { id, .. } =
            member_command("propd member remove n4 --etcd http://a:2379")
        else {
            panic!("remove");
        };
        assert_eq!(id, "n4");

        let MemberCommand::Replace { old, new, .. } =
            member_command("propd member replace n3 n5 --etcd http://a:2379")
        else {
            panic!("replace");
        };
        assert_eq!((old.as_str(), new.as_str()), ("n3", "n5"));
    }

    #[test]
    fn group_commands_parse_to_their_values() {
        let GroupCommand::Create {
            name,
            shards,
            replicas,
            etcd,
        } = group_command(
            "propd group create h --shards 16 --replicas 2 --etcd http://a:2379 --output json",
        )
        else {
            panic!("create");
        };
        assert_eq!((name.as_str(), shards, replicas), ("h", 16, 2));
        assert_eq!(etcd.output, Output::Json);
        // Replicas default to none beyond the first copy.
        let GroupCommand::Create { replicas, .. } =
            group_command("propd group create h --shards 4 --etcd http://a:2379")
        else {
            panic!("create");
        };
        assert_eq!(replicas, 0);

        let GroupCommand::Alter {
            name,
            replicas,
            shards,
            ..
        } = group_command("propd group alter g --replicas 1 --etcd http://a:2379")
        else {
            panic!("alter");
        };
        assert_eq!((name.as_str(), replicas, shards), ("g", 1, None));
        let GroupCommand::Alter { shards, .. } =
            group_command("propd group alter g --replicas 1 --shards 8 --etcd http://a:2379")
        else {
            panic!("alter");
        };
        assert_eq!(shards, Some(8));

        assert!(matches!(
            group_command("propd group list --etcd http://a:2379"),
            GroupCommand::List { .. }
        ));
    }

    #[test]
    fn arguments_that_cannot_mean_anything_are_refused_by_name() {
        // The etcd endpoint is required (here without PROPD_ETCD_ENDPOINTS set by the test).
        if std::env::var_os("PROPD_ETCD_ENDPOINTS").is_none() {
            let error = parse_error("propd member list");
            assert_eq!(error.kind(), ErrorKind::MissingRequiredArgument);
            assert!(error.to_string().contains("--etcd"), "{error}");
        }
        let error = parse_error("propd group create h --etcd http://a:2379");
        assert_eq!(error.kind(), ErrorKind::MissingRequiredArgument);
        assert!(error.to_string().contains("--shards"), "{error}");
        let error = parse_error("propd group alter g --etcd http://a:2379");
        assert_eq!(error.kind(), ErrorKind::MissingRequiredArgument);
        assert!(error.to_string().contains("--replicas"), "{error}");
        for (line, flag) in [
            (
                "propd group alter g --replicas two --etcd http://a:2379",
                "--replicas",
            ),
            (
                "propd group alter g --replicas 1.5 --etcd http://a:2379",
                "--replicas",
            ),
            (
                "propd group create h --shards 4x --etcd http://a:2379",
                "--shards",
            ),
        ] {
            let error = parse_error(line);
            assert_eq!(error.kind(), ErrorKind::ValueValidation, "{line}: {error}");
            assert!(
                error.to_string().contains(&format!("for '{flag} <")),
                "{line}: {error}"
            );
        }
        // A negative count reads as an unknown flag, refused before anything runs.
        let error = parse_error("propd group alter g --replicas -1 --etcd http://a:2379");
        assert_eq!(error.kind(), ErrorKind::UnknownArgument, "{error}");
        assert!(error.to_string().contains("'-1'"), "{error}");
        let error = parse_error("propd member replace n3 --etcd http://a:2379");
        assert_eq!(error.kind(), ErrorKind::MissingRequiredArgument);
        assert!(error.to_string().contains("<NEW>"), "{error}");
    }

    #[test]
    fn the_etcd_flags_are_checked_as_the_config_keys_are() {
        let client = |endpoints: &[&str], prefix: Option<&str>| EtcdClient {
            etcd_endpoints: endpoints.iter().map(|e| (*e).to_owned()).collect(),
            etcd_prefix: prefix.map(str::to_owned),
            tls: EtcdTlsArgs::default(),
            output: Output::Text,
        };
        let config = client(&["http://a:2379"], None).config().expect("valid");
        assert_eq!(config.endpoints, ["http://a:2379"]);
        assert_eq!(config.prefix, crate::membership::DEFAULT_PREFIX);
        let error = client(&["a:2379"], None).config().unwrap_err().to_string();
        assert!(
            error.contains("etcd.endpoints") && error.contains("`a:2379`"),
            "{error}"
        );
        let error = client(&["http://a:2379"], Some("c1"))
            .config()
            .unwrap_err()
            .to_string();
        assert!(error.contains("etcd.prefix"), "{error}");
        let error = client(&[], None).config().unwrap_err().to_string();
        assert!(error.contains("--etcd"), "{error}");
    }

    #[test]
    fn a_refusal_says_so_and_names_the_rule() {
        // Group `g` of 8 shards.
        let records = records();
        let error = refused(records.with_group_replicas("g", 1, Some(16)).unwrap_err());
        let message = error.to_string();
        assert!(
            message.starts_with("refused: group `g` has 8 shards and keeps them"),
            "{message}"
        );
        let error = refused(
            records
                .with_group_replicas("g", crate::config::MAX_REPLICAS + 1, None)
                .unwrap_err(),
        );
        assert!(
            error
                .to_string()
                .starts_with("refused: group `g`: replicas must be 0..="),
            "{error}"
        );
        // Other errors pass through without the word.
        let error = refused(MembershipError::Record {
            key: "/propd/groups/g".to_owned(),
            message: "not JSON".to_owned(),
        });
        assert_eq!(error.to_string(), "etcd key `/propd/groups/g`: not JSON");
    }

    fn record(port: u16, state: MemberState, slot: Option<&str>) -> MemberRecord {
        MemberRecord {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            state,
            slot: slot.map(str::to_owned),
        }
    }

    #[test]
    fn member_output_has_every_field() {
        let records = ClusterRecords {
            revision: 42,
            members: [
                ("n1".to_owned(), record(7001, MemberState::Active, None)),
                (
                    "n5".to_owned(),
                    record(7005, MemberState::Draining, Some("n3")),
                ),
            ]
            .into_iter()
            .collect(),
            alive: vec!["n1".to_owned()],
            groups: std::collections::BTreeMap::new(),
            moves: vec![MoveRecord {
                group: "g".to_owned(),
                shard: 1,
                leaving: vec!["n5".to_owned()],
            }],
        };
        let (json, text) = member_list(&records);
        assert_eq!(
            json,
            json!({"revision": 42, "members": [
                {"id": "n1", "addr": "127.0.0.1:7001", "state": "active", "slot": "n1", "running": true},
                {"id": "n5", "addr": "127.0.0.1:7005", "state": "draining", "slot": "n3", "running": false},
            ]})
        );
        assert_eq!(
            text,
            "n1 127.0.0.1:7001 active running\nn5 127.0.0.1:7005 draining not running (in the place of n3)"
        );

        let draining = record(7001, MemberState::Draining, None);
        let (json, text) = drained("n1", &draining);
        assert_eq!(json, json!({"id": "n1", "state": "draining"}));
        assert!(text.starts_with("n1 is draining"), "{text}");

        assert_eq!(removed("n1").0, json!({"id": "n1", "removed": true}));

        // The slot is the old member's, or the one it had itself taken over.
        let (json, _) = replaced("n3", "n5", &record(7003, MemberState::Active, Some("n3")));
        assert_eq!(json, json!({"old": "n3", "new": "n5", "slot": "n3"}));
        let (json, text) = replaced("n5", "n6", &record(7005, MemberState::Active, Some("n3")));
        assert_eq!(json, json!({"old": "n5", "new": "n6", "slot": "n3"}));
        assert_eq!(text, "n6 takes the place of n5: start it; repair fills it");
        let (json, _) = replaced("n3", "n5", &record(7003, MemberState::Active, None));
        assert_eq!(json["slot"], "n3");
    }

    #[test]
    fn group_output_has_every_field() {
        let g = GroupRecord {
            shard_num: 8,
            replicas: 1,
        };
        let (json, text) = group_said("g", g, true);
        assert_eq!(json, json!({"name": "g", "shard_num": 8, "replicas": 1}));
        assert_eq!(text, "group g created: 8 shards, 1 replicas");
        let (json, text) = group_said("g", g, false);
        assert_eq!(json, json!({"name": "g", "shard_num": 8, "replicas": 1}));
        assert_eq!(text, "group g: 8 shards, 1 replicas");

        let records = ClusterRecords {
            revision: 3,
            groups: [
                ("g".to_owned(), g),
                (
                    "h".to_owned(),
                    GroupRecord {
                        shard_num: 4,
                        replicas: 0,
                    },
                ),
            ]
            .into_iter()
            .collect(),
            ..ClusterRecords::default()
        };
        let (json, text) = group_list(&records);
        assert_eq!(
            json,
            json!({"revision": 3, "groups": [
                {"name": "g", "shard_num": 8, "replicas": 1},
                {"name": "h", "shard_num": 4, "replicas": 0},
            ]})
        );
        assert_eq!(text, "g 8 shards 1 replicas\nh 4 shards 0 replicas");
    }
}
