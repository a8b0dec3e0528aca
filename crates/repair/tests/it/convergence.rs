//! Property tests: two random stores, one sync, identical data and roots, newest copies kept.

use propd_merkle::{Property, Shape};
use propd_repair::Config;
use propd_repair::pair::Pair;
use propd_store::RepairStore;
use proptest::prelude::*;

use crate::support::*;

/// Per entity id 0..24: the copy on the client and the copy on the server, each maybe absent.
fn copies() -> impl Strategy<Value = Vec<(Option<Property>, Option<Property>)>> {
    let copy = (1i64..4, any::<bool>(), 0u8..3).prop_map(|(rev, tomb, v)| (rev, tomb, v));
    proptest::collection::vec(
        (
            proptest::option::of(copy.clone()),
            proptest::option::of(copy),
        ),
        0..24,
    )
    .prop_map(|entities| {
        entities
            .into_iter()
            .enumerate()
            .map(|(i, (a, b))| {
                let make = |c: Option<(i64, bool, u8)>| {
                    c.map(|(rev, tomb, v)| {
                        prop(
                            &format!("e{i}"),
                            rev,
                            &format!("v{v}"),
                            if tomb { rev + 10 } else { 0 },
                        )
                    })
                };
                (make(a), make(b))
            })
            .collect()
    })
}

/// A shape and a config for each side: the limits are shared, the protocol versions drawn per
/// side (a sync runs at the lower one).
fn configs() -> impl Strategy<Value = (Shape, (Config, Config))> {
    let shape = prop_oneof![
        Just(Shape::default()),
        Just(Shape::reference()),
        Just(small_shape())
    ];
    let config = prop_oneof![
        Just(Config::default()),
        Just(tiny_pages()),
        Just(Config {
            leaf_list_max: 3,
            page_items: 5,
            max_backlog: 5,
            ..Config::default()
        })
    ];
    (shape, config, 1u32..=3, 1u32..=3).prop_map(|(shape, config, client, server)| {
        let side = |protocol_version| Config {
            protocol_version,
            ..config.clone()
        };
        (shape, (side(client), side(server)))
    })
}

fn check<A: RepairStore, B: RepairStore>(
    a: &A,
    b: &B,
    data: &[(Option<Property>, Option<Property>)],
    shape: Shape,
    (client, server): (Config, Config),
) {
    let mine: Vec<Property> = data.iter().filter_map(|(x, _)| x.clone()).collect();
    let theirs: Vec<Property> = data.iter().filter_map(|(_, y)| y.clone()).collect();
    put(a, 0, mine.clone());
    put(b, 0, theirs.clone());
    let expected = merged(&mine, &theirs, &shape);
    let version = client.protocol_version.min(server.protocol_version);
    let (report, server) = Pair::with_configs(a, b, GROUP, 0, client, server)
        .expect("pair")
        .drive_bounded(10_000_000)
        .expect("sync");
    assert_eq!(
        (report.protocol_version, server.protocol_version),
        (version, version)
    );
    if version == 1 {
        assert_eq!(report.streamed, 0);
    }
    assert_eq!(contents(a, 0), expected, "client");
    assert_eq!(contents(b, 0), expected, "server");
    assert_eq!(root(a, 0), root(b, 0));
    assert_eq!(report.peer_applied, server.applied);
    assert_eq!((report.failed, server.failed), (0, 0));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn one_sync_between_model_stores_converges(data in copies(), (shape, config) in configs()) {
        check(&model(shape, 1), &model(shape, 1), &data, shape, config);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn one_sync_between_redb_and_model_stores_converges(data in copies(), (shape, config) in configs(), redb_is_client in any::<bool>()) {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = redb(&dir, shape, 1);
        let mem = model(shape, 1);
        if redb_is_client {
            check(&disk, &mem, &data, shape, config);
        } else {
            check(&mem, &disk, &data, shape, config);
        }
    }
}
