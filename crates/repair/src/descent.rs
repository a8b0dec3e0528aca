//! The alternating descent of protocol version 3 (docs/protocol.md, "Descent (version 3)"): the
//! pieces both sides run, since each step is built and read the same way by either side.
//!
//! A side *expands* a node by sending the digests of its children; the peer compares them with
//! its own and answers, in its next `TreeStep`, which children differ and, for each differing
//! child it can say something about, a 2-bit verdict (descend, settled, settled and the sender
//! lacks it, checked by leaf hints), then its own expansion of the children it descends into,
//! which the first side compares in turn. Every step answers one level and expands the next, so
//! each half round trip descends one level.
//!
//! **Leaf hints.** When the server expands the parents of buckets while the difference is small
//! (at most [`HINT_MAX_EXPANSIONS`] expansions in the sync so far) and the buckets are small
//! enough (at most [`HINT_MAX_BYTES`] of hints in the step), it also sends, for every
//! bucket under them, its leaf count and a 12-bit *short fingerprint* of each leaf. The client
//! then settles a differing bucket on the spot (verdict [`Verdict::Hinted`]): it sends its
//! leaves whose short fingerprints the server's do not hold as copies at once, and for the
//! others, which server leaves they matched (a bitmap) and the wrapping sum of their full
//! 8-byte fingerprints. The server checks that sum against its own leaves at the matched
//! positions: when it holds, the matched leaves are equal on both sides (to the same 64 bits as
//! any fingerprint) and the server sends its unmatched leaves; when it fails (two different
//! leaves shared a short fingerprint), the server lists every hinted bucket in full and the
//! merge runs as for a settled bucket. A short-fingerprint collision therefore costs one round
//! trip more, never a difference.

use std::collections::{HashMap, VecDeque};

use propd_merkle::{Entity, InnerNode, NodeId, Shape};
use propd_proto::v1 as pb;

use crate::error::{ProtocolError, SyncError, malformed};
use crate::store_api::RepairStore;
use crate::wire;

/// The server attaches leaf hints only while it has expanded at most this many nodes in the
/// sync (the hinted page included): hints pay for one or a few differences, not for many.
pub(crate) const HINT_MAX_EXPANSIONS: usize = 8;

/// Bits of a short fingerprint in a leaf hint.
pub(crate) const SHORT_BITS: u32 = 12;

/// A bucket with more leaves than this is never hinted (its count travels in one byte).
pub(crate) const HINT_MAX_LEAVES: usize = 255;

/// The most bytes of leaf hints one step carries. Hints save the client half a round trip by
/// sending a short fingerprint of every leaf under the expanded parents; in a large shard those
/// buckets hold many leaves (about 1 000 under one parent at 10 M properties in the default
/// shape, 1.5 KB of hints), and then the hints cost more than the level they skip: the step
/// goes without them and the descent takes its usual half round trip more.
pub(crate) const HINT_MAX_BYTES: usize = 512;

/// The short fingerprint of a leaf: the low bits of its fingerprint.
pub(crate) fn short(fingerprint: u64) -> u16 {
    (fingerprint & ((1 << SHORT_BITS) - 1)) as u16
}

/// A verdict on a differing child the receiver holds, 2 bits on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Both hold it; the sender's expansion of it follows.
    Descend = 0,
    /// Both hold it; its leaves are listed or streamed.
    Settled = 1,
    /// The sender lacks it; its leaves are listed (the server lacks it) or streamed.
    SenderLacks = 2,
    /// A bucket both hold, settled by the server's leaf hints; the client's check follows.
    Hinted = 3,
}

impl Verdict {
    fn from_bits(bits: u8) -> Verdict {
        match bits & 3 {
            0 => Verdict::Descend,
            1 => Verdict::Settled,
            2 => Verdict::SenderLacks,
            _ => Verdict::Hinted,
        }
    }
}

/// A node this side expanded, awaiting the peer's verdict: the presence bitmap of the children
/// we sent, the half-trip depth of the message that carried them, and, when we hinted its
/// buckets, the full fingerprints of each present bucket's hinted leaves, in order.
#[derive(Debug, Clone)]
pub(crate) struct Expanded {
    pub(crate) node: NodeId,
    pub(crate) present: Vec<u8>,
    pub(crate) depth: u32,
    pub(crate) hints: Option<Vec<Vec<u64>>>,
}

/// A node the peer expanded, to compare with our children of it: the peer's presence bitmap and
/// digest prefixes, the depth of the message that carried them, and the peer's leaf hints (the
/// short fingerprints of each present bucket's leaves), if it sent any.
#[derive(Debug, Clone)]
pub(crate) struct ToCompare {
    pub(crate) node: NodeId,
    pub(crate) present: Vec<u8>,
    pub(crate) digests: Vec<u8>,
    pub(crate) depth: u32,
    pub(crate) hints: Option<Vec<Vec<u16>>>,
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

/// A bucket the client settled by the server's hints, as the server reads it.
#[derive(Debug, Clone)]
pub(crate) struct HintCheck {
    pub(crate) node: NodeId,
    /// The sum of the matched leaves' fingerprints agrees with ours.
    pub(crate) holds: bool,
    /// Fingerprints of our hinted leaves the client matched none of: ours to send.
    pub(crate) unmatched: Vec<u64>,
}

/// Which side runs the step (it decides how presence maps to client and server).
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
    let digests = reader.take(count_ones(present) * width)?;
    Ok((present.to_vec(), digests.to_vec()))
}

fn count_ones(bitmap: &[u8]) -> usize {
    bitmap.iter().map(|b| b.count_ones() as usize).sum()
}

/// The rules and limits a step is built with.
pub(crate) struct StepRules {
    pub(crate) side: Side,
    pub(crate) width: usize,
    pub(crate) page_items: usize,
    pub(crate) leaf_list_max: u64,
    /// Nodes this side expanded earlier in the sync, when it may hint buckets (the server,
    /// outside previews); `None` never hints.
    pub(crate) hint_after: Option<usize>,
}

/// One built step page.
pub(crate) struct BuiltStep {
    pub(crate) page: pb::TreeStep,
    /// Children we settled.
    pub(crate) settled: Vec<Settled>,
    /// Buckets we settled by the peer's hints (client), and our leaves under them the server's
    /// hints do not hold: copies to send now.
    pub(crate) hinted: Vec<NodeId>,
    pub(crate) copies: Vec<Entity>,
    /// Our leaves compared against hints, and hinted server leaves none of ours matched.
    pub(crate) compared: u64,
    pub(crate) unmatched: u64,
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
        hinted: Vec::new(),
        copies: Vec::new(),
        compared: 0,
        unmatched: 0,
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
        let mut verdicts = BitWriter::default();
        let mut expand_now = Vec::new();
        let mut checks = Vec::new();
        let mut next = 0usize;
        for i in 0..n {
            let index = range.start + i as u64;
            let position = next;
            let theirs = if wire::bit(&item.present, i) {
                let d = &item.digests[next * rules.width..(next + 1) * rules.width];
                next += 1;
                Some(d)
            } else {
                None
            };
            let mine = ours.get(&index);
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
            let hints = item.hints.as_ref().and_then(|h| h.get(position));
            let verdict = match (theirs, mine) {
                // The peer lacks it: settled, no verdict travels.
                (None, _) => None,
                (Some(_), None) => Some(Verdict::SenderLacks),
                (Some(_), Some(_)) if child.level == bucket_level => {
                    match hints.map(|h| check_hinted(store, group, shard, child, h, rules)) {
                        Some(Ok(Some(check))) => {
                            checks.push(check.wire);
                            built.copies.extend(check.copies);
                            built.compared += check.compared;
                            built.unmatched += check.unmatched;
                            built.hinted.push(child);
                            Some(Verdict::Hinted)
                        }
                        Some(Err(err)) => return Err(err),
                        _ => Some(Verdict::Settled),
                    }
                }
                (Some(_), Some(m)) if m.leaf_count <= rules.leaf_list_max => Some(Verdict::Settled),
                (Some(_), Some(_)) => Some(Verdict::Descend),
            };
            if let Some(verdict) = verdict {
                verdicts.push(verdict as u32, 2);
            }
            match verdict {
                Some(Verdict::Descend) => expand_now.push(child),
                Some(Verdict::Hinted) => {}
                _ => {
                    let client_has = match rules.side {
                        Side::Client => mine.is_some(),
                        Side::Server => theirs.is_some(),
                    };
                    built.settled.push(Settled {
                        node: child,
                        client_has,
                        depth: 0,
                    });
                }
            }
        }
        built.page.packed.extend_from_slice(&differ);
        built.page.packed.extend_from_slice(&verdicts.finish());
        for child in expand_now {
            let (bitmap, digests, count) = expand(store, shape, group, shard, child, rules.width)?;
            built.page.packed.extend_from_slice(&bitmap);
            built.page.packed.extend_from_slice(&digests);
            built.digests += count;
            built.expanded.push(Expanded {
                node: child,
                present: bitmap,
                depth: 0,
                hints: None,
            });
        }
        for check in checks {
            built.page.packed.extend_from_slice(&check);
        }
    }
    for expanded in &mut built.expanded {
        expanded.depth = built.depth;
    }
    for settled in &mut built.settled {
        settled.depth = built.depth;
    }
    if let Some(earlier) = rules.hint_after {
        add_hints(store, shape, group, shard, earlier, &mut built)?;
    }
    Ok(Some(built))
}

/// A hinted bucket's check, built by the client.
struct BuiltCheck {
    /// The matched bitmap over the server's hinted leaves, then the sum of the matched leaves'
    /// fingerprints (8 bytes little-endian).
    wire: Vec<u8>,
    copies: Vec<Entity>,
    compared: u64,
    unmatched: u64,
}

/// Matches our leaves under a differing bucket against the server's short fingerprints of its
/// leaves there. `None` when our bucket is too large to match in one read (then it is settled
/// and listed as usual).
fn check_hinted<S: RepairStore>(
    store: &S,
    group: &str,
    shard: u32,
    bucket: NodeId,
    theirs: &[u16],
    rules: &StepRules,
) -> Result<Option<BuiltCheck>, SyncError> {
    let limit = rules.page_items.max(HINT_MAX_LEAVES + 1);
    let leaves = store
        .leaves_under(group, shard, bucket, None, limit)
        .map_err(SyncError::store("reading leaves to match hints"))?;
    if leaves.len() >= limit {
        return Ok(None);
    }
    let mut matched = vec![0u8; wire::bitmap_len(theirs.len())];
    let mut sum = 0u64;
    let mut copies = Vec::new();
    for leaf in &leaves {
        let fp = wire::fingerprint(&leaf.digest);
        let s = short(fp);
        let free = (0..theirs.len()).find(|&j| theirs[j] == s && !wire::bit(&matched, j));
        match free {
            Some(j) => {
                wire::set_bit(&mut matched, j);
                sum = sum.wrapping_add(fp);
            }
            None => copies.push(leaf.entity.clone()),
        }
    }
    let unmatched = (theirs.len() - count_ones(&matched)) as u64;
    let mut wire = matched;
    wire.extend_from_slice(&sum.to_le_bytes());
    Ok(Some(BuiltCheck {
        wire,
        copies,
        compared: leaves.len() as u64 + unmatched,
        unmatched,
    }))
}

/// Appends leaf hints to a built page when the rules allow it: every node the page expands is
/// a parent of buckets, the sync has expanded few nodes, and no bucket is too large.
fn add_hints<S: RepairStore>(
    store: &S,
    shape: &Shape,
    group: &str,
    shard: u32,
    earlier: usize,
    built: &mut BuiltStep,
) -> Result<(), SyncError> {
    let bucket_level = shape.bucket_level();
    if built.expanded.is_empty()
        || earlier + built.expanded.len() > HINT_MAX_EXPANSIONS
        || built
            .expanded
            .iter()
            .any(|e| e.node.level + 1 != bucket_level)
    {
        return Ok(());
    }
    let mut writer = BitWriter::default();
    let mut hinted_bits = 0;
    let mut remembered = Vec::with_capacity(built.expanded.len());
    for expanded in &built.expanded {
        let range = shape.child_range(expanded.node);
        let mut per_bucket = Vec::new();
        for i in 0..(range.end - range.start) as usize {
            if !wire::bit(&expanded.present, i) {
                continue;
            }
            let bucket = NodeId::new(bucket_level, range.start + i as u64);
            let leaves = store
                .leaves_under(group, shard, bucket, None, HINT_MAX_LEAVES + 1)
                .map_err(SyncError::store("reading leaves to hint"))?;
            if leaves.len() > HINT_MAX_LEAVES {
                return Ok(());
            }
            hinted_bits += 8 + leaves.len() * SHORT_BITS as usize;
            if hinted_bits > HINT_MAX_BYTES * 8 {
                return Ok(());
            }
            let fps: Vec<u64> = leaves
                .iter()
                .map(|leaf| wire::fingerprint(&leaf.digest))
                .collect();
            writer.push(fps.len() as u32, 8);
            for fp in &fps {
                writer.push(u32::from(short(*fp)), SHORT_BITS);
            }
            per_bucket.push(fps);
        }
        remembered.push(per_bucket);
    }
    for (expanded, hints) in built.expanded.iter_mut().zip(remembered) {
        expanded.hints = Some(hints);
    }
    built.page.hints = true;
    built.page.packed.extend_from_slice(&writer.finish());
    Ok(())
}

/// What a received step page says, checked as a whole before any state changes.
pub(crate) struct ReadStep {
    /// How many of our expanded nodes it answers.
    pub(crate) answered: usize,
    /// Children the peer settled.
    pub(crate) settled: Vec<Settled>,
    /// Buckets the client settled by our hints, checked (server).
    pub(crate) hinted: Vec<HintCheck>,
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
        hinted: Vec::new(),
        to_compare: Vec::new(),
        depth,
    };
    for parent in awaiting.iter().take(answered) {
        let range = shape.child_range(parent.node);
        let n = (range.end - range.start) as usize;
        let differ = reader.take(wire::bitmap_len(n))?;
        wire::check_bitmap(FIELD, differ, n)?;
        // A verdict for each differing child we hold.
        let coded = (0..n)
            .filter(|&i| wire::bit(differ, i) && wire::bit(&parent.present, i))
            .count();
        let mut verdicts = BitReader::new(FIELD, reader.take((2 * coded).div_ceil(8))?);
        let mut expand_now = Vec::new();
        let mut checks = Vec::new();
        let mut position = 0usize;
        for i in 0..n {
            let mine = wire::bit(&parent.present, i);
            let at = position;
            position += usize::from(mine);
            if !wire::bit(differ, i) {
                continue;
            }
            let child = NodeId::new(parent.node.level + 1, range.start + i as u64);
            // Without a verdict: we lack it, so the sender holds it, and it is settled.
            let verdict = if mine {
                Verdict::from_bits(verdicts.take(2)? as u8)
            } else {
                Verdict::Settled
            };
            let client_has = match (side, verdict) {
                (Side::Client, Verdict::SenderLacks) => true,
                (Side::Server, Verdict::SenderLacks) => false,
                (Side::Client, _) => mine,
                (Side::Server, _) => true,
            };
            match verdict {
                Verdict::Descend if child.level >= bucket_level => {
                    return Err(malformed(
                        FIELD,
                        format!("descends into {child}, which must be settled"),
                    ));
                }
                Verdict::Descend => expand_now.push(child),
                Verdict::Hinted => {
                    let hints = parent
                        .hints
                        .as_ref()
                        .and_then(|h| h.get(at))
                        .filter(|_| side == Side::Server && child.level == bucket_level)
                        .ok_or_else(|| {
                            malformed(FIELD, format!("{child} settled by hints never sent"))
                        })?;
                    checks.push((child, hints));
                }
                Verdict::Settled | Verdict::SenderLacks => read.settled.push(Settled {
                    node: child,
                    client_has,
                    depth,
                }),
            }
        }
        verdicts.finish()?;
        for child in expand_now {
            let (present, digests) = read_expansion(&mut reader, shape, child, width, FIELD)?;
            read.to_compare.push(ToCompare {
                node: child,
                present,
                digests,
                depth,
                hints: None,
            });
        }
        for (node, hinted) in checks {
            let matched = reader.take(wire::bitmap_len(hinted.len()))?;
            wire::check_bitmap(FIELD, matched, hinted.len())?;
            let mut word = [0u8; 8];
            word.copy_from_slice(reader.take(8)?);
            let mut sum = 0u64;
            let mut unmatched = Vec::new();
            for (j, fp) in hinted.iter().enumerate() {
                if wire::bit(matched, j) {
                    sum = sum.wrapping_add(*fp);
                } else {
                    unmatched.push(*fp);
                }
            }
            read.hinted.push(HintCheck {
                node,
                holds: sum == u64::from_le_bytes(word),
                unmatched,
            });
        }
    }
    if page.hints {
        read_hints(&mut reader, shape, side, &mut read.to_compare)?;
    }
    reader.finish()?;
    Ok(read)
}

/// Reads the leaf hints at the end of a server page: for every bucket each expansion holds, its
/// leaf count and their short fingerprints.
fn read_hints(
    reader: &mut wire::Reader<'_>,
    shape: &Shape,
    side: Side,
    to_compare: &mut [ToCompare],
) -> Result<(), ProtocolError> {
    const FIELD: &str = "TreeStep.hints";
    if side != Side::Client
        || to_compare.is_empty()
        || to_compare
            .iter()
            .any(|t| t.node.level + 1 != shape.bucket_level())
    {
        return Err(malformed(
            FIELD,
            "set on a page that expands no parents of buckets only, or sent by the client",
        ));
    }
    let mut bits = BitReader::new(FIELD, reader.rest());
    for item in to_compare.iter_mut() {
        let mut per_bucket = Vec::new();
        for _ in 0..count_ones(&item.present) {
            let count = bits.take(8)? as usize;
            let shorts = (0..count)
                .map(|_| bits.take(SHORT_BITS).map(|s| s as u16))
                .collect::<Result<Vec<u16>, _>>()?;
            per_bucket.push(shorts);
        }
        item.hints = Some(per_bucket);
    }
    bits.finish()
}

/// Packs fields of a few bits, least significant bit first, into bytes.
#[derive(Default)]
struct BitWriter {
    bytes: Vec<u8>,
    used: u32,
}

impl BitWriter {
    fn push(&mut self, value: u32, bits: u32) {
        for k in 0..bits {
            if self.used.is_multiple_of(8) {
                self.bytes.push(0);
            }
            if value >> k & 1 == 1
                && let Some(last) = self.bytes.last_mut()
            {
                *last |= 1 << (self.used % 8);
            }
            self.used += 1;
        }
    }

    fn finish(self) -> Vec<u8> {
        self.bytes
    }
}

/// Reads what a [`BitWriter`] packed; the padding bits of the last byte must be zero.
struct BitReader<'a> {
    field: &'static str,
    bytes: &'a [u8],
    used: usize,
}

impl<'a> BitReader<'a> {
    fn new(field: &'static str, bytes: &'a [u8]) -> Self {
        BitReader {
            field,
            bytes,
            used: 0,
        }
    }

    fn take(&mut self, bits: u32) -> Result<u32, ProtocolError> {
        let mut value = 0u32;
        for k in 0..bits {
            let Some(byte) = self.bytes.get(self.used / 8) else {
                return Err(malformed(self.field, "ends early"));
            };
            value |= u32::from(byte >> (self.used % 8) & 1) << k;
            self.used += 1;
        }
        Ok(value)
    }

    fn finish(self) -> Result<(), ProtocolError> {
        if self.used.div_ceil(8) != self.bytes.len() {
            return Err(malformed(
                self.field,
                format!(
                    "{} trailing bytes",
                    self.bytes.len() - self.used.div_ceil(8)
                ),
            ));
        }
        if let Some(last) = self.bytes.last()
            && !self.used.is_multiple_of(8)
            && last >> (self.used % 8) != 0
        {
            return Err(malformed(self.field, "padding bits set"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_fields_round_trip_and_reject_padding_and_short_input() {
        let mut writer = BitWriter::default();
        writer.push(3, 2);
        writer.push(0xabc, SHORT_BITS);
        writer.push(200, 8);
        let bytes = writer.finish();
        assert_eq!(bytes.len(), 3, "22 bits take 3 bytes");
        let mut reader = BitReader::new("f", &bytes);
        assert_eq!(reader.take(2).expect("verdict"), 3);
        assert_eq!(reader.take(SHORT_BITS).expect("short"), 0xabc);
        assert_eq!(reader.take(8).expect("count"), 200);
        reader.finish().expect("all read");
        // A set padding bit, a missing field and a trailing byte are each rejected.
        let mut padded = bytes.clone();
        if let Some(last) = padded.last_mut() {
            *last |= 0x80;
        }
        let mut reader = BitReader::new("f", &padded);
        reader.take(22).expect("fields");
        assert!(reader.finish().is_err());
        let mut reader = BitReader::new("f", &bytes[..2]);
        assert!(reader.take(22).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        let mut reader = BitReader::new("f", &longer);
        reader.take(22).expect("fields");
        assert!(reader.finish().is_err());
    }

    #[test]
    fn a_short_fingerprint_is_the_low_bits_of_the_fingerprint() {
        assert_eq!(short(0x1234_5678_9abc_def0), 0xef0);
        assert_eq!(short(0xfff), 0xfff);
        assert_eq!(short(0x1000), 0);
    }

    #[test]
    fn verdicts_decode_from_their_two_bits() {
        for verdict in [
            Verdict::Descend,
            Verdict::Settled,
            Verdict::SenderLacks,
            Verdict::Hinted,
        ] {
            assert_eq!(Verdict::from_bits(verdict as u8), verdict);
        }
    }

    use propd_merkle::{Leaf, Property, TagValue};
    use propd_store::{GroupDef, Groups, ModelStore};

    use crate::store_api::{LeafKey, RepairOutcome};

    /// 4 slots of 4 children of 4 buckets: level 1 holds the slots, level 3 the buckets.
    fn small_shape() -> Shape {
        Shape {
            slot_count: 4,
            fanout: 4,
            depth: 2,
            ..Shape::default()
        }
    }

    /// A store of `g` (one shard) holding `g/n/{i}` for `i` in `ids` at `revision`.
    fn store(shape: Shape, ids: std::ops::Range<usize>, revision: i64) -> ModelStore {
        let groups = Groups::new([GroupDef::new("g", 1, 2)]).expect("groups");
        let store = ModelStore::new(groups, shape).expect("model store");
        let properties = ids
            .map(|i| {
                let mut property = Property {
                    group: "g".into(),
                    name: "n".into(),
                    id: i.to_string(),
                    mod_revision: revision,
                    ..Property::default()
                };
                property.tags.insert("v".into(), TagValue::Int(i as i64));
                property
            })
            .collect();
        store.repair_apply_batch("g", 0, properties).expect("seed");
        store
    }

    /// A store that also reports, among a node's children, an empty child in range and a
    /// non-empty one outside the node: what the repair view's contract excludes, and what
    /// expansions and steps must ignore if a store ever reports it.
    struct Padded(ModelStore);

    impl RepairStore for Padded {
        type Error = propd_store::StoreError;

        fn shape(&self) -> Shape {
            self.0.shape()
        }

        fn has_shard(&self, group: &str, shard: u32) -> bool {
            self.0.has_shard(group, shard)
        }

        fn tree_node(
            &self,
            group: &str,
            shard: u32,
            node: NodeId,
        ) -> Result<Option<InnerNode>, Self::Error> {
            self.0.tree_node(group, shard, node)
        }

        fn tree_children(
            &self,
            group: &str,
            shard: u32,
            node: NodeId,
        ) -> Result<Vec<(NodeId, InnerNode)>, Self::Error> {
            let mut children = self.0.tree_children(group, shard, node)?;
            let shape = self.0.shape();
            let range = shape.child_range(node);
            let level = node.level + 1;
            let width = shape.width();
            if let Some(absent) = range
                .clone()
                .find(|index| !children.iter().any(|(child, _)| child.index == *index))
            {
                children.push((NodeId::new(level, absent), InnerNode::empty(width)));
            }
            let mut foreign = InnerNode::empty(width);
            foreign.leaf_count = 3;
            children.push((NodeId::new(level, range.end), foreign));
            Ok(children)
        }

        fn leaves_under(
            &self,
            group: &str,
            shard: u32,
            node: NodeId,
            after: Option<&LeafKey>,
            limit: usize,
        ) -> Result<Vec<Leaf>, Self::Error> {
            self.0.leaves_under(group, shard, node, after, limit)
        }

        fn properties_after(
            &self,
            group: &str,
            shard: u32,
            after: Option<&Entity>,
            limit: usize,
        ) -> Result<Vec<Property>, Self::Error> {
            self.0.properties_after(group, shard, after, limit)
        }

        fn get_many(
            &self,
            group: &str,
            shard: u32,
            entities: &[Entity],
        ) -> Result<Vec<Option<Property>>, Self::Error> {
            self.0.get_many(group, shard, entities)
        }

        fn repair_apply_batch(
            &self,
            group: &str,
            shard: u32,
            batch: Vec<Property>,
        ) -> Result<Vec<RepairOutcome>, Self::Error> {
            self.0.repair_apply_batch(group, shard, batch)
        }
    }

    const WIDTH: usize = 8;

    fn rules(page_items: usize) -> StepRules {
        StepRules {
            side: Side::Client,
            width: WIDTH,
            page_items,
            leaf_list_max: 0,
            hint_after: None,
        }
    }

    /// What `peer` sends for each of its slots: the expansion a step compares.
    fn slots_of<S: RepairStore>(peer: &S, shape: &Shape) -> VecDeque<ToCompare> {
        shape
            .children(NodeId::ROOT)
            .map(|slot| {
                let (present, digests, _) =
                    expand(peer, shape, "g", 0, slot, WIDTH).expect("expand");
                ToCompare {
                    node: slot,
                    present,
                    digests,
                    depth: 0,
                    hints: None,
                }
            })
            .collect()
    }

    #[test]
    fn an_expansion_holds_only_the_nodes_own_children_with_leaves() {
        let shape = small_shape();
        let sparse = store(shape, 0..1, 1);
        let plain = expand(&sparse, &shape, "g", 0, NodeId::ROOT, WIDTH).expect("expand");
        assert_eq!(plain.2, 1, "one slot holds the one property");
        assert_eq!(count_ones(&plain.0), 1);
        assert_eq!(plain.1.len(), WIDTH);
        let padded = Padded(store(shape, 0..1, 1));
        let seen = expand(&padded, &shape, "g", 0, NodeId::ROOT, WIDTH).expect("expand");
        assert_eq!(seen, plain, "the empty and the foreign child are left out");
    }

    #[test]
    fn a_step_packs_parents_while_their_worst_case_fits_the_page() {
        let shape = small_shape();
        // Every entity differs (another revision on each side), so every child of every slot
        // differs and, listing nothing at once (`leaf_list_max` 0), is expanded: a slot adds
        // its 4 children's 4 children, 16 digests, the most a slot can add.
        let ours = store(shape, 0..2000, 2);
        let theirs = store(shape, 0..2000, 1);
        let mut queue = slots_of(&theirs, &shape);
        // Two slots fill a page of 32 digests exactly; a third could not fit.
        let mut pages = Vec::new();
        while let Some(step) =
            build_step(&ours, &shape, "g", 0, &mut queue, &rules(32)).expect("step")
        {
            pages.push((step.page.parents, step.digests, step.expanded.len()));
        }
        assert_eq!(pages, [(2, 32, 8), (2, 32, 8)]);
        // With 24, a second slot might add 16 more: each page holds one slot, though the
        // second would in fact have fitted had it added 8 or fewer.
        let mut queue = slots_of(&theirs, &shape);
        let mut pages = Vec::new();
        while let Some(step) =
            build_step(&ours, &shape, "g", 0, &mut queue, &rules(24)).expect("step")
        {
            pages.push((step.page.parents, step.digests));
        }
        assert_eq!(pages, [(1, 16); 4]);
        // One slot always goes in, however small the page.
        let mut queue = slots_of(&theirs, &shape);
        let step = build_step(&ours, &shape, "g", 0, &mut queue, &rules(1))
            .expect("step")
            .expect("a page");
        assert_eq!((step.page.parents, step.digests), (1, 16));
        assert_eq!(queue.len(), 3);
    }

    #[test]
    fn a_step_ignores_empty_and_foreign_children_a_store_reports() {
        let shape = small_shape();
        let theirs = store(shape, 0..3, 1);
        let build = |ours: &dyn Fn(&mut VecDeque<ToCompare>) -> BuiltStep| {
            let mut queue = slots_of(&theirs, &shape);
            let step = ours(&mut queue);
            (step.page.packed, step.page.parents, step.settled.len())
        };
        let plain = store(shape, 0..5, 1);
        let padded = Padded(store(shape, 0..5, 1));
        let expected = build(&|queue| {
            build_step(&plain, &shape, "g", 0, queue, &rules(1024))
                .expect("step")
                .expect("a page")
        });
        let seen = build(&|queue| {
            build_step(&padded, &shape, "g", 0, queue, &rules(1024))
                .expect("step")
                .expect("a page")
        });
        assert_eq!(seen, expected);
        assert!(expected.2 > 0, "the sides differ");
    }

    /// A store of `g` holding, in each bucket `i` (of level 3, under bucket parent `2:0`),
    /// `counts[i]` properties.
    fn store_with_buckets(shape: Shape, counts: &[usize]) -> ModelStore {
        let groups = Groups::new([GroupDef::new("g", 1, 2)]).expect("groups");
        let store = ModelStore::new(groups, shape).expect("model store");
        let mut left = counts.to_vec();
        let mut properties = Vec::new();
        let mut k = 0u64;
        while left.iter().any(|&n| n > 0) {
            let id = format!("e{k}");
            k += 1;
            let entity = Entity::new("g", "n", &id).expect("entity");
            let bucket = shape.bucket_of(&entity);
            let Some(n) = left.get_mut(bucket.index as usize).filter(|n| **n > 0) else {
                continue;
            };
            *n -= 1;
            properties.push(Property {
                group: "g".into(),
                name: "n".into(),
                id,
                mod_revision: 1,
                ..Property::default()
            });
        }
        store.repair_apply_batch("g", 0, properties).expect("seed");
        store
    }

    /// Whether a page expanding bucket parent `2:0` of `store`, after `earlier` expansions, is
    /// given hints, and how many leaves each bucket's hints hold.
    fn hinted(store: &ModelStore, earlier: usize) -> Option<Vec<usize>> {
        let shape = store.shape();
        let parent = NodeId::new(2, 0);
        let (present, _, _) = expand(store, &shape, "g", 0, parent, WIDTH).expect("expand");
        let mut built = BuiltStep {
            page: pb::TreeStep::default(),
            settled: Vec::new(),
            hinted: Vec::new(),
            copies: Vec::new(),
            compared: 0,
            unmatched: 0,
            expanded: vec![Expanded {
                node: parent,
                present,
                depth: 0,
                hints: None,
            }],
            depth: 1,
            digests: 0,
            level: 2,
        };
        add_hints(store, &shape, "g", 0, earlier, &mut built).expect("hints");
        let hints = built.expanded[0].hints.clone();
        assert_eq!(built.page.hints, hints.is_some());
        hints.map(|buckets| buckets.iter().map(Vec::len).collect())
    }

    #[test]
    fn hints_go_while_the_sync_has_expanded_few_nodes() {
        let store = store_with_buckets(small_shape(), &[1, 2]);
        assert_eq!(hinted(&store, 0), Some(vec![1, 2]));
        assert_eq!(hinted(&store, HINT_MAX_EXPANSIONS - 1), Some(vec![1, 2]));
        assert_eq!(hinted(&store, HINT_MAX_EXPANSIONS), None);
    }

    #[test]
    fn hints_go_for_buckets_of_at_most_255_leaves() {
        let store = store_with_buckets(small_shape(), &[HINT_MAX_LEAVES]);
        assert_eq!(hinted(&store, 0), Some(vec![HINT_MAX_LEAVES]));
        let store = store_with_buckets(small_shape(), &[HINT_MAX_LEAVES + 1]);
        assert_eq!(hinted(&store, 0), None);
    }

    #[test]
    fn hints_go_while_they_fit_their_byte_budget() {
        // Two buckets: 2 counts of 8 bits and 340 short fingerprints of 12 bits are 4 096
        // bits, exactly HINT_MAX_BYTES.
        assert_eq!(HINT_MAX_BYTES * 8, 16 + 340 * SHORT_BITS as usize);
        let store = store_with_buckets(small_shape(), &[170, 170]);
        assert_eq!(hinted(&store, 0), Some(vec![170, 170]));
        let store = store_with_buckets(small_shape(), &[170, 171]);
        assert_eq!(hinted(&store, 0), None);
    }

    /// A page answering our expansion of `parent` (whose child 0 we hold): child 0 differs with
    /// `verdict`, then, for a descent, the peer's expansion of that child holding its child 0,
    /// then `hints` (bits of one bucket's count and short fingerprints) when given.
    fn answer(verdict: Verdict, hints: Option<&[(u32, u32)]>) -> pb::TreeStep {
        let mut packed = vec![0b0001];
        let mut verdicts = BitWriter::default();
        verdicts.push(verdict as u32, 2);
        packed.extend(verdicts.finish());
        if verdict == Verdict::Descend {
            packed.push(0b0001);
            packed.extend([7u8; WIDTH]);
        }
        if let Some(fields) = hints {
            let mut bits = BitWriter::default();
            for &(value, width) in fields {
                bits.push(value, width);
            }
            packed.extend(bits.finish());
        }
        pb::TreeStep {
            parents: 1,
            packed,
            hints: hints.is_some(),
        }
    }

    fn awaiting(parent: NodeId, hints: Option<Vec<Vec<u64>>>) -> VecDeque<Expanded> {
        VecDeque::from([Expanded {
            node: parent,
            present: vec![0b0001],
            depth: 0,
            hints,
        }])
    }

    fn refusal(read: Result<ReadStep, ProtocolError>) -> String {
        match read {
            Ok(_) => panic!("the page was accepted"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn a_step_may_not_descend_into_a_bucket() {
        let shape = small_shape();
        // Our expansion of bucket parent 2:0: its children are buckets.
        let page = answer(Verdict::Descend, None);
        let read = read_step(
            &page,
            &awaiting(NodeId::new(2, 0), None),
            &shape,
            WIDTH,
            Side::Client,
        );
        let refused = refusal(read);
        assert!(refused.contains("must be settled"), "{refused}");
        // One level up, the same page descends into a bucket parent: accepted.
        let read = read_step(
            &page,
            &awaiting(NodeId::new(1, 0), None),
            &shape,
            WIDTH,
            Side::Client,
        )
        .expect("a descent into a bucket parent");
        assert_eq!(read.to_compare.len(), 1);
        assert_eq!(read.to_compare[0].node, NodeId::new(2, 0));
    }

    #[test]
    fn a_step_with_bytes_past_its_fields_is_refused() {
        let shape = small_shape();
        let slot = awaiting(NodeId::new(1, 0), None);
        let mut page = answer(Verdict::Settled, None);
        read_step(&page, &slot, &shape, WIDTH, Side::Client).expect("the page as built");
        page.packed.push(0);
        let refused = refusal(read_step(&page, &slot, &shape, WIDTH, Side::Client));
        assert!(refused.contains("1 trailing bytes"), "{refused}");
    }

    #[test]
    fn a_step_answers_at_least_one_and_at_most_the_awaited_expansions() {
        let shape = small_shape();
        let slot = awaiting(NodeId::new(1, 0), None);
        for parents in [0, 2] {
            let mut page = answer(Verdict::Settled, None);
            page.parents = parents;
            let refused = refusal(read_step(&page, &slot, &shape, WIDTH, Side::Client));
            assert!(refused.contains("TreeStep.parents"), "{parents}: {refused}");
        }
    }

    #[test]
    fn only_the_server_takes_a_hinted_verdict_and_only_on_buckets_it_hinted() {
        let shape = small_shape();
        let bucket_parent = NodeId::new(2, 0);
        let page = answer(Verdict::Hinted, None);
        let with_hints = || Some(vec![vec![42u64]]);
        // The client never hints, so a hinted verdict sent to it is refused, whatever it
        // remembers of its expansion.
        let read = read_step(
            &page,
            &awaiting(bucket_parent, with_hints()),
            &shape,
            WIDTH,
            Side::Client,
        );
        assert!(refusal(read).contains("hints never sent"));
        // The server refuses one on a bucket it did not hint.
        let read = read_step(
            &page,
            &awaiting(bucket_parent, None),
            &shape,
            WIDTH,
            Side::Server,
        );
        assert!(refusal(read).contains("hints never sent"));
    }

    #[test]
    fn leaf_hints_are_read_by_the_client_on_expansions_of_bucket_parents_only() {
        let shape = small_shape();
        let hints = [(1, 8), (0xabc, SHORT_BITS)];
        // The server's answer descends from slot 1:0 into bucket parent 2:0 and hints its one
        // present bucket.
        let page = answer(Verdict::Descend, Some(&hints));
        let slot = awaiting(NodeId::new(1, 0), None);
        let read = read_step(&page, &slot, &shape, WIDTH, Side::Client).expect("hints on buckets");
        assert_eq!(read.to_compare[0].hints, Some(vec![vec![0xabc]]));
        // Sent by the client (the server reads them): refused.
        let refused = refusal(read_step(&page, &slot, &shape, WIDTH, Side::Server));
        assert!(refused.contains("sent by the client"), "{refused}");
        // Hints on an expansion of a slot, whose children are no buckets: refused.
        let root = awaiting(NodeId::ROOT, None);
        let refused = refusal(read_step(&page, &root, &shape, WIDTH, Side::Client));
        assert!(refused.contains("parents of buckets only"), "{refused}");
        // Hints on a page that expands nothing: refused.
        let page = answer(Verdict::Settled, Some(&[]));
        let refused = refusal(read_step(&page, &slot, &shape, WIDTH, Side::Client));
        assert!(refused.contains("parents of buckets only"), "{refused}");
    }
}
