//! Shared parts of the repair fuzz targets: two in-memory stores seeded from the fuzz input, a
//! real client and a real server talking to each other, and a tamperer that drops, repeats,
//! corrupts or replaces the messages going to the side under test.
//!
//! The invariants checked: neither state machine panics; a message the side under test rejects
//! is a typed `SyncError` after which that side is failed and ignores everything else; and a
//! conversation nobody tampered with finishes with both copies equal (or, in preview, both
//! unchanged).

use std::collections::VecDeque;

use arbitrary::Arbitrary;
use propd_merkle::{NodeId, Property, Shape, TagValue};
use propd_proto::v1 as pb;
use propd_repair::{Client, Config, Server, SyncError};
use propd_store::{GroupDef, Groups, ModelStore, RepairStore};
use prost::Message;

pub mod bulk;

/// The group every seeded property belongs to; it has one shard, 0.
pub const GROUP: &str = "g";

/// Rounds of the conversation after which a run stops (every round moves at least one message
/// or ends the run, so this bounds the work of one input).
const MAX_ROUNDS: usize = 4096;

/// One copy seeded into a store: entity `g/n/e{id % 48}`.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct Seed {
    id: u8,
    revision: u8,
    value: u8,
    deleted: bool,
}

impl Seed {
    fn property(self) -> Property {
        let revision = 1 + i64::from(self.revision % 16);
        let mut property = Property {
            group: GROUP.into(),
            name: "n".into(),
            id: format!("e{}", self.id % 48),
            mod_revision: revision,
            ..Property::default()
        };
        if self.deleted {
            property.delete_time = 1000 + revision;
        } else {
            property
                .tags
                .insert("v".into(), TagValue::Str(format!("{}", self.value % 4)));
        }
        property
    }
}

/// The stores and the sync's knobs.
#[derive(Arbitrary, Debug)]
pub struct Setup {
    /// 0: the default shape; 1: 4 slots, fanout 2, depth 2 (many levels for few leaves); 2: 4
    /// slots, fanout 2, depth 1 (the slots are the buckets' parents, so the server's first
    /// step of version 3 hints the buckets' leaves).
    shape: u8,
    /// The protocol version both sides speak: 1 + version % 3.
    version: u8,
    client: Vec<Seed>,
    server: Vec<Seed>,
    /// Wire digest width 16 instead of 8.
    wide_wire: bool,
    page_items: u8,
    extra_backlog: u8,
    apply_batch: u8,
    leaf_list_max: u8,
    preview: bool,
}

impl Setup {
    fn shape(&self) -> Shape {
        match self.shape % 3 {
            1 => Shape {
                slot_count: 4,
                fanout: 2,
                depth: 2,
                ..Shape::default()
            },
            2 => Shape {
                slot_count: 4,
                fanout: 2,
                depth: 1,
                ..Shape::default()
            },
            _ => Shape::default(),
        }
    }

    fn config(&self) -> Config {
        let page_items = 1 + usize::from(self.page_items % 8);
        Config {
            wire_digest_width: if self.wide_wire { 16 } else { 8 },
            page_items,
            page_bytes: 4096,
            apply_batch: 1 + usize::from(self.apply_batch % 8),
            leaf_list_max: u64::from(self.leaf_list_max % 20),
            preview: self.preview,
            max_backlog: page_items + usize::from(self.extra_backlog % 16),
            // Every wire version: version 1 descends and lists, version 2 streams one-sided
            // subtrees, version 3 descends in alternating steps with leaf hints.
            protocol_version: 1 + u32::from(self.version % 3),
            min_protocol_version: 1,
        }
    }

    fn store(&self, seeds: &[Seed]) -> ModelStore {
        let store = ModelStore::new(
            Groups::new([GroupDef::new(GROUP, 1, 1)]).expect("a valid group"),
            self.shape(),
        )
        .expect("a valid group and shape");
        let batch: Vec<Property> = seeds.iter().take(64).map(|s| s.property()).collect();
        // Seeds are valid copies: the store accepts every one (the greater version wins).
        store
            .repair_apply_batch(GROUP, 0, batch)
            .expect("seeding the store");
        store
    }
}

/// A string field: the one the conversation expects, empty, or anything.
#[derive(Arbitrary, Debug)]
pub enum Text {
    Expected,
    Empty,
    Other(String),
}

impl Text {
    fn make(self, expected: &str) -> String {
        match self {
            Text::Expected => expected.to_owned(),
            Text::Empty => String::new(),
            Text::Other(text) => text,
        }
    }
}

/// A tree shape on the wire.
#[derive(Arbitrary, Debug)]
pub enum WireShape {
    Absent,
    Small,
    Default,
    Fields {
        algorithm: i32,
        slot_count: u32,
        fanout: u32,
        depth: u32,
        digest_width: u32,
        format_version: u32,
    },
}

impl WireShape {
    fn make(self) -> Option<pb::TreeShape> {
        let of = |shape: Shape| propd_repair::shape_to_proto(&shape);
        match self {
            WireShape::Absent => None,
            WireShape::Small => Some(of(Shape {
                slot_count: 4,
                fanout: 2,
                depth: 2,
                ..Shape::default()
            })),
            WireShape::Default => Some(of(Shape::default())),
            WireShape::Fields {
                algorithm,
                slot_count,
                fanout,
                depth,
                digest_width,
                format_version,
            } => Some(pb::TreeShape {
                algorithm,
                slot_count,
                fanout,
                depth,
                digest_width,
                format_version,
            }),
        }
    }
}

/// A tag value on the wire (possibly unset).
#[derive(Arbitrary, Debug)]
pub enum WireTagValue {
    Unset,
    Str(String),
    Int(i64),
    Binary(Vec<u8>),
}

/// A property on the wire: a seeded copy, or any fields.
#[derive(Arbitrary, Debug)]
pub enum WireProperty {
    Seeded(Seed),
    Fields {
        group: Text,
        name: Text,
        id: Text,
        tags: Vec<(String, Option<WireTagValue>)>,
        mod_revision: i64,
        delete_time: i64,
    },
}

impl WireProperty {
    fn make(self) -> pb::Property {
        match self {
            WireProperty::Seeded(seed) => propd_repair::property_to_proto(&seed.property()),
            WireProperty::Fields {
                group,
                name,
                id,
                tags,
                mod_revision,
                delete_time,
            } => pb::Property {
                group: group.make(GROUP),
                name: name.make("n"),
                id: id.make("e0"),
                tags: tags
                    .into_iter()
                    .map(|(key, value)| pb::Tag {
                        key,
                        value: value.map(|value| pb::TagValue {
                            value: match value {
                                WireTagValue::Unset => None,
                                WireTagValue::Str(s) => Some(pb::tag_value::Value::Str(s)),
                                WireTagValue::Int(i) => Some(pb::tag_value::Value::Int(i)),
                                WireTagValue::Binary(b) => Some(pb::tag_value::Value::Binary(b)),
                            },
                        }),
                    })
                    .collect(),
                mod_revision,
                delete_time,
            },
        }
    }
}

fn page(properties: Vec<WireProperty>) -> pb::PropertySync {
    pb::PropertySync {
        properties: properties.into_iter().map(WireProperty::make).collect(),
    }
}

/// A client message of any kind with any fields.
#[derive(Arbitrary, Debug)]
pub enum Request {
    Empty,
    TreeRoot {
        group: Text,
        shard: u32,
        shape: WireShape,
        root: Vec<u8>,
        leaf_count: u64,
        preview: bool,
        wire_digest_width: u32,
        protocol_version: u8,
        slots: Vec<u8>,
    },
    LevelDigests {
        level: u32,
        last_page: bool,
        parents: u32,
        packed: Vec<u8>,
    },
    PropertyMissing(Vec<(u32, u64, Vec<u8>)>),
    PropertySync(Vec<WireProperty>),
    NoMorePropertySync,
    TreeStep(WireStep),
}

/// A version-3 descent step of any content: answered parents, packed verdicts, expansions and
/// hint checks, and the hints flag.
#[derive(Arbitrary, Debug)]
pub struct WireStep {
    parents: u8,
    packed: Vec<u8>,
    hints: bool,
}

impl WireStep {
    fn make(self) -> pb::TreeStep {
        pb::TreeStep {
            parents: u32::from(self.parents),
            packed: self.packed,
            hints: self.hints,
        }
    }
}

impl Request {
    fn make(self) -> pb::RepairRequest {
        use pb::repair_request::Msg;
        let msg = match self {
            Request::Empty => None,
            Request::TreeRoot {
                group,
                shard,
                shape,
                root,
                leaf_count,
                preview,
                wire_digest_width,
                protocol_version,
                slots,
            } => Some(Msg::TreeRoot(pb::TreeRoot {
                group: group.make(GROUP),
                shard,
                shape: shape.make(),
                root,
                leaf_count,
                preview,
                wire_digest_width,
                protocol_version: u32::from(protocol_version % 5),
                slots,
            })),
            Request::LevelDigests {
                level,
                last_page,
                parents,
                packed,
            } => Some(Msg::LevelDigests(pb::LevelDigests {
                level,
                last_page,
                parents,
                packed,
            })),
            Request::PropertyMissing(nodes) => Some(Msg::PropertyMissing(pb::PropertyMissing {
                nodes: nodes
                    .into_iter()
                    .map(|(level, index, fingerprints)| pb::MissingLeaves {
                        level,
                        index,
                        fingerprints,
                        after: Vec::new(),
                        until: Vec::new(),
                    })
                    .collect(),
            })),
            Request::PropertySync(properties) => Some(Msg::PropertySync(page(properties))),
            Request::NoMorePropertySync => Some(Msg::NoMorePropertySync(pb::NoMorePropertySync {})),
            Request::TreeStep(step) => Some(Msg::TreeStep(step.make())),
        };
        pb::RepairRequest { msg }
    }
}

/// A server message of any kind with any fields.
#[derive(Arbitrary, Debug)]
pub enum Response {
    Empty,
    RootCompare {
        tree_found: bool,
        shape_ok: bool,
        root_match: bool,
        server_shape: WireShape,
        error: String,
        leaf_count: u64,
        protocol_version: u8,
        whole_shard: bool,
    },
    LevelDiff {
        level: u32,
        last_page: bool,
        packed: Vec<u8>,
    },
    DifferTreeSummary(Vec<(u32, u64, bool, Vec<u8>, bool)>),
    PropertySync(Vec<WireProperty>),
    SyncEnd {
        applied: u64,
        failed: u64,
    },
    TreeStep(WireStep),
    BulkSync(Vec<WireProperty>),
}

impl Response {
    fn make(self) -> pb::RepairResponse {
        use pb::repair_response::Msg;
        let msg = match self {
            Response::Empty => None,
            Response::RootCompare {
                tree_found,
                shape_ok,
                root_match,
                server_shape,
                error,
                leaf_count,
                protocol_version,
                whole_shard,
            } => Some(Msg::RootCompare(pb::RootCompare {
                tree_found,
                shape_ok,
                root_match,
                server_shape: server_shape.make(),
                error,
                leaf_count,
                protocol_version: u32::from(protocol_version % 5),
                whole_shard,
            })),
            Response::LevelDiff {
                level,
                last_page,
                packed,
            } => Some(Msg::LevelDiff(pb::LevelDiff {
                level,
                last_page,
                packed,
            })),
            Response::DifferTreeSummary(nodes) => {
                Some(Msg::DifferTreeSummary(pb::DifferTreeSummary {
                    nodes: nodes
                        .into_iter()
                        .map(
                            |(level, index, exists, fingerprints, more)| pb::NodeLeaves {
                                level,
                                index,
                                exists,
                                fingerprints,
                                more,
                                until: Vec::new(),
                            },
                        )
                        .collect(),
                }))
            }
            Response::PropertySync(properties) => Some(Msg::PropertySync(page(properties))),
            Response::SyncEnd { applied, failed } => {
                Some(Msg::SyncEnd(pb::SyncEnd { applied, failed }))
            }
            Response::TreeStep(step) => Some(Msg::TreeStep(step.make())),
            Response::BulkSync(properties) => Some(Msg::BulkSync(page(properties))),
        };
        pb::RepairResponse { msg }
    }
}

/// What happens to the next message bound for the side under test.
#[derive(Arbitrary, Debug)]
pub enum Step<M> {
    /// Delivered as sent.
    Deliver,
    /// Lost.
    Drop,
    /// Delivered twice.
    Repeat,
    /// Its encoding with bits flipped at one byte, delivered if it still decodes.
    Flip { at: u16, bits: u8 },
    /// Its encoding cut at `at` bytes, delivered if it still decodes.
    Truncate { at: u16 },
    /// A forged message delivered before it.
    Inject(M),
}

/// The input of one repair fuzz run.
#[derive(Arbitrary, Debug)]
pub struct Input<M> {
    pub setup: Setup,
    pub steps: Vec<Step<M>>,
}

/// The side under test: what it receives, how it handles a message and how it sends.
trait Side {
    type In: Message + Default + Clone;
    type Forged;
    fn forge(forged: Self::Forged) -> Self::In;
}

struct ServerSide;
impl Side for ServerSide {
    type In = pb::RepairRequest;
    type Forged = Request;
    fn forge(forged: Request) -> pb::RepairRequest {
        forged.make()
    }
}

struct ClientSide;
impl Side for ClientSide {
    type In = pb::RepairResponse;
    type Forged = Response;
    fn forge(forged: Response) -> pb::RepairResponse {
        forged.make()
    }
}

/// Applies one step to the queue of messages bound for the side under test: the messages to
/// hand it now, in order, and whether anything was tampered with.
fn tamper<S: Side>(step: Step<S::Forged>, queue: &mut VecDeque<S::In>) -> (Vec<S::In>, bool) {
    match step {
        Step::Deliver => (queue.pop_front().into_iter().collect(), false),
        Step::Drop => (Vec::new(), queue.pop_front().is_some()),
        Step::Repeat => match queue.pop_front() {
            Some(msg) => (vec![msg.clone(), msg], true),
            None => (Vec::new(), false),
        },
        Step::Flip { at, bits } => {
            let Some(msg) = queue.pop_front() else {
                return (Vec::new(), false);
            };
            let mut bytes = msg.encode_to_vec();
            if bytes.is_empty() {
                return (vec![msg], false);
            }
            let at = usize::from(at) % bytes.len();
            bytes[at] ^= bits.max(1);
            (S::In::decode(bytes.as_slice()).into_iter().collect(), true)
        }
        Step::Truncate { at } => {
            let Some(msg) = queue.pop_front() else {
                return (Vec::new(), false);
            };
            let bytes = msg.encode_to_vec();
            let at = usize::from(at) % (bytes.len() + 1);
            (S::In::decode(&bytes[..at]).into_iter().collect(), true)
        }
        Step::Inject(forged) => (vec![S::forge(forged)], true),
    }
}

fn root(store: &ModelStore) -> Option<Vec<u8>> {
    store
        .tree_node(GROUP, 0, NodeId::ROOT)
        .expect("reading the root")
        .map(|node| node.digest.as_bytes().to_vec())
}

/// Checks what a failed side must do: report failure, then ignore input and send nothing.
fn assert_failed_server(server: &mut Server, store: &ModelStore, error: &SyncError) {
    assert!(
        server.is_failed(),
        "server returned {error} but is not failed"
    );
    let poll = server.poll_transmit(store);
    assert!(matches!(poll, Ok(None)), "a failed server sent {poll:?}");
    let again = server.handle(store, Request::NoMorePropertySync.make());
    assert!(
        again.is_ok(),
        "a failed server rejected a later message: {again:?}"
    );
}

fn assert_failed_client(client: &mut Client, store: &ModelStore, error: &SyncError) {
    assert!(
        client.is_failed(),
        "client returned {error} but is not failed"
    );
    let poll = client.poll_transmit(store);
    assert!(matches!(poll, Ok(None)), "a failed client sent {poll:?}");
    let again = client.handle(
        store,
        Response::SyncEnd {
            applied: 0,
            failed: 0,
        }
        .make(),
    );
    assert!(
        again.is_ok(),
        "a failed client rejected a later message: {again:?}"
    );
}

/// Which side the tamperer stands in front of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Server,
    Client,
}

/// Runs a conversation with the tampered side's input driven by `steps`.
pub fn run_server(input: Input<Request>) {
    run::<ServerSide>(input.setup, input.steps, Target::Server);
}

/// Runs a conversation with the client's input driven by `steps`.
pub fn run_client(input: Input<Response>) {
    run::<ClientSide>(input.setup, input.steps, Target::Client);
}

/// The queues of one conversation, typed by direction, for the generic tamperer.
trait Queues<S: Side> {
    fn bound_for_target(&mut self) -> &mut VecDeque<S::In>;
}

struct Conversation {
    to_server: VecDeque<pb::RepairRequest>,
    to_client: VecDeque<pb::RepairResponse>,
}

impl Queues<ServerSide> for Conversation {
    fn bound_for_target(&mut self) -> &mut VecDeque<pb::RepairRequest> {
        &mut self.to_server
    }
}

impl Queues<ClientSide> for Conversation {
    fn bound_for_target(&mut self) -> &mut VecDeque<pb::RepairResponse> {
        &mut self.to_client
    }
}

/// Hands messages of the tampered direction to their receiver.
trait Deliver<S: Side> {
    fn deliver(&mut self, msg: S::In) -> Result<(), SyncError>;
}

struct Ends<'a> {
    client: Client,
    server: Server,
    client_store: &'a ModelStore,
    server_store: &'a ModelStore,
}

impl Deliver<ServerSide> for Ends<'_> {
    fn deliver(&mut self, msg: pb::RepairRequest) -> Result<(), SyncError> {
        let result = self.server.handle(self.server_store, msg);
        if let Err(error) = &result {
            assert_failed_server(&mut self.server, self.server_store, error);
        }
        result
    }
}

impl Deliver<ClientSide> for Ends<'_> {
    fn deliver(&mut self, msg: pb::RepairResponse) -> Result<(), SyncError> {
        let result = self.client.handle(self.client_store, msg);
        if let Err(error) = &result {
            assert_failed_client(&mut self.client, self.client_store, error);
        }
        result
    }
}

fn run<S: Side>(setup: Setup, steps: Vec<Step<S::Forged>>, target: Target)
where
    Conversation: Queues<S>,
    for<'a> Ends<'a>: Deliver<S>,
{
    let config = setup.config();
    let client_store = setup.store(&setup.client);
    let server_store = setup.store(&setup.server);
    let (client_root, server_root) = (root(&client_store), root(&server_store));
    let client = Client::new(&client_store, GROUP, 0, config.clone()).expect("a valid sync");
    let server = Server::new(config).expect("a valid config");
    let mut ends = Ends {
        client,
        server,
        client_store: &client_store,
        server_store: &server_store,
    };
    let mut conversation = Conversation {
        to_server: VecDeque::new(),
        to_client: VecDeque::new(),
    };
    let mut steps = steps.into_iter();
    let mut tampered = false;
    let mut target_failed = false;

    for _ in 0..MAX_ROUNDS {
        let mut progress = false;
        // Both sides send what they have; an error while sending fails that side.
        if let Ok(Some(msg)) = ends.client.poll_transmit(&client_store) {
            conversation.to_server.push_back(msg);
            progress = true;
        }
        let server_out = ends.server.poll_transmit(&server_store);
        let server_idle = !matches!(server_out, Ok(Some(_)));
        if let Ok(Some(msg)) = server_out {
            conversation.to_client.push_back(msg);
            progress = true;
        }

        // The tampered direction: the next step decides what is delivered. The server reads a
        // message only once it has nothing to send, as its drivers do.
        let may_deliver = target == Target::Client || server_idle;
        if may_deliver && !target_failed {
            let queue = Queues::<S>::bound_for_target(&mut conversation);
            let (batch, changed) = match steps.next() {
                Some(step) => tamper::<S>(step, queue),
                None => (queue.pop_front().into_iter().collect(), false),
            };
            tampered |= changed;
            progress |= changed;
            for msg in batch {
                progress = true;
                if Deliver::<S>::deliver(&mut ends, msg).is_err() {
                    target_failed = true;
                    break;
                }
            }
        }

        // The other direction goes through untouched; its receiver may fail on what a
        // tampered peer says, which is its own business here.
        match target {
            Target::Server => {
                if let Some(msg) = conversation.to_client.pop_front() {
                    let _ = ends.client.handle(&client_store, msg);
                    progress = true;
                }
            }
            Target::Client => {
                if server_idle && let Some(msg) = conversation.to_server.pop_front() {
                    let _ = ends.server.handle(&server_store, msg);
                    progress = true;
                }
            }
        }

        let finished = ends.client.is_done()
            && ends.server.is_done()
            && conversation.to_client.is_empty()
            && conversation.to_server.is_empty();
        if finished || (!progress && steps.len() == 0) {
            break;
        }
    }

    if tampered {
        return;
    }
    // Nothing was tampered with: the conversation must have ended well.
    assert!(
        ends.client.is_done() && ends.server.is_done(),
        "an untampered sync did not finish: client failed {}, server failed {}",
        ends.client.is_failed(),
        ends.server.is_failed()
    );
    if config_preview(&ends) {
        assert_eq!(
            root(&client_store),
            client_root,
            "preview changed the client"
        );
        assert_eq!(
            root(&server_store),
            server_root,
            "preview changed the server"
        );
    } else {
        assert_eq!(
            root(&client_store),
            root(&server_store),
            "an untampered sync left the copies different"
        );
    }
}

fn config_preview(ends: &Ends<'_>) -> bool {
    ends.client.report().preview
}
