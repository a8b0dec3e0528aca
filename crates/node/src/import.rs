//! `Import`: batches of exported properties written as they are (their revisions, tombstones
//! included), by the version order on every copy: newer wins, so an import never overwrites newer
//! data and importing the same export twice changes nothing the second time.
//!
//! The coordinator checks the whole batch first (a bad property refuses the batch, naming its
//! index and field, and nothing is written), splits it by shard, and writes each shard's part to
//! every copy of that shard in one call per copy; each copy applies its part in one write
//! transaction (`RedbStore::repair_apply_batch`). A shard's part needs `write_acks` copies, like
//! a write; a copy that missed it is remembered for write-miss repair.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use propd_merkle::{Entity, Property};
use propd_proto::v1;
use propd_store::RepairOutcome;
use tonic::{Request, Status};

use crate::convert::{property_from_wire, property_to_wire};
use crate::coordinator::{Refusals, blocking, invalid, not_a_member};
use crate::node::{NodeState, now_nanos};
use crate::tombstones::check_peer_copy;

/// The most properties one import request may carry.
pub(crate) const MAX_IMPORT_BATCH: usize = 10_000;
/// How long one copy may take to apply its part of an import batch.
const IMPORT_COPY_TIMEOUT: Duration = Duration::from_secs(60);

/// The field of item `index` of the batch.
fn item(index: usize, field: &str) -> String {
    if field.is_empty() {
        format!("properties[{index}]")
    } else {
        format!("properties[{index}].{field}")
    }
}

/// Checks one imported property as every copy will (entity, group, revision, delete time, size,
/// times not ahead of the clock); returns it with its entity and shard.
fn check(
    node: &NodeState,
    index: usize,
    wire: v1::Property,
    now: i64,
) -> Result<(Property, u32), Status> {
    let property = property_from_wire(wire).map_err(|error| invalid(&item(index, ""), error))?;
    for (field, value) in [
        ("group", &property.group),
        ("name", &property.name),
        ("id", &property.id),
    ] {
        if value.is_empty() {
            return Err(invalid(&item(index, field), "must not be empty"));
        }
    }
    let entity = Entity::new(&property.group, &property.name, &property.id)
        .map_err(|error| invalid(&item(index, "entity"), error))?;
    let placement = node.placement();
    let group = placement.group(&property.group).ok_or_else(|| {
        invalid(
            &item(index, "group"),
            format!("unknown group {:?}", property.group),
        )
    })?;
    if property.mod_revision <= 0 {
        return Err(invalid(
            &item(index, "mod_revision"),
            format!(
                "{} must be > 0: an import keeps the revisions it is given",
                property.mod_revision
            ),
        ));
    }
    if property.delete_time < 0 {
        return Err(invalid(
            &item(index, "delete_time"),
            format!("{} must be >= 0", property.delete_time),
        ));
    }
    let size = property.canonical_len();
    let max = node.config.max_property_bytes;
    if size > max {
        return Err(invalid(
            &item(index, ""),
            format!("{entity}: {size} bytes is over the limit of {max} bytes"),
        ));
    }
    check_peer_copy(&property, now, node.config.max_clock_skew).map_err(|refused| {
        let field = refused.field.trim_start_matches("property.");
        invalid(&item(index, field), refused.message)
    })?;
    let shard_num = std::num::NonZeroU32::new(group.shard_num).unwrap_or(std::num::NonZeroU32::MIN);
    let shard = propd_merkle::shard_of(&entity, shard_num);
    Ok((property, shard))
}

/// One (group, shard)'s part of a batch, with each property's index in the request.
type Parts = BTreeMap<(String, u32), Vec<(usize, Property)>>;

/// Answers an `ImportRequest`.
pub(crate) async fn import(
    node: &Arc<NodeState>,
    request: v1::ImportRequest,
) -> Result<v1::ImportResponse, Status> {
    let count = request.properties.len();
    if count > MAX_IMPORT_BATCH {
        return Err(invalid(
            "properties",
            format!("{count} properties is over the limit of {MAX_IMPORT_BATCH} per request"),
        ));
    }
    let now = now_nanos();
    let mut parts: Parts = BTreeMap::new();
    for (index, wire) in request.properties.into_iter().enumerate() {
        let (property, shard) = check(node, index, wire, now)?;
        parts
            .entry((property.group.clone(), shard))
            .or_default()
            .push((index, property));
    }
    if request.dry_run {
        return Ok(v1::ImportResponse::default());
    }
    if request.local {
        let mut stored = vec![false; count];
        for ((group, shard), part) in parts {
            let (indexes, properties): (Vec<usize>, Vec<Property>) = part.into_iter().unzip();
            let outcomes = blocking(node, move |node| {
                node.store.repair_apply_batch(&group, shard, properties)
            })
            .await?;
            for (index, outcome) in indexes.into_iter().zip(outcomes) {
                stored[index] = matches!(outcome, RepairOutcome::Applied);
            }
        }
        let applied = stored.iter().filter(|s| **s).count() as u64;
        return Ok(v1::ImportResponse {
            applied,
            unchanged: count as u64 - applied,
            acknowledged: 1,
            copies: 1,
            stored,
        });
    }
    let mut stored = vec![false; count];
    let (mut fewest, mut copies_of_fewest) = (u32::MAX, 0);
    for ((group_name, shard), part) in parts {
        let group = node
            .placement()
            .group(&group_name)
            .cloned()
            .ok_or_else(|| invalid("group", format!("unknown group {group_name:?}")))?;
        let targets = node.node_ids(&group, shard);
        let copies = targets.len() as u32;
        let required = node.config.write_acks.min(copies);
        let (indexes, properties): (Vec<usize>, Vec<Property>) = part.into_iter().unzip();
        let mut calls = tokio::task::JoinSet::new();
        for target in targets {
            let node = Arc::clone(node);
            let properties = properties.clone();
            let group = group_name.clone();
            calls.spawn(async move {
                let answer = import_copy(&node, &target, &group, shard, properties).await;
                if answer.is_err() {
                    node.record_miss(&target, &group, shard);
                }
                answer
            });
        }
        let (mut acknowledged, mut refusals) = (0, Refusals::default());
        while let Some(joined) = calls.join_next().await {
            match joined {
                Ok(Ok(flags)) => {
                    acknowledged += 1;
                    for (index, flag) in indexes.iter().zip(flags) {
                        stored[*index] |= flag;
                    }
                }
                Ok(Err(status)) => refusals.add(status),
                Err(_) => {}
            }
        }
        if let Some(status) = refusals.common().filter(|_| acknowledged == 0) {
            return Err(status);
        }
        if acknowledged < required {
            return Err(Status::unavailable(format!(
                "only {acknowledged} of {copies} copies of {group_name}/{shard} acknowledged the \
                 import, {required} required; copies that missed it will be repaired, and \
                 importing the same lines again is harmless"
            )));
        }
        if acknowledged < fewest {
            (fewest, copies_of_fewest) = (acknowledged, copies);
        }
    }
    let applied = stored.iter().filter(|s| **s).count() as u64;
    Ok(v1::ImportResponse {
        applied,
        unchanged: count as u64 - applied,
        acknowledged: if fewest == u32::MAX { 0 } else { fewest },
        copies: copies_of_fewest,
        stored: Vec::new(),
    })
}

/// Writes one shard's part of an import to the copy on `target`: per property, whether that
/// copy stored it.
async fn import_copy(
    node: &Arc<NodeState>,
    target: &str,
    group: &str,
    shard: u32,
    properties: Vec<Property>,
) -> Result<Vec<bool>, Status> {
    if target == node.me() {
        let group = group.to_owned();
        let outcomes = blocking(node, move |node| {
            node.store.repair_apply_batch(&group, shard, properties)
        })
        .await?;
        return Ok(outcomes
            .iter()
            .map(|outcome| matches!(outcome, RepairOutcome::Applied))
            .collect());
    }
    let count = properties.len();
    let mut client = node
        .peers
        .property_client(target)
        .ok_or_else(|| not_a_member(target))?;
    let mut request = Request::new(v1::ImportRequest {
        properties: properties.iter().map(property_to_wire).collect(),
        local: true,
        dry_run: false,
    });
    request.set_timeout(IMPORT_COPY_TIMEOUT);
    let answer = client.import(request).await;
    node.peers.saw_call(target, &answer);
    let answer = answer?.into_inner();
    if answer.stored.len() != count {
        return Err(Status::internal(format!(
            "{target} answered an import of {count} properties with {} outcomes",
            answer.stored.len()
        )));
    }
    Ok(answer.stored)
}
