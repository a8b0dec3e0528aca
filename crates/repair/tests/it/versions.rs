//! Protocol version 3 (the alternating descent): its round trips, counted by the client and
//! checked against a lockstep run that delivers each side's messages one flight at a time; its
//! interplay with version-2 peers; and the refusal of a peer below a node's minimum version.

use propd_merkle::{Property, Shape};
use propd_repair::pair::{Pair, PairError, sync_in_memory};
use propd_repair::{Config, SyncError, SyncReport};
use propd_store::{ModelStore, RepairStore};

use crate::support::*;

/// Two stores of `n` equal properties, then `d` differences spread over the keys in four kinds
/// by turn: the client's copy newer, the server's newer, only on the client, only on the server.
fn diverged(shape: Shape, n: usize, d: usize) -> (ModelStore, ModelStore) {
    let (a, b) = (model(shape, 1), model(shape, 1));
    let base: Vec<Property> = (0..n)
        .map(|i| prop(&format!("e{i:06}"), 1, "x", 0))
        .collect();
    put(&a, 0, base.clone());
    put(&b, 0, base);
    for k in 0..d {
        differ(&a, &b, &format!("e{:06}", k * (n / d.max(1))), k % 4);
    }
    (a, b)
}

/// One difference at `id` of the `kind`-th kind of [`diverged`].
fn differ(a: &ModelStore, b: &ModelStore, id: &str, kind: usize) {
    match kind {
        0 => put(a, 0, vec![prop(id, 2, "client", 0)]),
        1 => put(b, 0, vec![prop(id, 2, "server", 0)]),
        2 => put(a, 0, vec![prop(&format!("{id}-c"), 1, "only", 0)]),
        _ => put(b, 0, vec![prop(&format!("{id}-s"), 1, "only", 0)]),
    }
}

type MakeConfig = fn(u32) -> Config;

fn version(protocol_version: u32) -> Config {
    Config {
        protocol_version,
        ..Config::default()
    }
}

/// Descends to the buckets wherever digests differ, as in a shard of millions (where every
/// node above a bucket holds more than `leaf_list_max` leaves).
fn deep(protocol_version: u32) -> Config {
    Config {
        leaf_list_max: 0,
        ..version(protocol_version)
    }
}

/// Runs a sync in lockstep flights, as over a link whose latency dwarfs everything else: each
/// side sends everything it can, then the peer takes the whole flight in (the server answers
/// each message fully before reading the next, as its driver does). Returns the client's report
/// and the number of one-way flights until the client is done.
fn lockstep(a: &ModelStore, b: &ModelStore, client: Config, server: Config) -> (SyncReport, u32) {
    let mut pair = Pair::with_configs(a, b, GROUP, 0, client, server).expect("pair");
    let mut flights = 0u32;
    let mut to_server = Vec::new();
    while let Some(msg) = pair.client.poll_transmit(a).expect("client") {
        to_server.push(msg);
    }
    while !pair.client.is_done() {
        assert!(flights < 1000, "no end after {flights} flights");
        flights += 1;
        let mut to_client = Vec::new();
        for msg in to_server.drain(..) {
            pair.server.handle(b, msg).expect("server");
            while let Some(out) = pair.server.poll_transmit(b).expect("server") {
                to_client.push(out);
            }
        }
        flights += 1;
        for msg in to_client {
            pair.client.handle(a, msg).expect("client");
        }
        while let Some(msg) = pair.client.poll_transmit(a).expect("client") {
            to_server.push(msg);
        }
    }
    (pair.client.report().clone(), flights)
}

#[test]
fn the_in_sync_check_is_one_round_trip_under_512_bytes() {
    let (a, b) = diverged(Shape::default(), 5000, 0);
    let (report, flights) = lockstep(&a, &b, Config::default(), Config::default());
    assert!(report.in_sync);
    assert_eq!((report.round_trips, flights), (1, 2));
    let bytes = report.bytes_sent + report.bytes_received;
    assert!(bytes < 512, "{bytes} bytes");
}

#[test]
fn one_difference_takes_three_round_trips_at_version_3_and_six_at_version_2() {
    // The default shape: root, 32 slots, three bucket levels, leaves. Version 3 descends one
    // level per half round trip from the slots sent with the root: the server compares the
    // slots, the client level 2, the server level 3 (sending the buckets' digests with the
    // short fingerprints of their leaves), the client the buckets and their leaves (its copy,
    // its check and NoMorePropertySync); the server sends its copy and ends.
    for (protocol_version, round_trips) in [(3, 3), (2, 6)] {
        let (a, b) = diverged(Shape::default(), 2000, 1);
        let (report, flights) = lockstep(&a, &b, deep(protocol_version), deep(protocol_version));
        assert_eq!(contents(&a, 0), contents(&b, 0));
        assert_eq!(report.protocol_version, protocol_version);
        assert_eq!(
            (report.round_trips, flights.div_ceil(2), report.rechecked),
            (round_trips, round_trips, 0),
            "version {protocol_version}: {report:?}"
        );
    }
}

#[test]
fn one_difference_of_each_kind_takes_at_most_three_round_trips_in_every_shape() {
    // Each kind alone (client newer, server newer, only on the client, only on the server), in
    // shapes of every parity of depth and with early listing on or off.
    let shapes = [
        Shape::default(),
        small_shape(),
        Shape::reference(),
        Shape {
            depth: 2,
            ..Shape::default()
        },
        Shape {
            depth: 1,
            ..Shape::default()
        },
    ];
    for shape in shapes {
        for kind in 0..4 {
            for config in [deep(3), version(3)] {
                let (a, b) = diverged(shape, 1200, 0);
                differ(&a, &b, "e000777", kind);
                let expected = merged(&contents(&a, 0), &contents(&b, 0), &shape);
                let (report, flights) = lockstep(&a, &b, config.clone(), config);
                assert_eq!(contents(&a, 0), expected);
                assert_eq!(contents(&b, 0), expected);
                assert_eq!(report.round_trips, flights.div_ceil(2));
                assert!(report.round_trips <= 3, "{shape:?} kind {kind}: {report:?}");
            }
        }
    }
}

#[test]
fn buckets_too_full_to_hint_cost_half_a_round_trip_more_not_their_hints() {
    // Depth 1: the server's first step expands slots whose children are buckets. 1 200
    // properties put about 37 leaves under a slot: their hints fit the step's budget and one
    // difference takes two round trips. 12 000 put about 375 leaves under a slot, whose hints
    // (over 560 B) would cost more than the level they skip: the step goes without them, the
    // client descends to the buckets itself, and the sync takes one round trip more.
    let shape = Shape {
        depth: 1,
        ..Shape::default()
    };
    let mut seen = Vec::new();
    for n in [1_200, 12_000] {
        let (a, b) = diverged(shape, n, 1);
        let expected = merged(&contents(&a, 0), &contents(&b, 0), &shape);
        let (report, flights) = lockstep(&a, &b, deep(3), deep(3));
        assert_eq!(contents(&a, 0), expected, "n = {n}");
        assert_eq!(contents(&b, 0), expected, "n = {n}");
        assert_eq!(report.round_trips, flights.div_ceil(2));
        seen.push(report.round_trips);
    }
    assert_eq!(seen, [2, 3], "hinted at 1 200, not at 12 000");
}

/// A property of `id` whose leaf shares the 12 low fingerprint bits of `other`'s leaf but
/// differs from it (found by trying tag values).
fn short_collision(id: &str, revision: i64, other: &Property, shape: &Shape) -> Property {
    let fp = |p: &Property| {
        let mut word = [0u8; 8];
        word.copy_from_slice(&p.leaf_digest(shape).as_bytes()[..8]);
        u64::from_le_bytes(word)
    };
    let target = fp(other) & 0xfff;
    (0..1_000_000)
        .map(|k| prop(id, revision, &format!("c{k}"), 0))
        .find(|p| fp(p) & 0xfff == target && fp(p) != fp(other))
        .expect("a 12-bit collision within a million tries")
}

#[test]
fn a_short_fingerprint_collision_falls_back_to_the_full_list_and_loses_nothing() {
    // The same entity in two versions whose leaves share their short fingerprint: the client
    // matches its leaf to the server's by the hint, the server's check of the full fingerprints
    // fails, and every hinted bucket is listed in full: one round trip more, both converge.
    let shape = Shape::default();
    for client_newer in [true, false] {
        let (a, b) = diverged(shape, 2000, 0);
        // Both newer than the common version (revision 1).
        let (ours, theirs) = if client_newer { (3, 2) } else { (2, 3) };
        let server = prop("e000777", theirs, "server", 0);
        let client = short_collision("e000777", ours, &server, &shape);
        put(&a, 0, vec![client.clone()]);
        put(&b, 0, vec![server.clone()]);
        let (report, flights) = lockstep(&a, &b, deep(3), deep(3));
        assert_eq!(contents(&a, 0), contents(&b, 0));
        let winner = if client_newer { &client } else { &server };
        assert!(contents(&b, 0).contains(winner));
        assert_eq!(
            (report.rechecked, report.round_trips, flights.div_ceil(2)),
            (1, 4, 4),
            "{report:?}"
        );
        // The server counts the hinted buckets it listed again (at least the one that differs).
        let (a, b) = diverged(shape, 2000, 0);
        put(&a, 0, vec![client.clone()]);
        put(&b, 0, vec![server.clone()]);
        let (_, served) = sync_in_memory(&a, &b, GROUP, 0, deep(3)).expect("sync");
        assert!(served.rechecked >= 1, "{served:?}");
    }
    // Two entities of one bucket, one only on each side, sharing their short fingerprint: the
    // client takes them for one leaf until the server's check. (A shape of few buckets, whose
    // slots are the buckets' parents: the server hints them in its first step.)
    let few = Shape {
        slot_count: 4,
        fanout: 2,
        depth: 1,
        ..Shape::default()
    };
    let fp = |p: &Property| {
        let mut word = [0u8; 8];
        word.copy_from_slice(&p.leaf_digest(&few).as_bytes()[..8]);
        u64::from_le_bytes(word)
    };
    let (a, b) = diverged(few, 300, 0);
    let server = prop("s-only", 1, "x", 0);
    let bucket = few.bucket_of(&server.entity().expect("entity"));
    let client = (0..10_000_000)
        .map(|k| prop(&format!("c-only-{k}"), 1, "x", 0))
        .find(|p| {
            fp(p) & 0xfff == fp(&server) & 0xfff
                && few.bucket_of(&p.entity().expect("entity")) == bucket
        })
        .expect("an entity of the same bucket with a colliding short fingerprint");
    put(&a, 0, vec![client]);
    put(&b, 0, vec![server]);
    let expected = merged(&contents(&a, 0), &contents(&b, 0), &few);
    let (report, _) = lockstep(&a, &b, deep(3), deep(3));
    assert_eq!(contents(&a, 0), expected);
    assert_eq!(contents(&b, 0), expected);
    assert_eq!(report.rechecked, 1, "{report:?}");
}

/// A bucket settled by the server's hints among many matching leaves: the client compares each
/// of its leaves there and each hinted server leaf none of its own matched, and requests only
/// those: one, whichever side lacks or holds the older copy.
#[test]
fn a_hinted_bucket_of_many_leaves_requests_only_the_unmatched_ones() {
    // Eight buckets under four slots (the slots are the buckets' parents: the server hints them
    // in its first step); 300 properties put about 37 leaves in each.
    let few = Shape {
        slot_count: 4,
        fanout: 2,
        depth: 1,
        ..Shape::default()
    };
    for kind in [1, 3] {
        let (a, b) = diverged(few, 300, 0);
        differ(&a, &b, "e000000", kind);
        let id = if kind == 1 { "e000000" } else { "e000000-s" };
        let entity = prop(id, 1, "x", 0).entity().expect("entity");
        let bucket = few.bucket_of(&entity);
        let ours = a
            .leaves_under(GROUP, 0, bucket, None, 1000)
            .expect("client leaves")
            .len() as u64;
        assert!(ours >= 10, "the bucket holds {ours} leaves of the client");
        let expected = merged(&contents(&a, 0), &contents(&b, 0), &few);
        let (report, _) = lockstep(&a, &b, deep(3), deep(3));
        assert_eq!(contents(&a, 0), expected);
        assert_eq!(contents(&b, 0), expected);
        // Kind 1: the server's newer copy is unmatched and the client's older one unmatched too
        // (sent, the server keeps its own); kind 3: only the server holds the entity.
        let sent = if kind == 1 { 1 } else { 0 };
        assert_eq!(
            (report.compared, report.requested, report.sent),
            (ours + 1, 1, sent),
            "kind {kind}: {report:?}"
        );
    }
}

/// A bucket as large as hints go (255 leaves) is matched by them on the client too, whatever
/// its page size: a client of small pages still reads up to 256 leaves of a hinted bucket.
#[test]
fn a_hinted_bucket_of_the_largest_hinted_size_is_matched_by_a_client_of_small_pages() {
    // One slot over two buckets: the server's first step expands the slot and hints both.
    let two = Shape {
        slot_count: 1,
        fanout: 2,
        depth: 1,
        ..Shape::default()
    };
    let bucket_of = |id: &str| two.bucket_of(&prop(id, 1, "x", 0).entity().expect("entity"));
    let first = bucket_of("e0");
    // 255 entities of the first bucket, 10 of the other (the hints' bits stay within budget).
    let (mut large, mut small) = (Vec::new(), Vec::new());
    for i in 0.. {
        if large.len() == 255 && small.len() == 10 {
            break;
        }
        let id = format!("e{i}");
        if bucket_of(&id) == first {
            if large.len() < 255 {
                large.push(id);
            }
        } else if small.len() < 10 {
            small.push(id);
        }
    }
    let (a, b) = (model(two, 1), model(two, 1));
    let base: Vec<Property> = large
        .iter()
        .chain(&small)
        .map(|id| prop(id, 1, "x", 0))
        .collect();
    put(&a, 0, base.clone());
    put(&b, 0, base);
    differ(&a, &b, "e0", 1);
    let leaves = a.leaves_under(GROUP, 0, first, None, 1000).expect("leaves");
    assert_eq!(leaves.len(), 255);
    let expected = merged(&contents(&a, 0), &contents(&b, 0), &two);
    let small = Config {
        page_items: 64,
        ..deep(3)
    };
    let (report, _) = lockstep(&a, &b, small, deep(3));
    assert_eq!(contents(&a, 0), expected);
    assert_eq!(contents(&b, 0), expected);
    assert_eq!(
        (
            report.compared,
            report.requested,
            report.sent,
            report.round_trips
        ),
        (256, 1, 1, 2),
        "{report:?}"
    );
}

/// The server hints buckets only while the sync has expanded few nodes: its hinted step comes
/// after its expansion of the differing slots, and both count. Four differences in four slots
/// expand 4 + 4 nodes (hinted: three round trips in the default shape); five expand 5 + 5, past
/// the eight that hints pay for (four round trips: the client descends to the buckets itself).
#[test]
fn hints_stop_once_the_syncs_expansions_pass_eight() {
    let mut seen = Vec::new();
    for d in [4, 5] {
        let (a, b) = diverged(Shape::default(), 2000, d);
        let expected = merged(&contents(&a, 0), &contents(&b, 0), &Shape::default());
        let (report, _) = lockstep(&a, &b, deep(3), deep(3));
        assert_eq!(contents(&a, 0), expected, "d = {d}");
        assert_eq!(contents(&b, 0), expected, "d = {d}");
        seen.push(report.round_trips);
    }
    assert_eq!(seen, [3, 4], "hinted with 4 differences, not with 5");
}

#[test]
fn the_counted_round_trips_match_a_lockstep_run() {
    for shape in [Shape::default(), small_shape()] {
        let sides: [(usize, MakeConfig); 4] =
            [(1, deep), (10, version), (100, deep), (300, version)];
        for (d, config) in sides {
            for protocol_version in [1, 2, 3] {
                let (a, b) = diverged(shape, 1500, d);
                let expected = merged(&contents(&a, 0), &contents(&b, 0), &shape);
                let config = config(protocol_version);
                let (report, flights) = lockstep(&a, &b, config.clone(), config);
                assert_eq!(contents(&a, 0), expected);
                assert_eq!(contents(&b, 0), expected);
                assert_eq!(
                    report.round_trips,
                    flights.div_ceil(2),
                    "{shape:?} d = {d} version {protocol_version}: {report:?}"
                );
            }
        }
    }
}

#[test]
fn version_3_and_version_2_peers_sync_at_version_2_in_either_role() {
    for (client, server) in [(3, 2), (2, 3)] {
        let (a, b) = diverged(Shape::default(), 3000, 40);
        let expected = merged(&contents(&a, 0), &contents(&b, 0), &Shape::default());
        let (report, served) =
            Pair::with_configs(&a, &b, GROUP, 0, version(client), version(server))
                .expect("pair")
                .drive_bounded(1_000_000)
                .expect("sync");
        assert_eq!((report.protocol_version, served.protocol_version), (2, 2));
        assert_eq!(contents(&a, 0), expected);
        assert_eq!(contents(&b, 0), expected);
    }
}

#[test]
fn a_peer_below_the_minimum_version_is_refused_naming_both_versions() {
    let strict = Config {
        min_protocol_version: 3,
        ..Config::default()
    };
    // This node as the client: the server answers at version 2.
    let (a, b) = diverged(Shape::default(), 500, 3);
    let (before_a, before_b) = (contents(&a, 0), contents(&b, 0));
    let err = Pair::with_configs(&a, &b, GROUP, 0, strict.clone(), version(2))
        .expect("pair")
        .drive_bounded(1000)
        .expect_err("refused");
    assert!(
        matches!(
            err,
            PairError::Client(SyncError::UnsupportedVersion {
                peer: 2,
                min: 3,
                max: 3
            })
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "client: the peer speaks protocol version 2 at most, this node speaks versions 3..=3"
    );
    // This node as the server: a version-2 client is refused at the root compare.
    let err = Pair::with_configs(&a, &b, GROUP, 0, version(2), strict)
        .expect("pair")
        .drive_bounded(1000)
        .expect_err("refused");
    match &err {
        PairError::Client(SyncError::Refused { reason }) => assert_eq!(
            reason,
            "the client speaks protocol version 2 at most, this node speaks versions 3..=3"
        ),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!((contents(&a, 0), contents(&b, 0)), (before_a, before_b));
    // The same nodes with the default minimum sync.
    let (report, _) = sync_in_memory(&a, &b, GROUP, 0, version(2)).expect("sync");
    assert_eq!(report.protocol_version, 2);
}

#[test]
fn an_empty_client_previews_and_syncs_at_version_3() {
    // An empty client sends an empty expansion of the root; in preview the server descends from
    // its slots and lists them (found by the repair_client fuzz target: the server failed on
    // missing slots).
    let (_, b) = diverged(Shape::default(), 300, 0);
    let a = model(Shape::default(), 1);
    let preview = Config {
        preview: true,
        ..version(3)
    };
    let (report, _) = sync_in_memory(&a, &b, GROUP, 0, preview).expect("preview");
    assert_eq!((report.protocol_version, report.requested), (3, 300));
    assert!(contents(&a, 0).is_empty());
    let (report, _) = sync_in_memory(&a, &b, GROUP, 0, version(3)).expect("sync");
    assert_eq!(report.streamed, 300);
    assert_eq!(contents(&a, 0), contents(&b, 0));
}

/// The report of a version 3 sync accounts its traffic by tree level: the client sends the root
/// and the slots (levels 0 and 1 go out with the root), then its steps at levels 2 and 4, and
/// receives the server's steps, which answer its expansions one level down (levels 1 and 3), with
/// the digests they carry counted at the level of the nodes they describe.
#[test]
fn a_version_3_report_counts_each_levels_traffic_where_it_happened() {
    let (a, b) = diverged(Shape::default(), 2000, 1);
    let (report, _) = lockstep(&a, &b, deep(3), deep(3));
    let received: Vec<bool> = report.levels.iter().map(|l| l.bytes_received > 0).collect();
    let sent: Vec<bool> = report.levels.iter().map(|l| l.bytes_sent > 0).collect();
    assert_eq!(
        received,
        [true, true, false, true, false, false],
        "{report:?}"
    );
    assert_eq!(sent, [true, false, true, false, true, false], "{report:?}");
    // The slots sent with the root, then the 16 children of the differing slot received.
    assert_eq!(
        (report.levels[1].digests, report.levels[2].digests),
        (32, 16)
    );
    assert!(
        report.levels[3].digests > 0,
        "the client's expansion of level 2"
    );
    assert!(
        report.levels[4].digests > 0,
        "the buckets the server expanded"
    );
    // The client settled the differing bucket by the server's hints: it compared its one leaf
    // there (sent, the client's copy is newer) and the server's unmatched one (requested).
    assert_eq!(
        (report.compared, report.sent, report.requested),
        (2, 1, 1),
        "{report:?}"
    );
}

/// Version 2's server answers a level page with exactly the children that differ: one
/// difference among 2 000 properties (one entity newer on either side) is followed down one
/// path, level by level, to its bucket: the client sends the present children of one parent a
/// level (32 slots, then 14, 2 and 1 children there), one fingerprint of its bucket's leaf, and
/// asks for the server's one.
#[test]
fn a_version_2_descent_follows_only_the_differing_children() {
    for kind in [0, 1] {
        let (a, b) = (model(Shape::default(), 1), model(Shape::default(), 1));
        let base: Vec<Property> = (0..2000)
            .map(|i| prop(&format!("e{i:06}"), 1, "x", 0))
            .collect();
        put(&a, 0, base.clone());
        put(&b, 0, base);
        differ(&a, &b, "e000777", kind);
        let expected = merged(&contents(&a, 0), &contents(&b, 0), &Shape::default());
        let (report, _) = lockstep(&a, &b, deep(2), deep(2));
        assert_eq!(contents(&a, 0), expected);
        assert_eq!(contents(&b, 0), expected);
        let digests: Vec<u64> = report.levels.iter().map(|l| l.digests).collect();
        let fingerprints: Vec<u64> = report.levels.iter().map(|l| l.fingerprints).collect();
        assert_eq!(
            (
                digests,
                fingerprints,
                report.compared,
                report.sent,
                report.requested
            ),
            (vec![0, 32, 14, 2, 1, 0], vec![0, 0, 0, 0, 1, 1], 2, 1, 1),
            "kind {kind}: {report:?}"
        );
    }
}

/// Version 2 sends each level's digests and answers them with a `LevelDiff`, both counted at
/// that level, and lists
/// the differing bucket's leaves at the bucket level.
#[test]
fn a_version_2_report_counts_each_levels_answer_at_its_level() {
    let (a, b) = diverged(Shape::default(), 2000, 1);
    let (report, _) = lockstep(&a, &b, deep(2), deep(2));
    for level in 1..=3 {
        let traffic = &report.levels[level];
        assert!(
            traffic.bytes_sent > 0 && traffic.bytes_received > 0 && traffic.fingerprints == 0,
            "level {level}: {traffic:?}"
        );
    }
    let bucket = &report.levels[4];
    assert!(
        bucket.fingerprints > 0 && bucket.bytes_received >= 8 * bucket.fingerprints,
        "{bucket:?}"
    );
}
