//! Malformed and out-of-order messages, injected at every step of a real sync, are rejected with a
//! protocol error and change nothing on the receiving side.

use propd_merkle::{Property, Shape};
use propd_proto::v1 as pb;
use propd_repair::pair::Pair;
use propd_repair::{Config, SyncError};
use propd_store::ModelStore;

use crate::support::*;

fn stores() -> (ModelStore, ModelStore) {
    let shape = small_shape();
    let (a, b) = (model(shape, 1), model(shape, 1));
    put(
        &a,
        0,
        (0..12)
            .map(|i| prop(&format!("k{i}"), 1 + i % 2, "a", 0))
            .collect(),
    );
    put(
        &b,
        0,
        (6..18).map(|i| prop(&format!("k{i}"), 2, "b", 0)).collect(),
    );
    (a, b)
}

fn config() -> Config {
    Config {
        page_items: 3,
        max_backlog: 3,
        leaf_list_max: 1,
        ..Config::default()
    }
}

fn foreign_copy() -> pb::Property {
    let mut p = propd_repair::property_to_proto(&prop("x", 1, "v", 0));
    p.group = "other".into();
    p
}

fn bad_requests(next: Option<&pb::RepairRequest>) -> Vec<pb::RepairRequest> {
    use pb::repair_request::Msg;
    let mut bad = vec![
        pb::RepairRequest { msg: None },
        pb::RepairRequest {
            msg: Some(Msg::LevelDigests(pb::LevelDigests {
                level: 99,
                last_page: true,
                parents: 1,
                packed: vec![0],
            })),
        },
        pb::RepairRequest {
            msg: Some(Msg::PropertySync(pb::PropertySync {
                properties: vec![foreign_copy()],
            })),
        },
        pb::RepairRequest {
            msg: Some(Msg::PropertyMissing(pb::PropertyMissing {
                nodes: vec![pb::MissingLeaves {
                    level: 99,
                    index: 0,
                    fingerprints: vec![0; 8],
                    ..Default::default()
                }],
            })),
        },
        pb::RepairRequest {
            msg: Some(Msg::TreeStep(pb::TreeStep {
                parents: 99,
                packed: vec![0; 6],
                ..Default::default()
            })),
        },
    ];
    match next {
        Some(pb::RepairRequest {
            msg: Some(Msg::LevelDigests(page)),
        }) if !page.packed.is_empty() => {
            let mut cut = page.clone();
            cut.packed.pop();
            // The page as sent but for its end flag, or naming one parent more than it has
            // (more than the server's frontier holds when it is the level's last page).
            let mut flipped = page.clone();
            flipped.last_page = !page.last_page;
            let mut more = page.clone();
            more.parents += 1;
            for page in [cut, flipped, more] {
                bad.push(pb::RepairRequest {
                    msg: Some(Msg::LevelDigests(page)),
                });
            }
        }
        Some(pb::RepairRequest {
            msg: Some(Msg::TreeStep(page)),
        }) => {
            let mut cut = page.clone();
            cut.packed.pop();
            bad.push(pb::RepairRequest {
                msg: Some(Msg::TreeStep(cut)),
            });
            // The first parent's `differ` bitmap with every bit set: the verdicts, expansions
            // and checks it implies no longer match the packed bytes (or a bit lies past the
            // children).
            let mut stray = page.clone();
            if let Some(first) = stray.packed.first_mut() {
                *first = 0xff;
                bad.push(pb::RepairRequest {
                    msg: Some(Msg::TreeStep(stray)),
                });
            }
        }
        _ => {}
    }
    bad
}

fn bad_responses() -> Vec<pb::RepairResponse> {
    use pb::repair_response::Msg;
    vec![
        pb::RepairResponse { msg: None },
        pb::RepairResponse {
            msg: Some(Msg::LevelDiff(pb::LevelDiff {
                level: 99,
                last_page: true,
                packed: vec![],
            })),
        },
        pb::RepairResponse {
            msg: Some(Msg::DifferTreeSummary(pb::DifferTreeSummary {
                nodes: vec![pb::NodeLeaves {
                    level: 99,
                    index: 0,
                    exists: true,
                    fingerprints: vec![0; 8],
                    more: false,
                    ..Default::default()
                }],
            })),
        },
        pb::RepairResponse {
            msg: Some(Msg::PropertySync(pb::PropertySync {
                properties: vec![foreign_copy()],
            })),
        },
        pb::RepairResponse {
            msg: Some(Msg::BulkSync(pb::PropertySync {
                properties: vec![foreign_copy()],
            })),
        },
        pb::RepairResponse {
            msg: Some(Msg::TreeStep(pb::TreeStep {
                parents: 99,
                packed: vec![0; 6],
                ..Default::default()
            })),
        },
    ]
}

fn snapshot(store: &ModelStore) -> (Vec<Property>, Option<Vec<u8>>) {
    (contents(store, 0), root(store, 0))
}

/// Steps in a clean run, so that every phase gets an injection.
fn clean_steps(config: Config) -> usize {
    let (a, b) = stores();
    let mut pair = Pair::new(&a, &b, GROUP, 0, config).expect("pair");
    pair.drive_bounded(10_000).expect("clean sync");
    pair.steps()
}

#[test]
fn the_server_rejects_bad_messages_at_every_step_and_changes_nothing() {
    // Version 2's level pages and version 3's steps each get their bad variants.
    let versions = [2, 3].map(|version| Config {
        protocol_version: version,
        ..config()
    });
    for config in versions {
        let steps = clean_steps(config.clone());
        assert!(
            steps > 8,
            "the clean run should have several phases, took {steps} steps"
        );
        for at in 0..steps {
            for index in 0..9 {
                let (a, b) = stores();
                let mut pair = Pair::new(&a, &b, GROUP, 0, config.clone()).expect("pair");
                for _ in 0..at {
                    pair.step().expect("clean prefix");
                }
                if pair.is_finished() {
                    continue;
                }
                let bad = bad_requests(pair.to_server.front());
                let Some(msg) = bad.into_iter().nth(index) else {
                    continue;
                };
                let before = snapshot(&b);
                let result = pair.server.handle(&b, msg.clone());
                assert!(
                    matches!(result, Err(SyncError::Protocol(_))),
                    "step {at}, {msg:?}: {result:?}"
                );
                assert!(pair.server.is_failed());
                assert_eq!(
                    pair.server
                        .poll_transmit(&b)
                        .expect("failed server is quiet"),
                    None
                );
                // Whatever the client still sends is ignored: nothing more is applied.
                while let Some(next) = pair.to_server.pop_front() {
                    pair.server.handle(&b, next).expect("ignored after failure");
                }
                assert_eq!(snapshot(&b), before, "step {at}, {msg:?}");
            }
        }
    }
}

#[test]
fn the_client_rejects_bad_messages_at_every_step_and_changes_nothing() {
    let steps = clean_steps(config());
    for at in 0..steps {
        for msg in bad_responses() {
            let (a, b) = stores();
            let mut pair = Pair::new(&a, &b, GROUP, 0, config()).expect("pair");
            for _ in 0..at {
                pair.step().expect("clean prefix");
            }
            let before = snapshot(&a);
            let result = pair.client.handle(&a, msg.clone());
            assert!(
                matches!(result, Err(SyncError::Protocol(_))),
                "step {at}, {msg:?}: {result:?}"
            );
            assert!(pair.client.is_failed());
            assert_eq!(
                pair.client
                    .poll_transmit(&a)
                    .expect("failed client is quiet"),
                None
            );
            while let Some(next) = pair.to_client.pop_front() {
                pair.client.handle(&a, next).expect("ignored after failure");
            }
            assert_eq!(snapshot(&a), before, "step {at}, {msg:?}");
        }
    }
}

#[test]
fn out_of_order_messages_are_named_in_the_error() {
    let (a, b) = stores();
    let mut pair = Pair::new(&a, &b, GROUP, 0, config()).expect("pair");
    let early_end = pb::RepairRequest {
        msg: Some(pb::repair_request::Msg::NoMorePropertySync(
            pb::NoMorePropertySync {},
        )),
    };
    let err = pair
        .server
        .handle(&b, early_end)
        .expect_err("NoMore before TreeRoot");
    assert_eq!(
        err.to_string(),
        "unexpected NoMorePropertySync while awaiting TreeRoot"
    );
    let early_sync_end = pb::RepairResponse {
        msg: Some(pb::repair_response::Msg::SyncEnd(pb::SyncEnd {
            applied: 0,
            failed: 0,
        })),
    };
    let err = pair
        .client
        .handle(&a, early_sync_end)
        .expect_err("SyncEnd before RootCompare");
    assert_eq!(
        err.to_string(),
        "unexpected SyncEnd while awaiting RootCompare"
    );
    let _ = Shape::default();
}

/// Copies the client's sync does not take are refused at every step, even an empty page: a
/// preview exchanges no copies, and bulk copies exist from protocol version 2 on.
#[test]
fn the_client_refuses_pages_its_sync_does_not_take_even_empty_ones() {
    use pb::repair_response::Msg;
    let cases = [
        (
            Config {
                preview: true,
                ..config()
            },
            Msg::PropertySync(pb::PropertySync::default()),
        ),
        (
            Config {
                preview: true,
                ..config()
            },
            Msg::BulkSync(pb::PropertySync::default()),
        ),
        (
            Config {
                protocol_version: 1,
                ..config()
            },
            Msg::BulkSync(pb::PropertySync::default()),
        ),
    ];
    for (config, msg) in cases {
        let (a, b) = stores();
        let steps = {
            let mut pair = Pair::new(&a, &b, GROUP, 0, config.clone()).expect("pair");
            pair.drive_bounded(10_000).expect("clean sync");
            pair.steps()
        };
        for at in 0..steps {
            let (a, b) = stores();
            let mut pair = Pair::new(&a, &b, GROUP, 0, config.clone()).expect("pair");
            for _ in 0..at {
                pair.step().expect("clean prefix");
            }
            if pair.is_finished() {
                continue;
            }
            let before = snapshot(&a);
            let msg = pb::RepairResponse {
                msg: Some(msg.clone()),
            };
            let result = pair.client.handle(&a, msg.clone());
            assert!(
                matches!(result, Err(SyncError::Protocol(_))),
                "step {at}, {msg:?}: {result:?}"
            );
            assert!(pair.client.is_failed());
            assert_eq!(snapshot(&a), before);
        }
    }
}

/// A server may answer "the whole shard comes as a stream" only to an empty client in a sync
/// that streams (version 2 or later, not a preview): a client that holds data would otherwise
/// skip the descent and never send what only it has.
#[test]
fn only_an_empty_client_of_a_streaming_sync_takes_a_whole_shard_answer() {
    use pb::repair_response::Msg;
    let whole = |protocol_version| pb::RepairResponse {
        msg: Some(Msg::RootCompare(pb::RootCompare {
            tree_found: true,
            shape_ok: true,
            root_match: false,
            whole_shard: true,
            protocol_version,
            leaf_count: 12,
            ..pb::RootCompare::default()
        })),
    };
    let (held, server) = stores();
    let empty = model(small_shape(), 1);
    let preview = Config {
        preview: true,
        ..config()
    };
    let first = Config {
        protocol_version: 1,
        ..config()
    };
    for (name, client, config, version, taken) in [
        ("an empty client", &empty, config(), 3, true),
        ("a client with data", &held, config(), 3, false),
        ("an empty client's preview", &empty, preview, 3, false),
        ("an empty client at version 1", &empty, first, 1, false),
    ] {
        let mut pair = Pair::new(client, &server, GROUP, 0, config).expect("pair");
        pair.client
            .poll_transmit(client)
            .expect("the first message")
            .expect("the root digest");
        let result = pair.client.handle(client, whole(version));
        assert_eq!(result.is_ok(), taken, "{name}: {result:?}");
    }
}

/// A leaf list that contradicts itself is refused: a node said not to exist yet with
/// fingerprints or more chunks, and (from version 2) a chunk end given without more chunks or
/// more chunks without their end. Each is a real list of a clean sync, altered.
#[test]
fn the_client_refuses_a_leaf_list_that_contradicts_itself() {
    use pb::repair_response::Msg;
    type Alter = fn(&mut pb::NodeLeaves);
    let alterations: [(&str, Alter); 4] = [
        ("absent, with fingerprints", |node| node.exists = false),
        ("absent, with more", |node| {
            node.exists = false;
            node.fingerprints.clear();
            node.more = true;
        }),
        ("an end without more", |node| {
            node.more = false;
            node.until = vec![0; 8];
        }),
        ("more without an end", |node| {
            node.more = true;
            node.until.clear();
        }),
    ];
    let config = Config {
        protocol_version: 2,
        ..config()
    };
    for (name, alter) in alterations {
        let (a, b) = stores();
        let mut pair = Pair::new(&a, &b, GROUP, 0, config.clone()).expect("pair");
        // Run the clean sync, message by message, until the server sends a list with
        // fingerprints.
        let mut list = None;
        for _ in 0..1000 {
            if let Some(request) = pair.client.poll_transmit(&a).expect("client") {
                pair.server.handle(&b, request).expect("server");
            }
            while let Some(response) = pair.server.poll_transmit(&b).expect("server") {
                match response.msg {
                    Some(Msg::DifferTreeSummary(summary))
                        if summary
                            .nodes
                            .first()
                            .is_some_and(|n| !n.fingerprints.is_empty()) =>
                    {
                        list = Some(summary);
                        break;
                    }
                    _ => pair.client.handle(&a, response).expect("client"),
                }
            }
            if list.is_some() {
                break;
            }
        }
        let mut bad = list.expect("a list with fingerprints");
        if let Some(node) = bad.nodes.first_mut() {
            alter(node);
        }
        let result = pair.client.handle(
            &a,
            pb::RepairResponse {
                msg: Some(Msg::DifferTreeSummary(bad)),
            },
        );
        assert!(
            matches!(result, Err(SyncError::Protocol(_))),
            "{name}: {result:?}"
        );
    }
}

/// Steps `pair` until the client's next message to the server is of the kind `is` picks, and
/// returns that message (the server has not read it).
fn next_of_kind(
    pair: &mut Pair<'_, ModelStore, ModelStore>,
    is: impl Fn(&pb::repair_request::Msg) -> bool,
) -> pb::RepairRequest {
    for _ in 0..1_000 {
        if let Some(msg) = pair.to_server.front()
            && msg.msg.as_ref().is_some_and(&is)
        {
            return msg.clone();
        }
        pair.step().expect("clean sync");
    }
    panic!("no such message in the sync");
}

/// Each version's descent message is refused by a server of the other version's descent, even
/// well formed: a version 2 sync takes level pages only, a version 3 sync steps only.
#[test]
fn a_well_formed_descent_message_of_the_other_version_is_refused() {
    use pb::repair_request::Msg;
    let (a, b) = stores();
    let v2 = Config {
        protocol_version: 2,
        ..config()
    };
    let v3 = Config {
        protocol_version: 3,
        ..config()
    };
    let mut old = Pair::new(&a, &b, GROUP, 0, v2).expect("pair");
    let level = next_of_kind(&mut old, |m| matches!(m, Msg::LevelDigests(_)));
    let mut new = Pair::new(&a, &b, GROUP, 0, v3).expect("pair");
    let step = next_of_kind(&mut new, |m| matches!(m, Msg::TreeStep(_)));
    let before = snapshot(&b);
    for (pair, msg, kind) in [
        (&mut new, level, "LevelDigests"),
        (&mut old, step, "TreeStep"),
    ] {
        let err = pair.server.handle(&b, msg).expect_err("refused");
        assert_eq!(
            err.to_string(),
            format!("unexpected {kind} while answering the descent")
        );
        assert!(pair.server.is_failed());
    }
    assert_eq!(snapshot(&b), before);
}

/// Messages a server takes only at some point of its descent are refused at another, even well
/// formed: copies and requests in a preview (which exchanges none), a level page once the levels
/// are done, and the client's end while the server still awaits its digests.
#[test]
fn a_well_formed_message_at_the_wrong_point_of_the_descent_is_refused() {
    use pb::repair_request::Msg;
    let (a, b) = stores();
    let v2 = Config {
        protocol_version: 2,
        ..config()
    };
    let before = snapshot(&b);
    let expect_refused = |pair: &mut Pair<'_, ModelStore, ModelStore>, msg, kind: &str| {
        let err = pair.server.handle(&b, msg).expect_err("refused");
        assert_eq!(
            err.to_string(),
            format!("unexpected {kind} while answering the descent")
        );
        assert!(pair.server.is_failed());
    };

    // A sync's copies and requests, then the same stores' preview at the same point.
    let mut sync = Pair::new(&a, &b, GROUP, 0, v2.clone()).expect("pair");
    let level = next_of_kind(&mut sync, |m| matches!(m, Msg::LevelDigests(_)));
    let copies = next_of_kind(&mut sync, |m| matches!(m, Msg::PropertySync(_)));
    let (a2, b2) = stores();
    let mut other = Pair::new(&a2, &b2, GROUP, 0, v2.clone()).expect("pair");
    let missing = next_of_kind(&mut other, |m| matches!(m, Msg::PropertyMissing(_)));
    for (msg, kind) in [(copies, "PropertySync"), (missing, "PropertyMissing")] {
        let preview = Config {
            preview: true,
            ..v2.clone()
        };
        let mut pair = Pair::new(&a, &b, GROUP, 0, preview).expect("pair");
        next_of_kind(&mut pair, |m| matches!(m, Msg::LevelDigests(_)));
        expect_refused(&mut pair, msg, kind);
    }

    // A level page once the client has gone past the levels.
    let mut pair = Pair::new(&a, &b, GROUP, 0, v2.clone()).expect("pair");
    next_of_kind(&mut pair, |m| {
        matches!(m, Msg::PropertyMissing(_) | Msg::NoMorePropertySync(_))
    });
    expect_refused(&mut pair, level, "LevelDigests");

    // The client's end while the server awaits the first level's digests.
    let mut pair = Pair::new(&a, &b, GROUP, 0, v2).expect("pair");
    next_of_kind(&mut pair, |m| matches!(m, Msg::LevelDigests(_)));
    let end = pb::RepairRequest {
        msg: Some(Msg::NoMorePropertySync(pb::NoMorePropertySync {})),
    };
    expect_refused(&mut pair, end, "NoMorePropertySync");
    assert_eq!(snapshot(&b), before);
}
