//! The alternating descent of protocol version 3 (docs/protocol.md, "Descent (version 3)"): the
//! pieces both sides run, since each step is built and read the same way by either side.
//!
//! A side *expands* a node by sending the digests of its children; the peer compares them with
//! its own and answers, in its next `TreeStep`, which children differ, which of those it settles
//! (their leaves are listed or streamed instead of descended into), and its own expansion of the
//! others, which the first side compares in turn. Every step answers one level and expands the
//! next, so each half round trip descends one level.

use std::collections::{HashMap, VecDeque};

use propd_merkle::{InnerNode, NodeId, Shape};
use propd_proto::v1 as pb;

use crate::error::{ProtocolError, SyncError, malformed};
use crate::store_api::RepairStore;
use crate::wire;

/// A node this side expanded, awaiting the peer's verdict: the presence bitmap of the children
/// we sent, and the half-trip depth of the message that carried them.
#[derive(Debug, Clone)]
pub(crate) struct Expanded {
    pub(crate) node: NodeId,
    pub(crate) present: Vec<u8>,
    pub(crate) depth: u32,
}

/// A node the peer expanded, to compare with our children of it: the peer's presence bitmap and
/// digest prefixes, and the depth of the message that carried them.
#[derive(Debug, Clone)]
pub(crate) struct ToCompare {
    pub(crate) node: NodeId,
    pub(crate) present: Vec<u8>,
    pub(crate) digests: Vec<u8>,
    pub(crate) depth: u32,
}

/// A differing child settled by a step (ours or the peer's): its leaves are listed or streamed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settled {
    pub(crate) node: NodeId,
    /// The client holds the node.
    pub(crate) client_has: bool,
    /// The depth of the step that settled it.
    pub(crate) depth: u32,
}

/// Which side runs the step (it decides how `present` bitmaps map to client and server).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Server,
}

/// Our expansion of `node`: the presence bitmap of its children and their digest prefixes.
pub(crate) fn expand<S: RepairStore>(
    store: &S,
    shape: &Shape,
    group: &str,
    shard: u32,
    node: NodeId,
    width: usize,
) -> Result<(Vec<u8>, Vec<u8>, u64), SyncError> {
    let range = shape.child_range(node);
    let n = (range.end - range.start) as usize;
    let children = store
        .tree_children(group, shard, node)
        .map_err(SyncError::store("reading child digests"))?;
    let mut bitmap = vec![0u8; wire::bitmap_len(n)];
    let mut digests = Vec::with_capacity(children.len() * width);
    let mut count = 0;
    for (child, inner) in &children {
        if inner.leaf_count == 0 || !range.contains(&child.index) {
            continue;
        }
        wire::set_bit(&mut bitmap, (child.index - range.start) as usize);
        digests.extend_from_slice(&inner.digest.as_bytes()[..width]);
        count += 1;
    }
    Ok((bitmap, digests, count))
}

/// Reads an expansion of `node` (presence bitmap, then one digest prefix per present child).
pub(crate) fn read_expansion(
    reader: &mut wire::Reader<'_>,
    shape: &Shape,
    node: NodeId,
    width: usize,
    field: &'static str,
) -> Result<(Vec<u8>, Vec<u8>), ProtocolError> {
    let range = shape.child_range(node);
    let n = (range.end - range.start) as usize;
    let present = reader.take(wire::bitmap_len(n))?;
    wire::check_bitmap(field, present, n)?;
    let count = present
        .iter()
        .map(|b| b.count_ones() as usize)
        .sum::<usize>();
    let digests = reader.take(count * width)?;
    Ok((present.to_vec(), digests.to_vec()))
}

/// The rules and limits a step is built with.
pub(crate) struct StepRules {
    pub(crate) side: Side,
    pub(crate) width: usize,
    pub(crate) page_items: usize,
    pub(crate) leaf_list_max: u64,
}

/// One built step page.
pub(crate) struct BuiltStep {
    pub(crate) page: pb::TreeStep,
    /// Children we settled.
    pub(crate) settled: Vec<Settled>,
    /// Children we expanded in the page (awaiting the peer's verdict).
    pub(crate) expanded: Vec<Expanded>,
    /// The depth of the page: one more than the deepest message it answers.
    pub(crate) depth: u32,
    /// Digests we sent, and the level of the nodes compared.
    pub(crate) digests: u64,
    pub(crate) level: u32,
}

/// Builds the next step page from the front of `queue`: for each node the peer expanded, our
/// verdict on its children and our expansion of the differing ones we do not settle. Takes at
/// least one node, and more while the page holds at most `page_items` digests. `None` when the
/// queue is empty.
pub(crate) fn build_step<S: RepairStore>(
    store: &S,
    shape: &Shape,
    group: &str,
    shard: u32,
    queue: &mut VecDeque<ToCompare>,
    rules: &StepRules,
) -> Result<Option<BuiltStep>, SyncError> {
    let Some(first) = queue.front() else {
        return Ok(None);
    };
    let mut built = BuiltStep {
        page: pb::TreeStep::default(),
        settled: Vec::new(),
        expanded: Vec::new(),
        depth: 0,
        digests: 0,
        level: first.node.level + 1,
    };
    let bucket_level = shape.bucket_level();
    while let Some(item) = queue.front() {
        let range = shape.child_range(item.node);
        let n = (range.end - range.start) as usize;
        // A parent whose every child is expanded adds n * fanout digests; stop before the page
        // could overflow (the first parent always goes in).
        let most = n * shape.fanout as usize;
        if built.page.parents > 0 && built.digests as usize + most > rules.page_items {
            break;
        }
        let Some(item) = queue.pop_front() else { break };
        built.depth = built.depth.max(item.depth + 1);
        built.page.parents += 1;
        let ours: HashMap<u64, InnerNode> = store
            .tree_children(group, shard, item.node)
            .map_err(SyncError::store("reading child digests"))?
            .into_iter()
            .filter(|(child, node)| node.leaf_count > 0 && range.contains(&child.index))
            .map(|(child, node)| (child.index, node))
            .collect();
        let mut differ = vec![0u8; wire::bitmap_len(n)];
        let mut settle = vec![0u8; wire::bitmap_len(n)];
        let mut present = vec![0u8; wire::bitmap_len(n)];
        let mut expand_now = Vec::new();
        let mut next = 0usize;
        for i in 0..n {
            let index = range.start + i as u64;
            let theirs = if wire::bit(&item.present, i) {
                let d = &item.digests[next * rules.width..(next + 1) * rules.width];
                next += 1;
                Some(d)
            } else {
                None
            };
            let mine = ours.get(&index);
            if mine.is_some() {
                wire::set_bit(&mut present, i);
            }
            let same = match (theirs, mine) {
                (None, None) => true,
                (Some(t), Some(m)) => &m.digest.as_bytes()[..rules.width] == t,
                _ => false,
            };
            if same {
                continue;
            }
            wire::set_bit(&mut differ, i);
            let child = NodeId::new(item.node.level + 1, index);
            let settles = child.level == bucket_level
                || theirs.is_none()
                || mine.is_none_or(|m| m.leaf_count <= rules.leaf_list_max);
            if settles {
                wire::set_bit(&mut settle, i);
                let client_has = match rules.side {
                    Side::Client => mine.is_some(),
                    Side::Server => theirs.is_some(),
                };
                built.settled.push(Settled {
                    node: child,
                    client_has,
                    depth: built.depth,
                });
            } else {
                expand_now.push(child);
            }
        }
        built.page.packed.extend_from_slice(&differ);
        built.page.packed.extend_from_slice(&settle);
        built.page.packed.extend_from_slice(&present);
        for child in expand_now {
            let (bitmap, digests, count) = expand(store, shape, group, shard, child, rules.width)?;
            built.page.packed.extend_from_slice(&bitmap);
            built.page.packed.extend_from_slice(&digests);
            built.digests += count;
            built.expanded.push(Expanded {
                node: child,
                present: bitmap,
                depth: 0,
            });
        }
    }
    for expanded in &mut built.expanded {
        expanded.depth = built.depth;
    }
    for settled in &mut built.settled {
        settled.depth = built.depth;
    }
    Ok(Some(built))
}

/// What a received step page says, checked as a whole before any state changes.
pub(crate) struct ReadStep {
    /// How many of our expanded nodes it answers.
    pub(crate) answered: usize,
    /// Children the peer settled.
    pub(crate) settled: Vec<Settled>,
    /// The peer's expansions, for us to compare.
    pub(crate) to_compare: Vec<ToCompare>,
    /// The depth of the page.
    pub(crate) depth: u32,
}

/// Reads a peer's step page against the nodes we expanded (`awaiting`, in order).
pub(crate) fn read_step(
    page: &pb::TreeStep,
    awaiting: &VecDeque<Expanded>,
    shape: &Shape,
    width: usize,
    side: Side,
) -> Result<ReadStep, ProtocolError> {
    const FIELD: &str = "TreeStep.packed";
    let answered = page.parents as usize;
    if answered == 0 || answered > awaiting.len() {
        return Err(malformed(
            "TreeStep.parents",
            format!("{answered} parents, {} await an answer", awaiting.len()),
        ));
    }
    let depth = awaiting
        .iter()
        .take(answered)
        .map(|e| e.depth)
        .max()
        .unwrap_or(0)
        + 1;
    let bucket_level = shape.bucket_level();
    let mut reader = wire::Reader::new(FIELD, &page.packed);
    let mut read = ReadStep {
        answered,
        settled: Vec::new(),
        to_compare: Vec::new(),
        depth,
    };
    for parent in awaiting.iter().take(answered) {
        let range = shape.child_range(parent.node);
        let n = (range.end - range.start) as usize;
        let len = wire::bitmap_len(n);
        let differ = reader.take(len)?;
        let settle = reader.take(len)?;
        let theirs = reader.take(len)?;
        for bitmap in [differ, settle, theirs] {
            wire::check_bitmap(FIELD, bitmap, n)?;
        }
        let mut expand_now = Vec::new();
        for i in 0..n {
            let mine = wire::bit(&parent.present, i);
            let their = wire::bit(theirs, i);
            let differs = wire::bit(differ, i);
            let settles = wire::bit(settle, i);
            if settles && !differs {
                return Err(malformed(FIELD, "a settled child is not marked differing"));
            }
            if !differs {
                if mine != their {
                    return Err(malformed(
                        FIELD,
                        "a child held by one side only is not marked differing",
                    ));
                }
                continue;
            }
            if !mine && !their {
                return Err(malformed(FIELD, "a child neither side holds differs"));
            }
            let child = NodeId::new(parent.node.level + 1, range.start + i as u64);
            if settles {
                let client_has = match side {
                    Side::Client => mine,
                    Side::Server => their,
                };
                read.settled.push(Settled {
                    node: child,
                    client_has,
                    depth,
                });
            } else if child.level >= bucket_level || !mine || !their {
                return Err(malformed(
                    FIELD,
                    format!("descends into {child}, which must be settled"),
                ));
            } else {
                expand_now.push(child);
            }
        }
        for child in expand_now {
            let (present, digests) = read_expansion(&mut reader, shape, child, width, FIELD)?;
            read.to_compare.push(ToCompare {
                node: child,
                present,
                digests,
                depth,
            });
        }
    }
    reader.finish()?;
    Ok(read)
}
