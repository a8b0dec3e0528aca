//! The bulk path (protocol version 2) and the cost of answering requests: an empty replica is
//! filled without fingerprint lists, and the server's leaf reads per request page stay bounded
//! whatever the node's size.

use std::collections::VecDeque;

use propd_merkle::{Property, Shape};
use propd_proto::v1 as pb;
use propd_repair::pair::sync_in_memory;
use propd_repair::{Client, Config, Server};
use propd_store::{ModelStore, RepairStore};

use crate::support::*;

/// A store that counts the leaves `leaves_under` returns (every leaf the protocol reads).
type Counting = Watched<ModelStore>;

fn props(prefix: &str, n: usize) -> Vec<Property> {
    (0..n)
        .map(|i| prop(&format!("{prefix}{i}"), 1, "v", 0))
        .collect()
}

fn small_pages() -> Config {
    Config {
        page_items: 64,
        max_backlog: 128,
        apply_batch: 100,
        ..Config::default()
    }
}

#[test]
fn an_empty_replica_is_filled_by_the_bulk_path_without_fingerprints() {
    for shape in [Shape::default(), small_shape()] {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = redb(&dir, shape, 1);
        let full = model(shape, 1);
        let data = props("e", 3000);
        put(&full, 0, data.clone());
        let (report, server) =
            sync_in_memory(&empty, &full, GROUP, 0, small_pages()).expect("sync");
        assert_eq!(contents(&empty, 0), contents(&full, 0));
        assert_eq!(root(&empty, 0), root(&full, 0));
        assert_eq!(report.protocol_version, propd_repair::PROTOCOL_VERSION);
        assert_eq!(
            (report.streamed, report.received, report.applied),
            (3000, 3000, 3000)
        );
        assert_eq!(
            (report.requested, report.sent, server.streamed),
            (0, 0, 3000)
        );
        let fingerprints: u64 = report.levels.iter().map(|l| l.fingerprints).sum();
        let digests: u64 = report.levels.iter().map(|l| l.digests).sum();
        assert_eq!(
            (fingerprints, digests),
            (0, 0),
            "no descent, no fingerprint list: {report:?}"
        );
        // Pages stay within the limits whatever the shard's size.
        assert!(report.bytes_received < 3000 * 400, "{report:?}");
    }
}

#[test]
fn a_whole_shard_streams_in_entity_order_and_version_one_descends() {
    let shape = small_shape();
    let full = model(shape, 1);
    put(&full, 0, props("e", 300));
    // Recording the order the client receives copies in: BulkSync pages, in turn.
    let empty = model(shape, 1);
    let mut streamed: Vec<String> = Vec::new();
    drive(&empty, &full, small_pages(), small_pages(), |msg| {
        if let Some(pb::repair_response::Msg::BulkSync(page)) = &msg.msg {
            streamed.extend(page.properties.iter().map(|p| p.id.clone()));
        }
    });
    let mut sorted = streamed.clone();
    sorted.sort();
    assert_eq!(streamed.len(), 300);
    assert_eq!(streamed, sorted, "the whole shard comes in entity order");
    assert_eq!(contents(&empty, 0), contents(&full, 0));

    // At version 1 the same sync descends and asks for every fingerprint back.
    let empty = model(shape, 1);
    let v1 = Config {
        protocol_version: 1,
        ..small_pages()
    };
    let (report, _) = sync_in_memory(&empty, &full, GROUP, 0, v1).expect("sync");
    assert_eq!((report.streamed, report.requested), (0, 300));
    assert_eq!(contents(&empty, 0), contents(&full, 0));
}

#[test]
fn a_subtree_only_the_server_holds_is_streamed_and_the_rest_merged() {
    let shape = Shape::default();
    let (a, b) = (model(shape, 1), model(shape, 1));
    // Common entities, a few differing versions, and many the client lacks.
    let common = props("c", 200);
    put(&a, 0, common.clone());
    put(&b, 0, common);
    put(&a, 0, vec![prop("c1", 2, "newer", 0)]);
    put(&b, 0, vec![prop("c2", 3, "newer", 0)]);
    put(&b, 0, props("s", 500));
    put(&a, 0, props("m", 20));
    let expected = merged(&contents(&a, 0), &contents(&b, 0), &shape);
    let (report, _) = sync_in_memory(&a, &b, GROUP, 0, small_pages()).expect("sync");
    assert_eq!(contents(&a, 0), expected);
    assert_eq!(contents(&b, 0), expected);
    assert_eq!(report.protocol_version, propd_repair::PROTOCOL_VERSION);
    // The client holds 220 entities among the default shape's 512 level-2 nodes: many of the
    // server's 500 lie under nodes the client lacks and come by the bulk path, the rest by the
    // leaf merge.
    assert!(report.streamed > 0 && report.streamed <= 500, "{report:?}");
    assert!(report.requested > 0, "{report:?}");
    // Every version the client asked for came once, except c1's: the server took the client's
    // newer c1 first, so its old version no longer resolves (c2's came once, as the answer to
    // the client's older copy, not again for the request).
    assert_eq!(
        report.received,
        report.streamed + report.requested - 1,
        "{report:?}"
    );
}

/// Drives a sync by hand, as the driver does: the server reads the client's next message only
/// once it has sent everything. `seen` sees every server message before the client; `idle` is
/// called each time the server has sent everything, with the client message it answered.
fn drive_with<C: RepairStore, S: RepairStore>(
    client_store: &C,
    server_store: &S,
    client_config: Config,
    server_config: Config,
    mut seen: impl FnMut(&pb::RepairResponse),
    mut idle: impl FnMut(Option<&pb::RepairRequest>),
) {
    let mut client = Client::new(client_store, GROUP, 0, client_config).expect("client");
    let mut server = Server::new(server_config).expect("server");
    let mut to_server: VecDeque<pb::RepairRequest> = VecDeque::new();
    let mut answered: Option<pb::RepairRequest> = None;
    for _ in 0..1_000_000 {
        while let Some(msg) = client.poll_transmit(client_store).expect("client sends") {
            to_server.push_back(msg);
        }
        while let Some(msg) = server.poll_transmit(server_store).expect("server sends") {
            seen(&msg);
            client.handle(client_store, msg).expect("client handles");
            while let Some(msg) = client.poll_transmit(client_store).expect("client sends") {
                to_server.push_back(msg);
            }
        }
        idle(answered.as_ref());
        if client.is_done() && server.is_done() {
            return;
        }
        let msg = to_server.pop_front().expect("a stalled sync");
        server
            .handle(server_store, msg.clone())
            .expect("server handles");
        answered = Some(msg);
    }
    panic!("the sync did not finish");
}

fn drive<C: RepairStore, S: RepairStore>(
    client_store: &C,
    server_store: &S,
    client_config: Config,
    server_config: Config,
    seen: impl FnMut(&pb::RepairResponse),
) {
    drive_with(
        client_store,
        server_store,
        client_config,
        server_config,
        seen,
        |_| {},
    );
}

/// For each `PropertyMissing` page the server handled, the leaves it read to answer it: the
/// reads between its delivery and the server's next idle moment.
fn leaf_reads_per_missing_page(
    client_store: &ModelStore,
    server_store: &Counting,
    client_config: Config,
    server_config: Config,
) -> Vec<u64> {
    let mut per_page = Vec::new();
    let mut last = 0;
    drive_with(
        client_store,
        server_store,
        client_config,
        server_config,
        |_| {},
        |answered| {
            let now = server_store.leaves_read();
            if let Some(pb::RepairRequest {
                msg: Some(pb::repair_request::Msg::PropertyMissing(_)),
            }) = answered
            {
                per_page.push(now - last);
            }
            last = now;
        },
    );
    per_page
}

#[test]
fn the_server_reads_a_bounded_number_of_leaves_per_missing_page() {
    // One bucket holding every leaf: both sides hold it, so the server lists its fingerprints
    // in chunks and the client asks for the 2999 it lacks, page by page.
    let shape = Shape {
        slot_count: 1,
        depth: 0,
        ..Shape::default()
    };
    let config = small_pages();
    let page = config.page_items as u64;
    let (a, b) = (model(shape, 1), model(shape, 1));
    let data = props("e", 3000);
    put(&a, 0, data[..1].to_vec());
    put(&b, 0, data.clone());
    let b = Watched::new(b);
    let per_page = leaf_reads_per_missing_page(&a, &b, config.clone(), config.clone());
    assert_eq!(contents(&a, 0), contents(&b.inner, 0));
    assert!(per_page.len() >= 40, "{} missing pages", per_page.len());
    let most = per_page.iter().copied().max().unwrap_or(0);
    assert!(
        most <= 3 * page,
        "the server read {most} leaves for one missing page of at most {page}: {per_page:?}"
    );
    let total: u64 = per_page.iter().sum();
    assert!(
        total <= 3 * 3000,
        "{total} leaf reads to answer 3000 requests"
    );

    // Version 1 requests carry no range: each page is looked for from the node's start, which
    // is what version 2 removed (kept for old peers; this shows the bound above can fail).
    let (a, b) = (model(shape, 1), model(shape, 1));
    put(&a, 0, data[..1].to_vec());
    put(&b, 0, data);
    let b = Watched::new(b);
    let v1 = Config {
        protocol_version: 1,
        ..config
    };
    let old = leaf_reads_per_missing_page(&a, &b, v1.clone(), v1);
    assert_eq!(contents(&a, 0), contents(&b.inner, 0));
    let old_most = old.iter().copied().max().unwrap_or(0);
    assert!(
        old_most > 3 * page,
        "version 1 read at most {old_most} per page"
    );
}

/// The fingerprints each `PropertyMissing` page asks for, chunk by chunk, in the order the
/// server answered the pages.
fn missing_pages<C: RepairStore, S: RepairStore>(
    client_store: &C,
    server_store: &S,
    client_config: Config,
    server_config: Config,
) -> Vec<Vec<usize>> {
    let mut pages = Vec::new();
    drive_with(
        client_store,
        server_store,
        client_config,
        server_config,
        |_| {},
        |answered| {
            if let Some(pb::RepairRequest {
                msg: Some(pb::repair_request::Msg::PropertyMissing(missing)),
            }) = answered
            {
                pages.push(
                    missing
                        .nodes
                        .iter()
                        .map(|node| node.fingerprints.len() / 8)
                        .collect(),
                );
            }
        },
    );
    pages
}

/// One bucket of `n` copies on the server; the client holds every other one, in the order the
/// server lists them, so each chunk the server lists is half missing on the client.
fn half_missing_bucket(n: usize) -> (ModelStore, ModelStore) {
    let shape = Shape {
        slot_count: 1,
        depth: 0,
        ..Shape::default()
    };
    let (client, server) = (model(shape, 1), model(shape, 1));
    let data = props("e", n);
    put(&server, 0, data.clone());
    let bucket = propd_merkle::NodeId {
        level: shape.bucket_level(),
        index: 0,
    };
    let order = server
        .leaves_under(GROUP, 0, bucket, None, n + 1)
        .expect("server leaves");
    assert_eq!(order.len(), n);
    let held: Vec<Property> = order
        .iter()
        .step_by(2)
        .map(|leaf| {
            data.iter()
                .find(|p| p.entity().expect("entity") == leaf.entity)
                .expect("a listed leaf is a stored copy")
                .clone()
        })
        .collect();
    put(&client, 0, held);
    (client, server)
}

#[test]
fn missing_pages_pack_whole_chunks_up_to_the_page_by_their_listed_size() {
    // The server lists 16 leaves a chunk; the client lacks 8 of each. A request page costs the
    // server the chunks' listed leaves, not the fingerprints asked for: so a page of 64 takes
    // four chunks (64 listed, 32 asked), not the eight that 64 fingerprints would allow.
    let (client, server) = half_missing_bucket(160);
    let server_config = Config {
        page_items: 16,
        max_backlog: 16,
        ..small_pages()
    };
    let pages = missing_pages(&client, &server, small_pages(), server_config.clone());
    assert_eq!(contents(&client, 0), contents(&server, 0));
    assert_eq!(
        pages,
        vec![vec![8, 8, 8, 8], vec![8, 8, 8, 8], vec![8, 8]],
        "chunks asked for per PropertyMissing page"
    );

    // A page of 40 takes two chunks (32 listed): a third would cost 48.
    let (client, server) = half_missing_bucket(160);
    let forty = Config {
        page_items: 40,
        max_backlog: 40,
        ..small_pages()
    };
    let pages = missing_pages(&client, &server, forty, server_config);
    assert_eq!(contents(&client, 0), contents(&server, 0));
    assert_eq!(
        pages,
        vec![vec![8, 8]; 5],
        "chunks asked for per page of 40"
    );
}

#[test]
fn a_chunk_larger_than_the_clients_page_is_asked_for_in_pieces_alone() {
    // The server lists 64 leaves a chunk and the client lacks 32 of each; the client's pages
    // hold 12 fingerprints: each chunk goes in pieces of 12, 12 and 8, never sharing a page.
    let (client, server) = half_missing_bucket(256);
    let client_config = Config {
        page_items: 12,
        max_backlog: 12,
        ..small_pages()
    };
    let pages = missing_pages(&client, &server, client_config, small_pages());
    assert_eq!(contents(&client, 0), contents(&server, 0));
    let per_chunk = [vec![12], vec![12], vec![8]];
    let expected: Vec<Vec<usize>> = per_chunk.iter().cycle().take(12).cloned().collect();
    assert_eq!(pages, expected, "pieces asked for per page of 12");
}

#[test]
fn the_server_names_its_group_and_shard_once_the_tree_root_arrives() {
    let shape = small_shape();
    let (a, b) = (model(shape, 4), model(shape, 4));
    let ids: Vec<String> = (0..)
        .map(|i| format!("s{i}"))
        .filter(|id| shard_of_id(id, 4) == 3)
        .take(3)
        .collect();
    put(&b, 3, ids.iter().map(|id| prop(id, 1, "v", 0)).collect());
    let mut client = Client::new(&a, GROUP, 3, Config::default()).expect("client");
    let mut server = Server::new(Config::default()).expect("server");
    assert_eq!(server.target(), ("", 0), "nothing named before the root");
    let root = client
        .poll_transmit(&a)
        .expect("client sends")
        .expect("the tree root");
    server.handle(&b, root).expect("server handles the root");
    assert_eq!(server.target(), (GROUP, 3));
}

/// A server of version 3 leaves its shape out of a `RootCompare` whose shapes match (the
/// client needs it only to report a mismatch); one of version 2 always sends it.
#[test]
fn the_root_compare_carries_the_shape_only_before_version_3_or_on_a_mismatch() {
    let shape = small_shape();
    for (version, expect_shape) in [(2, true), (3, false)] {
        let (a, b) = (model(shape, 1), model(shape, 1));
        put(&b, 0, props("s", 3));
        let config = Config {
            protocol_version: version,
            ..Config::default()
        };
        let mut shapes = Vec::new();
        drive(&a, &b, config.clone(), config, |msg| {
            if let Some(pb::repair_response::Msg::RootCompare(compare)) = &msg.msg {
                shapes.push(compare.server_shape.is_some());
            }
        });
        assert_eq!(shapes, [expect_shape], "v{version}");
    }
    // A shape mismatch is reported with the server's shape, whatever the version.
    let (a, b) = (model(Shape::default(), 1), model(shape, 1));
    let mut client = Client::new(&a, GROUP, 0, Config::default()).expect("client");
    let mut server = Server::new(Config::default()).expect("server");
    let root = client.poll_transmit(&a).expect("client").expect("root");
    server.handle(&b, root).expect("server");
    let answer = server.poll_transmit(&b).expect("server").expect("answer");
    let Some(pb::repair_response::Msg::RootCompare(compare)) = answer.msg else {
        panic!("{answer:?}");
    };
    assert!(
        !compare.shape_ok && compare.server_shape.is_some(),
        "{compare:?}"
    );
}

/// A leaf list names at most `page_items` nodes, even nodes the server holds nothing under
/// (which cost no leaves).
#[test]
fn a_leaf_list_page_names_at_most_page_items_nodes_even_empty_ones() {
    let shape = small_shape();
    for version in [2, 3] {
        let (a, b) = (model(shape, 1), model(shape, 1));
        put(&a, 0, props("c", 40));
        put(&b, 0, props("s", 1));
        let config = Config {
            protocol_version: version,
            page_items: 3,
            max_backlog: 3,
            leaf_list_max: 1,
            ..Config::default()
        };
        let mut sizes = Vec::new();
        drive(&a, &b, config.clone(), config, |msg| {
            if let Some(pb::repair_response::Msg::DifferTreeSummary(summary)) = &msg.msg {
                sizes.push(summary.nodes.len());
            }
        });
        assert_eq!(contents(&a, 0), contents(&b, 0), "v{version}");
        assert!(sizes.iter().all(|&n| n <= 3), "v{version}: {sizes:?}");
        assert!(sizes.contains(&3), "v{version}: {sizes:?}");
    }
}

/// A request page is refused past `MAX_PAGE_ITEMS` fingerprints in all, and taken at exactly
/// that many.
#[test]
fn a_missing_page_of_more_than_the_page_bound_is_refused() {
    use pb::repair_request::Msg;
    let shape = Shape {
        slot_count: 1,
        depth: 0,
        ..Shape::default()
    };
    let bound = propd_repair::MAX_PAGE_ITEMS;
    for (count, refused) in [(bound, false), (bound + 1, true)] {
        let (a, b) = (model(shape, 1), model(shape, 1));
        let data = props("e", 20);
        put(&a, 0, data[..1].to_vec());
        put(&b, 0, data);
        let mut client = Client::new(&a, GROUP, 0, small_pages()).expect("client");
        let mut server = Server::new(small_pages()).expect("server");
        let mut to_server = VecDeque::new();
        let mut result = None;
        for _ in 0..1_000 {
            while let Some(msg) = client.poll_transmit(&a).expect("client sends") {
                to_server.push_back(msg);
            }
            while let Some(msg) = server.poll_transmit(&b).expect("server sends") {
                client.handle(&a, msg).expect("client handles");
                while let Some(msg) = client.poll_transmit(&a).expect("client sends") {
                    to_server.push_back(msg);
                }
            }
            let msg = to_server.pop_front().expect("a request before the end");
            let Some(Msg::PropertyMissing(mut request)) = msg.msg else {
                server.handle(&b, msg).expect("server handles");
                continue;
            };
            // The request's first node, asking for `count` fingerprints in all (over two
            // entries).
            let first = request.nodes[0].clone();
            let fingerprints =
                |range: std::ops::Range<u64>| range.flat_map(|k| k.to_le_bytes()).collect();
            let half = (count / 2) as u64;
            request.nodes = vec![
                pb::MissingLeaves {
                    fingerprints: fingerprints(0..half),
                    ..first.clone()
                },
                pb::MissingLeaves {
                    fingerprints: fingerprints(half..count as u64),
                    ..first
                },
            ];
            result = Some(server.handle(
                &b,
                pb::RepairRequest {
                    msg: Some(Msg::PropertyMissing(request)),
                },
            ));
            break;
        }
        match result.expect("the client asked for the server's leaves") {
            Err(err) if refused => {
                assert!(err.to_string().contains("PropertyMissing.nodes"), "{err}")
            }
            Ok(()) if !refused => {}
            other => panic!("{count} fingerprints: {other:?}"),
        }
    }
}

/// The bulk path's pages fill up to `page_items` properties or until they pass `page_bytes`
/// (the property that passes it ends the page), and the server counts each copy it sent.
#[test]
fn bulk_pages_fill_to_their_item_or_byte_bound() {
    use prost::Message;
    let shape = small_shape();
    let page_bytes = 4096;
    let config = Config {
        page_items: 64,
        page_bytes,
        ..small_pages()
    };
    // Copies of about 230 bytes (the byte bound ends each page) and of about 20 (the item
    // bound does).
    for value_len in [200, 1] {
        let full = model(shape, 1);
        let data: Vec<Property> = (0..300)
            .map(|i| prop(&format!("e{i:03}"), 1, &"v".repeat(value_len), 0))
            .collect();
        put(&full, 0, data);
        let empty = model(shape, 1);
        let mut pages: Vec<Vec<usize>> = Vec::new();
        let mut client = Client::new(&empty, GROUP, 0, config.clone()).expect("client");
        let mut server = Server::new(config.clone()).expect("server");
        let mut to_server = VecDeque::new();
        for _ in 0..10_000 {
            while let Some(msg) = client.poll_transmit(&empty).expect("client sends") {
                to_server.push_back(msg);
            }
            while let Some(msg) = server.poll_transmit(&full).expect("server sends") {
                if let Some(pb::repair_response::Msg::BulkSync(page)) = &msg.msg {
                    pages.push(page.properties.iter().map(|p| p.encoded_len()).collect());
                }
                client.handle(&empty, msg).expect("client handles");
                while let Some(msg) = client.poll_transmit(&empty).expect("client sends") {
                    to_server.push_back(msg);
                }
            }
            if client.is_done() && server.is_done() {
                break;
            }
            let msg = to_server.pop_front().expect("a stalled sync");
            server.handle(&full, msg).expect("server handles");
        }
        assert_eq!(contents(&empty, 0), contents(&full, 0));
        let counts: Vec<usize> = pages.iter().map(Vec::len).collect();
        assert_eq!(counts.iter().sum::<usize>(), 300);
        let (last, full_pages) = pages.split_last().expect("pages");
        assert!(!last.is_empty());
        for page in full_pages {
            let bytes: usize = page.iter().sum();
            let before_last: usize = bytes - page.last().copied().unwrap_or(0);
            let by_items = page.len() == 64 && bytes < page_bytes;
            let by_bytes = page.len() <= 64 && bytes >= page_bytes && before_last < page_bytes;
            assert!(by_items || by_bytes, "value of {value_len}: {counts:?}");
        }
        if value_len == 1 {
            assert_eq!(&counts[..4], [64; 4], "the item bound: {counts:?}");
        } else {
            assert!(
                counts[0] > 1 && counts[0] < 64,
                "the byte bound: {counts:?}"
            );
        }
        assert_eq!((server.report().sent, server.report().streamed), (300, 300));
    }
}

/// Pages streamed over several subtrees the client lacks (a store read per subtree) hold at
/// most `page_items` copies, whatever the reads return.
#[test]
fn pages_streamed_over_several_subtrees_stay_within_page_items() {
    let shape = Shape::default();
    let (a, b) = (model(shape, 1), model(shape, 1));
    put(&a, 0, props("m", 20));
    put(&b, 0, props("s", 500));
    let config = Config {
        page_items: 40,
        max_backlog: 40,
        ..small_pages()
    };
    let mut sizes = Vec::new();
    drive(&a, &b, config.clone(), config, |msg| {
        if let Some(pb::repair_response::Msg::BulkSync(page)) = &msg.msg {
            sizes.push(page.properties.len());
        }
    });
    assert_eq!(contents(&a, 0), contents(&b, 0));
    assert!(sizes.len() > 2, "{sizes:?}");
    assert!(sizes.iter().all(|&n| n <= 40), "{sizes:?}");
    assert!(sizes.contains(&40), "{sizes:?}");
}
