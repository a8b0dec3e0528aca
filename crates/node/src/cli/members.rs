//! `propd member ...` and `propd group ...`: membership and groups in etcd. These commands talk
//! to etcd, not to a node; every node watches etcd and follows.

use anyhow::{Result, anyhow};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::{Output, print};
use crate::config::PartialEtcd;
use crate::membership::{
    ClusterRecords, EtcdConfig, GroupRecord, MemberState, MembershipError, Registry,
};

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
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

impl EtcdClient {
    fn config(&self) -> Result<EtcdConfig> {
        PartialEtcd {
            endpoints: Some(self.etcd_endpoints.clone()),
            prefix: self.etcd_prefix.clone(),
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

/// Runs `propd member ...`.
pub(super) async fn member(args: MemberArgs) -> Result<()> {
    match args.command {
        MemberCommand::List { etcd } => {
            let records = etcd.registry().await?.read().await?;
            let members = members_json(&records);
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
            print(
                etcd.output,
                &json!({"revision": records.revision, "members": members}),
                &text,
            )?;
        }
        MemberCommand::Drain { id, etcd } => {
            let record = etcd.registry().await?.drain(&id).await.map_err(refused)?;
            print(
                etcd.output,
                &json!({"id": id, "state": state_name(record.state)}),
                &format!("{id} is draining: its shards move to the other members"),
            )?;
        }
        MemberCommand::Remove { id, etcd } => {
            etcd.registry().await?.remove(&id).await.map_err(refused)?;
            print(
                etcd.output,
                &json!({"id": id, "removed": true}),
                &format!("{id} removed"),
            )?;
        }
        MemberCommand::Replace { old, new, etcd } => {
            let record = etcd
                .registry()
                .await?
                .replace(&old, &new)
                .await
                .map_err(refused)?;
            let slot = record.slot.unwrap_or_else(|| old.clone());
            print(
                etcd.output,
                &json!({"old": old, "new": new, "slot": slot}),
                &format!("{new} takes the place of {old}: start it; repair fills it"),
            )?;
        }
    }
    Ok(())
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
            print(
                etcd.output,
                &json!({"name": name, "shard_num": shards, "replicas": replicas}),
                &format!("group {name} created: {shards} shards, {replicas} replicas"),
            )?;
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
            print(
                etcd.output,
                &json!({"name": name, "shard_num": record.shard_num, "replicas": record.replicas}),
                &format!(
                    "group {name}: {} shards, {} replicas",
                    record.shard_num, record.replicas
                ),
            )?;
        }
        GroupCommand::List { etcd } => {
            let records = etcd.registry().await?.read().await?;
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
            print(
                etcd.output,
                &json!({"revision": records.revision, "groups": groups}),
                &text,
            )?;
        }
    }
    Ok(())
}
