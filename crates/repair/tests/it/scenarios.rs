//! The reference's scenarios, each run through the in-memory pair.

use propd_merkle::Shape;
use propd_repair::pair::{Pair, PairError, sync_in_memory};
use propd_repair::{Config, SyncError};

use crate::support::*;

fn sync_model(
    a: &propd_store::ModelStore,
    b: &propd_store::ModelStore,
    shard: u32,
) -> propd_repair::SyncReport {
    let (report, _) = sync_in_memory(a, b, GROUP, shard, Config::default()).expect("sync");
    report
}

#[test]
fn client_older_takes_the_servers_copy() {
    let (a, b) = (model(Shape::default(), 1), model(Shape::default(), 1));
    put(&a, 0, vec![prop("x", 1, "old", 0)]);
    put(&b, 0, vec![prop("x", 2, "new", 0)]);
    let report = sync_model(&a, &b, 0);
    assert_eq!(contents(&a, 0), vec![prop("x", 2, "new", 0)]);
    assert_eq!(contents(&b, 0), vec![prop("x", 2, "new", 0)]);
    assert_eq!(
        (
            report.sent,
            report.received,
            report.applied,
            report.peer_applied
        ),
        (1, 1, 1, 0)
    );
    assert_eq!(root(&a, 0), root(&b, 0));
}

#[test]
fn server_older_takes_the_clients_copy() {
    let (a, b) = (model(Shape::default(), 1), model(Shape::default(), 1));
    put(&a, 0, vec![prop("x", 3, "new", 0)]);
    put(&b, 0, vec![prop("x", 2, "old", 0)]);
    let report = sync_model(&a, &b, 0);
    assert_eq!(contents(&b, 0), vec![prop("x", 3, "new", 0)]);
    assert_eq!(
        (report.sent, report.received, report.peer_applied),
        (1, 0, 1)
    );
}

#[test]
fn equal_trees_end_after_one_round_trip_under_a_kilobyte() {
    let (a, b) = (model(Shape::default(), 1), model(Shape::default(), 1));
    let data: Vec<_> = (0..500)
        .map(|i| prop(&format!("p{i}"), 1, "v", 0))
        .collect();
    put(&a, 0, data.clone());
    put(&b, 0, data);
    let mut pair = Pair::new(&a, &b, GROUP, 0, Config::default()).expect("pair");
    let (report, server) = pair.drive_bounded(10).expect("sync");
    assert!(report.in_sync && server.in_sync);
    assert!(
        report.bytes_sent + report.bytes_received < 1024,
        "{report:?}"
    );
    assert_eq!((report.compared, report.sent, report.received), (0, 0, 0));
    assert!(pair.steps() <= 3, "took {} steps", pair.steps());
}

#[test]
fn only_on_the_client_is_sent_and_only_on_the_server_is_fetched() {
    let (a, b) = (model(Shape::default(), 1), model(Shape::default(), 1));
    put(&a, 0, vec![prop("mine", 1, "a", 0)]);
    put(&b, 0, vec![prop("theirs", 1, "b", 0)]);
    let report = sync_model(&a, &b, 0);
    let both = vec![prop("mine", 1, "a", 0), prop("theirs", 1, "b", 0)];
    assert_eq!(contents(&a, 0), both);
    assert_eq!(contents(&b, 0), both);
    // The two entities lie in different slots: the client lacks the server's slot, which comes
    // by the bulk path (streamed, not requested).
    assert_eq!(
        (
            report.sent,
            report.requested,
            report.received,
            report.streamed
        ),
        (1, 0, 1, 1)
    );
}

#[test]
fn version_one_fetches_what_version_two_streams() {
    let (a, b) = (model(Shape::default(), 1), model(Shape::default(), 1));
    put(&a, 0, vec![prop("mine", 1, "a", 0)]);
    put(&b, 0, vec![prop("theirs", 1, "b", 0)]);
    let v1 = Config {
        protocol_version: 1,
        ..Config::default()
    };
    // Either side at version 1 runs the whole sync at version 1.
    let (report, server) = sync_in_memory(&a, &b, GROUP, 0, v1.clone()).expect("sync");
    assert_eq!((report.protocol_version, server.protocol_version), (1, 1));
    assert_eq!(
        (
            report.sent,
            report.requested,
            report.received,
            report.streamed
        ),
        (1, 1, 1, 0)
    );
    let both = vec![prop("mine", 1, "a", 0), prop("theirs", 1, "b", 0)];
    assert_eq!(contents(&a, 0), both);
    assert_eq!(contents(&b, 0), both);
}

#[test]
fn only_the_synced_shard_changes() {
    let (a, b) = (model(Shape::default(), 2), model(Shape::default(), 2));
    let ids: Vec<String> = (0..40).map(|i| format!("id{i}")).collect();
    for id in &ids {
        let shard = shard_of_id(id, 2);
        put(&a, shard, vec![prop(id, 1, "a", 0)]);
    }
    let other_before = contents(&b, 1);
    sync_model(&a, &b, 0);
    assert_eq!(contents(&a, 0), contents(&b, 0));
    assert!(!contents(&b, 0).is_empty());
    assert_eq!(contents(&b, 1), other_before, "shard 1 was not synced");
    assert_ne!(contents(&a, 1), contents(&b, 1));
}

#[test]
fn a_one_slot_shape_syncs() {
    let shape = Shape {
        slot_count: 1,
        depth: 0,
        ..Shape::default()
    };
    let (a, b) = (model(shape, 1), model(shape, 1));
    put(
        &a,
        0,
        (0..30).map(|i| prop(&format!("a{i}"), 1, "a", 0)).collect(),
    );
    put(
        &b,
        0,
        (0..30).map(|i| prop(&format!("a{i}"), 2, "b", 0)).collect(),
    );
    sync_model(&a, &b, 0);
    assert_eq!(contents(&a, 0), contents(&b, 0));
    assert!(contents(&a, 0).iter().all(|p| p.mod_revision == 2));
}

#[test]
fn a_tombstone_beats_a_live_copy_at_the_same_revision_both_ways() {
    for client_has_tombstone in [true, false] {
        let (a, b) = (model(Shape::default(), 1), model(Shape::default(), 1));
        let (tomb, live) = (prop("x", 5, "", 9), prop("x", 5, "live", 0));
        let (mine, theirs) = if client_has_tombstone {
            (tomb.clone(), live)
        } else {
            (live, tomb.clone())
        };
        put(&a, 0, vec![mine]);
        put(&b, 0, vec![theirs]);
        sync_model(&a, &b, 0);
        assert_eq!(
            contents(&a, 0),
            vec![tomb.clone()],
            "client has tombstone: {client_has_tombstone}"
        );
        assert_eq!(contents(&b, 0), vec![tomb]);
    }
}

#[test]
fn three_nodes_chained_converge_in_three_syncs() {
    let nodes = [
        model(Shape::default(), 1),
        model(Shape::default(), 1),
        model(Shape::default(), 1),
    ];
    // The reference's example: A(v2), B(v1), C(v3), plus one entity only on each node.
    put(
        &nodes[0],
        0,
        vec![prop("x", 2, "a", 0), prop("only-a", 1, "a", 0)],
    );
    put(
        &nodes[1],
        0,
        vec![prop("x", 1, "b", 0), prop("only-b", 1, "b", 0)],
    );
    put(
        &nodes[2],
        0,
        vec![prop("x", 3, "c", 0), prop("only-c", 1, "c", 0)],
    );
    for (from, to) in [(0, 1), (1, 2), (2, 0)] {
        sync_model(&nodes[from], &nodes[to], 0);
    }
    let expected = vec![
        prop("only-a", 1, "a", 0),
        prop("only-b", 1, "b", 0),
        prop("only-c", 1, "c", 0),
        prop("x", 3, "c", 0),
    ];
    for node in &nodes {
        assert_eq!(contents(node, 0), expected);
    }
}

#[test]
fn preview_finds_differences_and_applies_nothing() {
    let (a, b) = (model(Shape::default(), 1), model(Shape::default(), 1));
    put(
        &a,
        0,
        vec![prop("mine", 1, "a", 0), prop("both", 1, "a", 0)],
    );
    put(
        &b,
        0,
        vec![prop("theirs", 1, "b", 0), prop("both", 2, "b", 0)],
    );
    let (before_a, before_b) = (contents(&a, 0), contents(&b, 0));
    let config = Config {
        preview: true,
        ..Config::default()
    };
    let (report, server) = sync_in_memory(&a, &b, GROUP, 0, config).expect("preview");
    assert!(report.preview && server.preview);
    assert_eq!(
        (
            report.sent,
            report.requested,
            report.received,
            report.applied
        ),
        (2, 2, 0, 0)
    );
    assert_eq!((contents(&a, 0), contents(&b, 0)), (before_a, before_b));
}

#[test]
fn different_shapes_are_refused_with_both_shapes_named() {
    let (a, b) = (model(Shape::default(), 1), model(Shape::reference(), 1));
    put(&a, 0, vec![prop("x", 1, "a", 0)]);
    let err = sync_in_memory(&a, &b, GROUP, 0, Config::default()).expect_err("shapes differ");
    match err {
        PairError::Client(SyncError::ShapeMismatch { ours, theirs }) => {
            assert_eq!((ours, theirs), (Shape::default(), Some(Shape::reference())));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(contents(&b, 0).is_empty());
}

#[test]
fn a_shard_the_server_lacks_is_reported_not_found() {
    let (a, b) = (model(Shape::default(), 4), model(Shape::default(), 2));
    let err = sync_in_memory(&a, &b, GROUP, 3, Config::default()).expect_err("no such shard");
    assert!(
        matches!(
            err,
            PairError::Client(SyncError::TreeNotFound { shard: 3, .. })
        ),
        "{err:?}"
    );
}

#[test]
fn paging_and_deep_descent_give_the_same_result() {
    let shape = small_shape();
    let (a, b) = (model(shape, 1), model(shape, 1));
    put(
        &a,
        0,
        (0..60)
            .map(|i| prop(&format!("k{i}"), 1 + i % 3, "a", 0))
            .collect(),
    );
    put(
        &b,
        0,
        (20..90)
            .map(|i| prop(&format!("k{i}"), 2, "b", if i % 7 == 0 { 4 } else { 0 }))
            .collect(),
    );
    let expected = merged(&contents(&a, 0), &contents(&b, 0), &shape);
    let (report, _) = sync_in_memory(&a, &b, GROUP, 0, tiny_pages()).expect("sync");
    assert_eq!(contents(&a, 0), expected);
    assert_eq!(contents(&b, 0), expected);
    assert!(
        report.levels.iter().filter(|l| l.digests > 0).count() >= 3,
        "{report:?}"
    );
    // A second sync finds nothing.
    let (again, _) = sync_in_memory(&a, &b, GROUP, 0, tiny_pages()).expect("second sync");
    assert!(again.in_sync);
}

/// Where the server lists a differing subtree's leaves (adaptive descent, `Server::lists_now`):
/// at once when the client lacks the subtree or it holds at most `leaf_list_max` leaves, and
/// otherwise one level further down, until the buckets. The default shape has 32 slots (level
/// 1) above three bucket levels (2 to 4).
///
/// Protocol version 1: version 2 streams a subtree the client lacks instead of listing it (the
/// bulk path, tested in `bulk`).
#[test]
fn a_small_or_missing_subtree_is_listed_at_once_and_a_large_one_descended() {
    let shape = Shape::default();
    let bucket_level = shape.bucket_level() as usize;
    let shared: Vec<_> = (0..100)
        .map(|i| prop(&format!("k{i}"), 1, "v", 0))
        .collect();
    let diverged = || {
        let (a, b) = (model(shape, 1), model(shape, 1));
        put(&a, 0, shared.clone());
        put(&b, 0, shared.clone());
        put(&b, 0, vec![prop("extra", 1, "v", 0)]);
        (a, b)
    };

    // One extra leaf in a slot of about three: the slot is small, listed at level 1.
    let (a, b) = diverged();
    let (report, _) = sync_in_memory(&a, &b, GROUP, 0, Config::default()).expect("sync");
    assert_eq!(contents(&a, 0), contents(&b, 0));
    assert!(report.levels[1].fingerprints >= 1, "{report:?}");
    assert!(
        report.levels[2..=bucket_level]
            .iter()
            .all(|level| level.digests == 0 && level.fingerprints == 0),
        "no descent below the slots: {report:?}"
    );

    // The same slot with `leaf_list_max = 0`: descended into, until a node the client lacks
    // or a bucket is listed.
    let (a, b) = diverged();
    let config = Config {
        leaf_list_max: 0,
        protocol_version: 1,
        ..Config::default()
    };
    let (report, _) = sync_in_memory(&a, &b, GROUP, 0, config.clone()).expect("sync");
    assert_eq!(contents(&a, 0), contents(&b, 0));
    assert_eq!(report.levels[1].fingerprints, 0, "{report:?}");
    assert!(report.levels[2].digests > 0, "descended: {report:?}");
    let listed_below: u64 = report.levels[2..=bucket_level]
        .iter()
        .map(|level| level.fingerprints)
        .sum();
    assert!(listed_below >= 1, "{report:?}");

    // A client without any of the slots: each is listed at level 1, however large.
    let (empty, full) = (model(shape, 1), model(shape, 1));
    put(&full, 0, shared.clone());
    let (report, _) = sync_in_memory(&empty, &full, GROUP, 0, config).expect("sync");
    assert_eq!(contents(&empty, 0), contents(&full, 0));
    assert_eq!(report.levels[1].fingerprints, 100, "{report:?}");
    assert!(
        report.levels[2..=bucket_level]
            .iter()
            .all(|level| level.fingerprints == 0),
        "nothing is descended into: {report:?}"
    );
}

/// A bucket the server lists a couple of leaves at a time: the client compares each chunk with
/// its own leaves up to the chunk's end only, so it sends exactly the copies that differ (a leaf
/// past the chunk is the next chunk's business, not a difference), and the sync ends in a
/// finished state on both sides, in every protocol version.
#[test]
fn a_bucket_listed_in_chunks_exchanges_only_the_copies_that_differ() {
    let shape = Shape {
        slot_count: 1,
        depth: 0,
        ..Shape::default()
    };
    for version in 1..=propd_repair::PROTOCOL_VERSION {
        let (a, b) = (model(shape, 1), model(shape, 1));
        let ids: Vec<String> = (0..40).map(|i| format!("e{i:02}")).collect();
        put(&a, 0, ids.iter().map(|id| prop(id, 1, "v", 0)).collect());
        put(
            &b,
            0,
            ids.iter()
                .map(|id| {
                    let newer = id == "e17" || id == "e31";
                    prop(id, if newer { 2 } else { 1 }, "v", 0)
                })
                .collect(),
        );
        let config = Config {
            protocol_version: version,
            ..tiny_pages()
        };
        let mut pair = Pair::new(&a, &b, GROUP, 0, config).expect("pair");
        let (report, server) = pair.drive_bounded(1_000_000).expect("sync");
        assert!(
            pair.client.is_done() && !pair.client.is_failed(),
            "v{version}"
        );
        assert!(
            pair.server.is_done() && !pair.server.is_failed(),
            "v{version}"
        );
        assert_eq!(
            (
                report.sent,
                report.received,
                report.applied,
                server.received,
                server.applied,
                server.sent
            ),
            (2, 2, 2, 2, 0, 2),
            "v{version}: the two older copies went out (received, not applied), the two newer \
             came back"
        );
        // Each of the client's 40 leaves was compared once, and the server's two it lacked.
        assert_eq!((report.compared, report.requested), (42, 2), "v{version}");
        assert_eq!(contents(&a, 0), contents(&b, 0));
        // What one side sent, the other received, and the tree traffic is counted per level.
        assert_eq!(
            (report.bytes_sent, report.bytes_received),
            (server.bytes_received, server.bytes_sent),
            "v{version}"
        );
        let level = |n: u32| report.levels.iter().find(|l| l.level == n);
        assert!(
            level(0).is_some_and(|l| l.bytes_received > 0),
            "v{version}: the root"
        );
        if version < 3 {
            assert!(
                level(1).is_some_and(|l| l.bytes_received > 0),
                "v{version}: the slot level"
            );
        }
        // The bucket's lists are counted at its level, with the bytes that carried them.
        let bucket = level(1).expect("the bucket level");
        assert!(
            bucket.fingerprints > 0 && bucket.bytes_received >= 8 * bucket.fingerprints,
            "v{version}: {} fingerprints in {} bytes",
            bucket.fingerprints,
            bucket.bytes_received
        );
        // The two fingerprints requested are counted at the leaf level, below the bucket.
        let leaves = level(2).expect("the leaf level");
        assert!(
            leaves.fingerprints == 2 && leaves.bytes_sent >= 16,
            "v{version}: {leaves:?}"
        );
        let tree: u64 = report.levels.iter().map(|l| l.bytes_received).sum();
        assert!(tree <= report.bytes_received, "v{version}");
    }
}

/// Copies a store refuses are counted as failed on the side that refused them, and each side
/// hears the other's counts: a round with a failed apply must not count for purging.
#[test]
fn copies_a_store_refuses_are_counted_failed_where_refused() {
    let shape = Shape::default();
    let (a, b) = (model(shape, 1), model(shape, 1));
    put(&a, 0, vec![prop("k1", 1, "a", 0), prop("k2", 1, "a", 0)]);
    put(&b, 0, vec![prop("k3", 1, "b", 0), prop("k4", 1, "b", 0)]);
    let (a, b) = (Watched::refusing(a, &["k3"]), Watched::refusing(b, &["k1"]));
    let (report, server) = sync_in_memory(&a, &b, GROUP, 0, Config::default()).expect("sync");
    assert_eq!(
        (report.applied, report.failed),
        (1, 1),
        "the client refused k3"
    );
    assert_eq!(
        (server.applied, server.failed),
        (1, 1),
        "the server refused k1"
    );
    assert_eq!((report.peer_applied, report.peer_failed), (1, 1));
    assert_eq!(contents(&a.inner, 0).len(), 3);
    assert_eq!(contents(&b.inner, 0).len(), 3);
}

/// The parents of each `LevelDigests` page of a version 2 sync where each of 2 000 entities
/// differs, as `(level, parents)` in order.
fn digest_pages(shape: Shape, config: Config) -> Vec<(u32, u32)> {
    use pb::repair_request::Msg;
    use propd_proto::v1 as pb;
    let (a, b) = (model(shape, 1), model(shape, 1));
    put(
        &a,
        0,
        (0..2000)
            .map(|i| prop(&format!("e{i}"), 1, "a", 0))
            .collect(),
    );
    put(
        &b,
        0,
        (0..2000)
            .map(|i| prop(&format!("e{i}"), 2, "b", 0))
            .collect(),
    );
    let mut pair = Pair::new(&a, &b, GROUP, 0, config).expect("pair");
    let mut pages = Vec::new();
    for _ in 0..100_000 {
        if pair.client.is_done() {
            break;
        }
        if let Some(request) = pair.client.poll_transmit(&a).expect("client") {
            if let Some(Msg::LevelDigests(page)) = &request.msg {
                pages.push((page.level, page.parents));
            }
            pair.server.handle(&b, request).expect("server");
        }
        while let Some(response) = pair.server.poll_transmit(&b).expect("server") {
            pair.client.handle(&a, response).expect("client");
        }
    }
    assert!(pair.client.is_done());
    assert_eq!(contents(&a, 0), contents(&b, 0));
    pages
}

/// A `LevelDigests` page takes parents while their worst case (every child present) fits its
/// item and byte limits; the first parent always goes in.
#[test]
fn a_digest_page_packs_parents_while_their_worst_case_fits() {
    let v2 = Config {
        protocol_version: 2,
        leaf_list_max: 0,
        ..Config::default()
    };
    // Level 2 of the default shape holds the 32 slots' children, 16 per slot: 32 digests fit
    // two slots exactly.
    let pages = digest_pages(
        Shape::default(),
        Config {
            page_items: 32,
            max_backlog: 1024,
            ..v2.clone()
        },
    );
    let level_2: Vec<u32> = pages.iter().filter(|p| p.0 == 2).map(|p| p.1).collect();
    assert_eq!(level_2, [2; 16], "{pages:?}");
    // By bytes: 4 slots of 16 buckets, every bucket holding leaves; a slot's bitmap and 16
    // digests of 64 bytes are 1 026 bytes, so four fit in 4 104 bytes and three in 4 103.
    let wide = Shape {
        slot_count: 4,
        fanout: 16,
        depth: 1,
        digest_width: 64,
        ..Shape::default()
    };
    for (page_bytes, expected) in [(4104, vec![4]), (4103, vec![3, 1])] {
        let pages = digest_pages(
            wide,
            Config {
                wire_digest_width: 64,
                page_bytes,
                ..v2.clone()
            },
        );
        let buckets: Vec<u32> = pages.iter().filter(|p| p.0 == 2).map(|p| p.1).collect();
        assert_eq!(buckets, expected, "{page_bytes} bytes: {pages:?}");
    }
}

/// The in-memory driver stops a sync at its step bound, counted from where each call began, and
/// a later call takes the sync on from there.
#[test]
fn the_in_memory_driver_stops_at_its_step_bound_and_resumes() {
    let shape = Shape::default();
    let (a, b) = (model(shape, 1), model(shape, 1));
    put(
        &a,
        0,
        (0..50).map(|i| prop(&format!("e{i}"), 1, "a", 0)).collect(),
    );
    put(
        &b,
        0,
        (0..50).map(|i| prop(&format!("e{i}"), 2, "b", 0)).collect(),
    );
    let mut pair = Pair::new(&a, &b, GROUP, 0, Config::default()).expect("pair");
    assert!(matches!(
        pair.drive_bounded(1),
        Err(PairError::Stalled { steps: 1 })
    ));
    assert!(matches!(
        pair.drive_bounded(2),
        Err(PairError::Stalled { steps: 2 })
    ));
    assert_eq!(pair.steps(), 3);
    let (report, _) = pair.drive_bounded(10_000).expect("the rest of the sync");
    assert_eq!(contents(&a, 0), contents(&b, 0));
    // The tree traffic is what went both ways besides the property records.
    assert!(report.record_bytes > 0);
    assert_eq!(
        report.tree_bytes() + report.record_bytes,
        report.bytes_sent + report.bytes_received
    );
}

/// The server's copy changes while the sync runs: by the time the client's newer copy arrives,
/// the server holds a newer one still, which it sends back in answer (the version the client
/// asked for is gone), so the client ends with the newest.
#[test]
fn a_copy_the_server_holds_newer_by_the_time_the_clients_arrives_is_sent_back() {
    use propd_proto::v1::repair_request::Msg;
    use propd_repair::{Client, Server};
    for version in [2, 3] {
        let (a, b) = (model(Shape::default(), 1), model(Shape::default(), 1));
        let base: Vec<_> = (0..50).map(|i| prop(&format!("p{i}"), 1, "v", 0)).collect();
        put(&a, 0, base.clone());
        put(&b, 0, base);
        put(&a, 0, vec![prop("x", 2, "client", 0)]);
        put(&b, 0, vec![prop("x", 1, "server", 0)]);
        let config = Config {
            protocol_version: version,
            ..Config::default()
        };
        let mut client = Client::new(&a, GROUP, 0, config.clone()).expect("client");
        let mut server = Server::new(config).expect("server");
        let mut to_server = std::collections::VecDeque::new();
        let mut written = false;
        for _ in 0..10_000 {
            while let Some(msg) = client.poll_transmit(&a).expect("client sends") {
                to_server.push_back(msg);
            }
            while let Some(msg) = server.poll_transmit(&b).expect("server sends") {
                client.handle(&a, msg).expect("client handles");
                while let Some(msg) = client.poll_transmit(&a).expect("client sends") {
                    to_server.push_back(msg);
                }
            }
            if client.is_done() && server.is_done() {
                break;
            }
            let msg = to_server.pop_front().expect("a stalled sync");
            if !written && matches!(msg.msg, Some(Msg::PropertySync(_))) {
                // A write on the server, between the client's sending and the server's reading.
                put(&b, 0, vec![prop("x", 3, "server-later", 0)]);
                written = true;
            }
            server.handle(&b, msg).expect("server handles");
        }
        assert!(written, "v{version}: the client sent its copy");
        assert!(client.is_done() && server.is_done(), "v{version}");
        let newest = prop("x", 3, "server-later", 0);
        assert!(contents(&a, 0).contains(&newest), "v{version}");
        assert_eq!(contents(&a, 0), contents(&b, 0), "v{version}");
    }
}
