//! The receiving side of the bulk path (protocol versions 2 and 3) fed a hostile `BulkSync`
//! stream: a real server streams a shard (or the subtrees the client lacks) to a real client,
//! and the input rewrites every `BulkSync` page on its way — properties out of key order, pages
//! swapped, joined or split, repeated and stale copies, a key under a node the client never
//! listed, a page over `MAX_PAGE_ITEMS`, forged properties of any fields, flipped or cut
//! encodings and arbitrary bytes decoded as a server message.
//!
//! What must hold:
//! - no panic; a message the client rejects is a typed `SyncError` after which the client is
//!   failed, and the rejected message changed nothing in its store;
//! - a key under a node the client never listed is rejected (`PropertyError::Unlisted`), and a
//!   page over `MAX_PAGE_ITEMS` too (`ProtocolError::PageTooLarge`);
//! - the order of pages and of properties, repeats and stale copies do not matter: a stream
//!   changed only that way ends the sync with equal copies;
//! - whatever the stream, no copy of the client goes back to an older version, and every copy
//!   it ends with is one it had or one it was sent.

use std::collections::{BTreeMap, VecDeque};

use arbitrary::Arbitrary;
use propd_merkle::{Entity, NodeId, Property, Shape, TagValue, version_order};
use propd_proto::v1 as pb;
use propd_repair::{
    Client, MAX_PAGE_ITEMS, PropertyError, ProtocolError, Server, SyncError, property_from_proto,
    property_to_proto,
};
use propd_store::{ModelStore, RepairStore};
use prost::Message;

use crate::{GROUP, MAX_ROUNDS, Setup, WireProperty, assert_failed_client, root};

/// What happens to the next `BulkSync` page bound for the client.
#[derive(Arbitrary, Debug)]
pub enum BulkStep {
    /// Delivered as sent.
    Deliver,
    /// Its properties in reverse order.
    Reverse,
    /// Its properties rotated by `n` (out of key order, none lost).
    Rotate(u8),
    /// Held back and delivered after the next `BulkSync` page (or before the next message of
    /// another kind).
    Hold,
    /// Joined with the next `BulkSync` page into one.
    Join,
    /// Cut in two pages at `at`.
    Split(u8),
    /// One of its properties sent twice in the page.
    Repeat(u8),
    /// An older copy of one of its properties added before or after it.
    Stale { at: u8, after: bool },
    /// A key under a level-1 node whose digests were equal on both sides (so never listed)
    /// added at `at`: the page must be rejected.
    Outside { id: u8, at: u8 },
    /// Padded past `MAX_PAGE_ITEMS` properties: the page must be rejected.
    Oversize(u8),
    /// Replaced by a page of any properties.
    Forge(Vec<WireProperty>),
    /// Lost.
    Drop,
    /// Its encoding with bits flipped at one byte, delivered if it still decodes.
    Flip { at: u16, bits: u8 },
    /// Its encoding cut at `at` bytes, delivered if it still decodes.
    Truncate { at: u16 },
    /// Arbitrary bytes decoded as a server message, delivered (if they decode) before it.
    Bytes(Vec<u8>),
}

/// The input of one bulk fuzz run.
#[derive(Arbitrary, Debug)]
pub struct BulkInput {
    pub setup: Setup,
    /// Start the client empty (the server then streams the whole shard, `whole_shard`);
    /// otherwise only the subtrees the client lacks come by `BulkSync`.
    pub empty_client: bool,
    /// Protocol version 3 (the alternating descent) instead of 2; both stream by `BulkSync`.
    pub version3: bool,
    pub steps: Vec<BulkStep>,
}

/// What the client must do with a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Anything,
    Unlisted,
    TooLarge,
}

/// A page waiting for the next one.
enum Pending {
    Hold(pb::PropertySync),
    Join(pb::PropertySync),
}

struct Receiver<'a> {
    client: Client,
    store: &'a ModelStore,
    shape: Shape,
    /// Every well-formed property handed to the client, by entity.
    sent: BTreeMap<Entity, Vec<Property>>,
    failed: bool,
    /// Whether anything but reordering, repeats and stale copies happened to the stream.
    tampered: bool,
}

impl Receiver<'_> {
    fn deliver(&mut self, msg: pb::RepairResponse, expect: Expect) {
        if self.failed {
            return;
        }
        // A page over the limit must be rejected whole: none of it can end in the store (and
        // recording its 65 537 copies would cost more than the rest of the run).
        if let Some(
            pb::repair_response::Msg::BulkSync(page) | pb::repair_response::Msg::PropertySync(page),
        ) = &msg.msg
            && page.properties.len() <= MAX_PAGE_ITEMS
        {
            for property in &page.properties {
                if let Ok((entity, property)) = property_from_proto(property.clone()) {
                    self.sent.entry(entity).or_default().push(property);
                }
            }
        }
        let before = root(self.store);
        let result = self.client.handle(self.store, msg);
        match (&result, expect) {
            (Ok(()), Expect::Anything) => {}
            (Ok(()), expect) => panic!("the client accepted a page it must reject ({expect:?})"),
            (Err(error), expect) => {
                assert_failed_client(&mut self.client, self.store, error);
                assert_eq!(
                    root(self.store),
                    before,
                    "a rejected message ({error}) changed the client's store"
                );
                match expect {
                    Expect::Anything => {}
                    Expect::Unlisted => assert!(
                        matches!(
                            error,
                            SyncError::Protocol(ProtocolError::Property {
                                reason: PropertyError::Unlisted,
                                ..
                            })
                        ),
                        "a key outside the listed nodes was rejected for another reason: {error}"
                    ),
                    Expect::TooLarge => assert!(
                        matches!(
                            error,
                            SyncError::Protocol(ProtocolError::PageTooLarge { .. })
                        ),
                        "an oversize page was rejected for another reason: {error}"
                    ),
                }
                self.failed = true;
            }
        }
    }

    fn deliver_page(&mut self, page: pb::PropertySync, expect: Expect) {
        self.deliver(bulk(page), expect);
    }
}

fn bulk(page: pb::PropertySync) -> pb::RepairResponse {
    pb::RepairResponse {
        msg: Some(pb::repair_response::Msg::BulkSync(page)),
    }
}

/// An older copy of `property` (one revision less), if it has one that is valid.
fn stale(property: &pb::Property) -> Option<pb::Property> {
    let (_, mut older) = property_from_proto(property.clone()).ok()?;
    if older.mod_revision <= 1 {
        return None;
    }
    older.mod_revision -= 1;
    if older.is_tombstone() {
        older.delete_time -= 1;
    } else {
        older.tags.insert("v".into(), TagValue::Str("stale".into()));
    }
    Some(property_to_proto(&older))
}

/// Entities of the group under a level-1 node whose digests are equal in both stores (absent on
/// both sides included). Such a node is never marked differing, hence never listed, unless the
/// whole shard is streamed.
fn outside(shape: &Shape, client: &ModelStore, server: &ModelStore) -> Vec<Entity> {
    let level1 = |store: &ModelStore, node: NodeId| {
        store
            .tree_node(GROUP, 0, node)
            .expect("reading a tree node")
            .map(|n| n.digest)
    };
    (0..256u16)
        .filter_map(|k| Entity::new(GROUP, "n", &format!("o{k}")).ok())
        .filter(|entity| {
            let node = shape.ancestor(shape.bucket_of(entity), 1);
            level1(client, node) == level1(server, node)
        })
        .collect()
}

fn entity_property(entity: &Entity) -> pb::Property {
    let mut property = Property {
        group: GROUP.into(),
        name: entity.name().into(),
        id: entity.id().into(),
        mod_revision: 99,
        ..Property::default()
    };
    property
        .tags
        .insert("v".into(), TagValue::Str("outside".into()));
    property_to_proto(&property)
}

/// Every copy in the client's store, by entity.
fn contents(store: &ModelStore) -> BTreeMap<Entity, Property> {
    let mut out = BTreeMap::new();
    let mut after: Option<Entity> = None;
    loop {
        let found = store
            .properties_after(GROUP, 0, after.as_ref(), 64)
            .expect("reading the store");
        for property in &found {
            let entity = property.entity().expect("a stored entity");
            after = Some(entity.clone());
            out.insert(entity, property.clone());
        }
        if found.len() < 64 {
            return out;
        }
    }
}

/// Runs one sync with the `BulkSync` pages bound for the client rewritten by `steps`.
pub fn run_bulk(input: BulkInput) {
    let setup = input.setup;
    let mut config = setup.config();
    config.preview = false;
    config.protocol_version = if input.version3 { 3 } else { 2 };
    let shape = setup.shape();
    let client_store = setup.store(if input.empty_client {
        &[]
    } else {
        &setup.client
    });
    let server_store = setup.store(&setup.server);
    let initial = contents(&client_store);
    let client = Client::new(&client_store, GROUP, 0, config.clone()).expect("a valid sync");
    let mut server = Server::new(config).expect("a valid config");
    let mut receiver = Receiver {
        client,
        store: &client_store,
        shape,
        sent: BTreeMap::new(),
        failed: false,
        tampered: false,
    };
    let mut to_server: VecDeque<pb::RepairRequest> = VecDeque::new();
    let mut to_client: VecDeque<pb::RepairResponse> = VecDeque::new();
    let mut steps = input.steps.into_iter();
    let mut pending: Option<Pending> = None;
    let mut context = Context {
        // What the server decides on: the leaf count the client announces.
        empty_client: client_store
            .tree_node(GROUP, 0, NodeId::ROOT)
            .expect("reading the root")
            .is_none_or(|node| node.leaf_count == 0),
        outside: Vec::new(),
        forged_control: false,
    };
    if steps
        .as_slice()
        .iter()
        .any(|step| matches!(step, BulkStep::Outside { .. }))
    {
        context.outside = outside(&shape, &client_store, &server_store);
    }

    for _ in 0..MAX_ROUNDS {
        let mut progress = false;
        if let Ok(Some(msg)) = receiver.client.poll_transmit(&client_store) {
            to_server.push_back(msg);
            progress = true;
        }
        let server_out = server.poll_transmit(&server_store);
        let server_idle = !matches!(server_out, Ok(Some(_)));
        if let Ok(Some(msg)) = server_out {
            to_client.push_back(msg);
            progress = true;
        }

        if let Some(msg) = to_client.pop_front() {
            progress = true;
            match msg.msg {
                Some(pb::repair_response::Msg::BulkSync(page)) => {
                    let step = steps.next().unwrap_or(BulkStep::Deliver);
                    rewrite(&mut receiver, &mut pending, page, step, &mut context);
                }
                other => {
                    flush(&mut receiver, &mut pending);
                    receiver.deliver(pb::RepairResponse { msg: other }, Expect::Anything);
                }
            }
        } else if pending.is_some() {
            flush(&mut receiver, &mut pending);
            progress = true;
        }

        if server_idle && let Some(msg) = to_server.pop_front() {
            let _ = server.handle(&server_store, msg);
            progress = true;
        }

        let finished = receiver.client.is_done()
            && server.is_done()
            && to_client.is_empty()
            && to_server.is_empty()
            && pending.is_none();
        if finished || !progress {
            break;
        }
    }

    // Whatever the stream: no copy went back, none was invented.
    let last = contents(&client_store);
    for (entity, before) in &initial {
        let now = last
            .get(entity)
            .unwrap_or_else(|| panic!("{entity} vanished from the client"));
        assert_ne!(
            version_order(now, before, &receiver.shape),
            std::cmp::Ordering::Less,
            "{entity} went back from {before:?} to {now:?}"
        );
    }
    for (entity, now) in &last {
        let known = initial.get(entity) == Some(now)
            || receiver
                .sent
                .get(entity)
                .is_some_and(|sent| sent.contains(now));
        assert!(
            known,
            "{entity} holds {now:?}, which it neither had nor was sent"
        );
    }

    if receiver.tampered {
        return;
    }
    // Reordered pages and properties, repeats and stale copies: the sync still converges.
    assert!(
        receiver.client.is_done() && server.is_done(),
        "a reordered bulk stream did not finish: client failed {}, server failed {}",
        receiver.client.is_failed(),
        server.is_failed()
    );
    assert_eq!(
        root(&client_store),
        root(&server_store),
        "a reordered bulk stream left the copies different"
    );
}

/// Delivers a held or half-joined page as it stands.
fn flush(receiver: &mut Receiver<'_>, pending: &mut Option<Pending>) {
    match pending.take() {
        Some(Pending::Hold(page) | Pending::Join(page)) => {
            receiver.deliver_page(page, Expect::Anything);
        }
        None => {}
    }
}

/// What the run knows beyond the receiver.
struct Context {
    /// The client's tree was empty: the server streams the whole shard, the root is listed.
    empty_client: bool,
    /// Entities under level-1 nodes equal on both sides when the sync started.
    outside: Vec<Entity>,
    /// A message decoded from damaged or arbitrary bytes was delivered: it may have listed
    /// nodes the real server did not.
    forged_control: bool,
}

fn rewrite(
    receiver: &mut Receiver<'_>,
    pending: &mut Option<Pending>,
    mut page: pb::PropertySync,
    step: BulkStep,
    context: &mut Context,
) {
    let len = page.properties.len();
    let pick = |n: u8| usize::from(n) % len.max(1);
    let mut expect = Expect::Anything;
    let mut pages = Vec::new();
    match step {
        BulkStep::Deliver => {}
        BulkStep::Reverse => page.properties.reverse(),
        BulkStep::Rotate(n) => page.properties.rotate_left(pick(n)),
        BulkStep::Hold => {
            flush(receiver, pending);
            *pending = Some(Pending::Hold(page));
            return;
        }
        BulkStep::Join => {
            *pending = match pending.take() {
                Some(Pending::Join(mut first)) => {
                    first.properties.append(&mut page.properties);
                    Some(Pending::Join(first))
                }
                held => {
                    *pending = held;
                    flush(receiver, pending);
                    Some(Pending::Join(page))
                }
            };
            return;
        }
        BulkStep::Split(at) => {
            let rest = page.properties.split_off(pick(at));
            pages.push(pb::PropertySync { properties: rest });
        }
        BulkStep::Repeat(at) => {
            if let Some(property) = page.properties.get(pick(at)).cloned() {
                page.properties.insert(pick(at), property);
            }
        }
        BulkStep::Stale { at, after } => {
            if let Some(older) = page.properties.get(pick(at)).and_then(stale) {
                page.properties.insert(pick(at) + usize::from(after), older);
            }
        }
        BulkStep::Outside { id, at } => {
            receiver.tampered = true;
            // With a whole-shard stream the root is listed: every key of the shard is in range.
            if !context.empty_client && !context.outside.is_empty() {
                let entity = &context.outside[usize::from(id) % context.outside.len()];
                page.properties
                    .insert(pick(at).min(len), entity_property(entity));
                if !context.forged_control {
                    expect = Expect::Unlisted;
                }
            }
        }
        BulkStep::Oversize(extra) => {
            receiver.tampered = true;
            let filler = page.properties.first().cloned().unwrap_or_else(|| {
                entity_property(&Entity::new(GROUP, "n", "e0").expect("an entity"))
            });
            page.properties
                .resize(MAX_PAGE_ITEMS + 1 + usize::from(extra % 4), filler);
            expect = Expect::TooLarge;
        }
        BulkStep::Forge(properties) => {
            receiver.tampered = true;
            page = pb::PropertySync {
                properties: properties
                    .into_iter()
                    .take(64)
                    .map(WireProperty::make)
                    .collect(),
            };
        }
        BulkStep::Drop => {
            receiver.tampered = true;
            return;
        }
        BulkStep::Flip { at, bits } => {
            let mut bytes = bulk(page).encode_to_vec();
            let at = usize::from(at) % bytes.len();
            bytes[at] ^= bits.max(1);
            deliver_bytes(receiver, pending, context, &bytes);
            return;
        }
        BulkStep::Truncate { at } => {
            let bytes = bulk(page).encode_to_vec();
            let at = usize::from(at) % (bytes.len() + 1);
            deliver_bytes(receiver, pending, context, &bytes[..at]);
            return;
        }
        BulkStep::Bytes(bytes) => deliver_bytes(receiver, pending, context, &bytes),
    }
    pages.insert(0, page);
    match pending.take() {
        Some(Pending::Join(first)) if expect == Expect::Anything => {
            let mut first = first;
            first.properties.append(&mut pages[0].properties);
            pages[0] = first;
        }
        Some(Pending::Join(first)) => receiver.deliver_page(first, Expect::Anything),
        Some(Pending::Hold(held)) => pages.push(held),
        None => {}
    }
    // Only the rewritten page carries the expectation; a held page comes after it.
    for (i, page) in pages.into_iter().enumerate() {
        receiver.deliver_page(page, if i == 0 { expect } else { Expect::Anything });
    }
}

/// Delivers what `bytes` decode to as a server message (nothing if they do not decode).
fn deliver_bytes(
    receiver: &mut Receiver<'_>,
    pending: &mut Option<Pending>,
    context: &mut Context,
    bytes: &[u8],
) {
    receiver.tampered = true;
    if let Ok(msg) = pb::RepairResponse::decode(bytes) {
        flush(receiver, pending);
        context.forged_control = true;
        receiver.deliver(msg, Expect::Anything);
    }
}
