//! Deletes stay deleted (docs/protocol.md, "The life of a delete"), over real processes: client
//! times outside the skew bound are refused, a forged complete-round notice is refused and the
//! deletes it would have let go hold when the missing copy returns, a round with failed applies
//! does not enable purging, a copy down longer than the grace rejoins as it is and its stale live
//! versions lose, a single-copy shard purges after the grace, and a write that loses to a newer
//! copy says so.

use std::future::Future;
use std::time::Duration;

use propd_proto::v1;
use propd_proto::v1::admin_service_client::AdminServiceClient;
use propd_proto::v1::property_service_client::PropertyServiceClient;
use propd_tests::{Cluster, eventually};
use serde_json::Value;

const SECOND: i64 = 1_000_000_000;

/// One shard of `g` on every node, background repair off, a short grace and skew bound, and a
/// purge tick every second. Group `w` holds the witnesses of purge passes (see [`Witnesses`]).
fn config(replicas: u32) -> String {
    format!(
        "max_clock_skew = \"1s\"\nwrite_acks = 2\n\n[[groups]]\nname = \"g\"\nshard_num = 1\nreplicas = {replicas}\n\n\
         [[groups]]\nname = \"w\"\nshard_num = 12\nreplicas = 0\n\n\
         [repair]\nenabled = false\nperiod = \"1s\"\ntombstone_grace = \"2s\"\nverify_interval = \"1s\"\n"
    )
}

/// Witnesses that a node ran a purge pass over group `g` late enough that the grace alone would
/// have let `g`'s tombstones go: one single-copy entity of group `w` per node.
///
/// A node verifies and purges its shards in group-name order, `g` before `w`, one pass after
/// the other. Once a witness deleted at least a second after `g`'s last delete is purged (its
/// shard has one copy, so only the grace holds it), the pass that purged it had purged `g` just
/// before, past the grace of every `g` tombstone, and that purge is over. Whatever `g` still
/// holds then, the purge rule kept.
struct Witnesses(Vec<(usize, String)>);

impl Witnesses {
    /// Writes `w/n/{k}` for k = 0, 1, ... until each of `nodes` holds one (the shard of an id is
    /// a fixed hash, so this ends).
    fn new(cluster: &Cluster, nodes: &[usize]) -> Witnesses {
        let mut found: Vec<(usize, String)> = Vec::new();
        for k in 0..200 {
            if nodes.iter().all(|i| found.iter().any(|(j, _)| j == i)) {
                return Witnesses(found);
            }
            let id = format!("witness-{k}");
            cluster.json(0, &["put", &format!("w/n/{id}"), "--tag", "w=1"]);
            let holder = nodes
                .iter()
                .copied()
                .find(|&i| stored_in(cluster, i, "w", &id).is_some());
            if let Some(i) = holder.filter(|i| !found.iter().any(|(j, _)| j == i)) {
                found.push((i, id));
            }
        }
        panic!("no witness on some of {nodes:?}: {found:?}");
    }

    /// Deletes the witnesses once a second has passed since `after_ns` (the newest `g`
    /// tombstone), and waits until every one of them is purged.
    fn purged_after(&self, cluster: &Cluster, after_ns: i64) {
        assert!(
            eventually(Duration::from_secs(10), || now_nanos() > after_ns + SECOND),
            "the clock passed the last delete"
        );
        for (_, id) in &self.0 {
            cluster.json(0, &["delete", &format!("w/n/{id}")]);
        }
        for (i, id) in &self.0 {
            let deleted = stored_in(cluster, *i, "w", id).map(|p| p.delete_time);
            assert!(
                deleted.is_some_and(|time| time > after_ns + SECOND),
                "n{} holds the witness's tombstone, deleted after the others: {deleted:?}",
                i + 1
            );
        }
        let purged = eventually(Duration::from_secs(30), || {
            self.0
                .iter()
                .all(|(i, id)| stored_in(cluster, *i, "w", id).is_none())
        });
        assert!(
            purged,
            "every node ran a purge pass past the grace; n1's log:\n{}",
            cluster.log(0)
        );
    }
}

fn block_on<T>(future: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(future)
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// Node `i`'s own copy of `g/n/{id}`, tombstones included.
fn stored(cluster: &Cluster, i: usize, id: &str) -> Option<v1::Property> {
    stored_in(cluster, i, "g", id)
}

/// Node `i`'s own copy of `{group}/n/{id}`, tombstones included.
fn stored_in(cluster: &Cluster, i: usize, group: &str, id: &str) -> Option<v1::Property> {
    block_on(async {
        let mut client =
            PropertyServiceClient::new(cluster.endpoint(i).connect().await.expect("connect"));
        client
            .get(v1::GetRequest {
                group: group.into(),
                name: "n".into(),
                id: id.into(),
                local: true,
                include_deleted: true,
            })
            .await
            .expect("get")
            .into_inner()
            .property
    })
}

fn delete_at(cluster: &Cluster, i: usize, request: v1::DeleteRequest) -> Result<(), tonic::Status> {
    block_on(async {
        let mut client =
            PropertyServiceClient::new(cluster.endpoint(i).connect().await.expect("connect"));
        client.delete(request).await.map(drop)
    })
}

fn notice_to(
    cluster: &Cluster,
    i: usize,
    notice: v1::CompleteRepairNotice,
) -> Result<(), tonic::Status> {
    block_on(async {
        let mut client =
            AdminServiceClient::new(cluster.endpoint(i).connect().await.expect("connect"));
        client.record_complete_repair(notice).await.map(drop)
    })
}

/// Node `i`'s status of `g`'s shard.
fn shard_status(cluster: &Cluster, i: usize) -> Value {
    group_status(cluster, i, "g")
}

/// Node `i`'s status of shard 0 of `group`.
fn group_status(cluster: &Cluster, i: usize, group: &str) -> Value {
    let status = cluster.json(i, &["status"]);
    status["shards"]
        .as_array()
        .and_then(|shards| {
            shards
                .iter()
                .find(|s| s["group"] == group && s["shard"] == 0)
                .cloned()
        })
        .unwrap_or_else(|| panic!("n{} holds shard 0 of {group}: {status}", i + 1))
}

fn expect_invalid(result: Result<(), tonic::Status>, field: &str) {
    match result {
        Err(status) => {
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
            assert!(
                status.message().starts_with(field),
                "the refusal names {field}: {status}"
            );
        }
        Ok(()) => panic!("a request with a bad {field} was accepted"),
    }
}

#[test]
fn client_times_beyond_the_skew_bound_are_refused_naming_the_field() {
    let cluster = Cluster::start(1, &config(0));
    cluster.json(0, &["put", "g/n/x", "--tag", "a=1"]);
    let delete = |mod_revision, delete_time| v1::DeleteRequest {
        group: "g".into(),
        name: "n".into(),
        id: "x".into(),
        mod_revision,
        delete_time,
        local: false,
    };
    expect_invalid(delete_at(&cluster, 0, delete(0, 1)), "delete_time");
    expect_invalid(
        delete_at(&cluster, 0, delete(0, now_nanos() + 3600 * SECOND)),
        "delete_time",
    );
    expect_invalid(delete_at(&cluster, 0, delete(i64::MAX, 0)), "mod_revision");
    let output = cluster.cli(0, &["put", "g/n/x", "--revision", &i64::MAX.to_string()]);
    assert!(
        !output.status.success(),
        "a revision nobody could pass is refused"
    );
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("mod_revision"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        cluster.json(0, &["get", "g/n/x"])["tags"]["a"],
        "1",
        "nothing was deleted or frozen"
    );
    // A delete time within the bound is taken as given.
    let within = now_nanos() - 500_000_000;
    delete_at(&cluster, 0, delete(0, within)).expect("a delete time within the bound");
    assert_eq!(
        stored(&cluster, 0, "x").map(|p| p.delete_time),
        Some(within)
    );
}

#[test]
fn a_forged_notice_is_refused_and_deletes_hold_when_the_missing_copy_returns() {
    let mut cluster = Cluster::start(3, &config(2));
    let ids: Vec<String> = (0..6).map(|k| k.to_string()).collect();
    for id in &ids {
        cluster.json(0, &["put", &format!("g/n/{id}"), "--tag", "v=live"]);
    }
    let witnesses = Witnesses::new(&cluster, &[0, 1]);
    cluster.kill(2);
    for id in &ids {
        let deleted = cluster.json(0, &["delete", &format!("g/n/{id}")]);
        assert_eq!(deleted["acknowledged"], 2, "{deleted}");
    }
    let forged = |from: &str, started_at_ns: i64, cutoff_ns: i64| v1::CompleteRepairNotice {
        group: "g".into(),
        shard: 0,
        started_at_ns,
        message_id: "forged".into(),
        from: from.into(),
        cutoff_ns,
        copies: Vec::new(),
    };
    let tomorrow = now_nanos() + 24 * 3600 * SECOND;
    for i in 0..2 {
        expect_invalid(
            notice_to(&cluster, i, forged("n1", tomorrow, tomorrow - 3 * SECOND)),
            "started_at_ns",
        );
        expect_invalid(
            notice_to(&cluster, i, forged("n1", i64::MAX, i64::MAX - 3 * SECOND)),
            "started_at_ns",
        );
        expect_invalid(
            notice_to(
                &cluster,
                i,
                forged("n9", now_nanos(), now_nanos() - 3 * SECOND),
            ),
            "from",
        );
        expect_invalid(
            notice_to(&cluster, i, forged("n2", now_nanos(), now_nanos())),
            "cutoff_ns",
        );
    }
    // A purge pass past the grace on n1 and n2: nothing may go while n3 is away.
    let last_delete = ids
        .iter()
        .filter_map(|id| stored(&cluster, 0, id).map(|p| p.delete_time))
        .max()
        .expect("n1 holds the tombstones");
    witnesses.purged_after(&cluster, last_delete);
    for i in 0..2 {
        for id in &ids {
            let copy = stored(&cluster, i, id).expect("the tombstone is kept");
            assert!(copy.delete_time > 0, "n{}: {copy:?}", i + 1);
        }
        let status = shard_status(&cluster, i);
        assert!(
            status["purge_blocked"]
                .as_str()
                .is_some_and(|why| why.contains("never") || why.contains("n3")),
            "status says why purging waits: {status}"
        );
    }
    cluster.start_node(2);
    cluster.wait_ready(2);
    for id in &ids {
        assert_eq!(
            stored(&cluster, 2, id).map(|p| p.delete_time),
            Some(0),
            "n3 still holds the live version"
        );
    }
    let round = cluster.json(0, &["repair", "--group", "g", "--shard", "0", "--wait"]);
    assert_eq!(round["ok"], true, "{round}");
    for id in &ids {
        let read = cluster.cli(1, &["get", &format!("g/n/{id}")]);
        assert!(!read.status.success(), "g/n/{id} came back");
        for i in 0..3 {
            // The round may already have let the copies purge it (past the grace and cutoff).
            assert!(
                stored(&cluster, i, id).is_none_or(|p| p.delete_time > 0),
                "n{} holds the tombstone or nothing",
                i + 1
            );
        }
    }
    // Now every copy took part in a round after the deletes: past the grace and the round's
    // cutoff, every copy purges them, once.
    let purged = eventually(Duration::from_secs(30), || {
        (0..3).all(|i| ids.iter().all(|id| stored(&cluster, i, id).is_none()))
    });
    assert!(
        purged,
        "the tombstones were purged after the complete round"
    );
    let status = shard_status(&cluster, 0);
    assert!(status["purge_cutoff_ns"].as_i64().is_some(), "{status}");
    let round = cluster.json(2, &["repair", "--group", "g", "--shard", "0", "--wait"]);
    assert_eq!(round["ok"], true, "{round}");
    for id in &ids {
        assert!(
            (0..3).all(|i| stored(&cluster, i, id).is_none()),
            "g/n/{id}: a purged tombstone does not bounce back"
        );
    }
}

#[test]
fn a_copy_down_longer_than_the_grace_rejoins_as_it_is_and_its_stale_versions_lose() {
    let mut cluster = Cluster::start(3, &config(2));
    let ids: Vec<String> = (0..6).map(|k| format!("stale-{k}")).collect();
    for id in &ids {
        cluster.json(0, &["put", &format!("g/n/{id}"), "--tag", "v=live"]);
    }
    // A round reaches every copy: each copy may purge below its cutoff from now on.
    let round = cluster.json(0, &["repair", "--group", "g", "--shard", "0", "--wait"]);
    assert_eq!(round["ok"], true, "{round}");
    for i in 0..3 {
        let status = shard_status(&cluster, i);
        assert!(status["purge_cutoff_ns"].as_i64().is_some(), "{status}");
    }
    cluster.kill(2);
    let mut deleted_at = Vec::new();
    for id in &ids {
        let deleted = cluster.json(0, &["delete", &format!("g/n/{id}")]);
        assert_eq!(deleted["acknowledged"], 2, "{deleted}");
        let tombstone = stored(&cluster, 0, id).expect("the tombstone");
        assert!(tombstone.delete_time > 0, "{tombstone:?}");
        deleted_at.push(tombstone.delete_time);
    }
    let first_delete = deleted_at.iter().copied().min().expect("deletes");
    // The last complete round grows older than the grace (2 s) while n3 is away: the copies that
    // stayed say that purging waits, since when, and for whom.
    let blocked = eventually(Duration::from_secs(30), || {
        (0..2).all(|i| {
            shard_status(&cluster, i)["purge_blocked"]
                .as_str()
                .is_some_and(|why| why.contains(" s ago") && why.contains("down: n3"))
        })
    });
    assert!(
        blocked,
        "status names n3 as the copy purging waits for: {} / {}",
        shard_status(&cluster, 0),
        shard_status(&cluster, 1)
    );
    // Nothing deleted since the last complete round was purged meanwhile: the purge line of
    // every copy that stayed is below the first delete, and every tombstone is kept.
    for i in 0..2 {
        let status = shard_status(&cluster, i);
        assert!(
            status["purged_below_ns"]
                .as_i64()
                .is_none_or(|line| line < first_delete),
            "n{}: the purge line stays below the deletes made while n3 was away: {status}",
            i + 1
        );
        for id in &ids {
            let copy = stored(&cluster, i, id).expect("the tombstone is kept");
            assert!(copy.delete_time > 0, "n{}: {copy:?}", i + 1);
        }
    }
    // n3 rejoins as it is, longer than the grace after its last round, holding live versions.
    cluster.start_node(2);
    cluster.wait_ready(2);
    for id in &ids {
        assert_eq!(
            stored(&cluster, 2, id).map(|p| p.delete_time),
            Some(0),
            "n3 still holds the live version of {id}"
        );
    }
    // The stale copy itself runs the round: its live versions lose to the tombstones.
    let round = cluster.json(2, &["repair", "--group", "g", "--shard", "0", "--wait"]);
    assert_eq!(round["ok"], true, "{round}");
    for id in &ids {
        for i in 0..3 {
            let read = cluster.cli(i, &["get", &format!("g/n/{id}")]);
            assert!(!read.status.success(), "g/n/{id} came back at n{}", i + 1);
            assert!(
                stored(&cluster, i, id).is_none_or(|p| p.delete_time > 0),
                "n{} holds the tombstone of {id} or nothing",
                i + 1
            );
        }
    }
    // A round's cutoff is its start less three skews (3 s here): once the clock is past that
    // much after the last delete, the next complete round lets every copy purge the tombstones,
    // and they stay gone.
    let last_delete = deleted_at.iter().copied().max().expect("deletes");
    let cutoff_passes = last_delete + 3 * 1_000_000_000 + 500_000_000;
    loop {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_nanos();
        let Some(left) = u128::try_from(cutoff_passes)
            .expect("positive")
            .checked_sub(now)
        else {
            break;
        };
        std::thread::sleep(Duration::from_nanos(u64::try_from(left).expect("seconds")));
    }
    let round = cluster.json(0, &["repair", "--group", "g", "--shard", "0", "--wait"]);
    assert_eq!(round["ok"], true, "{round}");
    let purged = eventually(Duration::from_secs(30), || {
        (0..3).all(|i| ids.iter().all(|id| stored(&cluster, i, id).is_none()))
    });
    assert!(
        purged,
        "the tombstones were purged after the complete round"
    );
    let round = cluster.json(1, &["repair", "--group", "g", "--shard", "0", "--wait"]);
    assert_eq!(round["ok"], true, "{round}");
    for id in &ids {
        for i in 0..3 {
            assert!(
                stored(&cluster, i, id).is_none(),
                "n{}: g/n/{id} stays deleted",
                i + 1
            );
        }
    }
}

#[test]
fn a_round_with_failed_applies_does_not_enable_purging() {
    // Group `x` (one shard on every node) gets a complete round after the failed one: the
    // witness that the failed round's result was handled (see below).
    let shared = format!(
        "{}\n[[groups]]\nname = \"x\"\nshard_num = 1\nreplicas = 2\n",
        config(2)
    );
    let mut cluster = Cluster::start(3, &shared);
    // n2 refuses properties over 300 bytes: its applies of a larger copy fail.
    let path = &cluster.nodes[1].config;
    let text = std::fs::read_to_string(path).expect("n2's config");
    let text = text.replacen(
        "node_id = \"n2\"\n",
        "node_id = \"n2\"\nmax_property_bytes = 300\n",
        1,
    );
    std::fs::write(path, text).expect("writing n2's config");
    cluster.restart(1);
    let witnesses = Witnesses::new(&cluster, &[0, 1, 2]);
    cluster.json(0, &["put", "g/n/gone", "--tag", "v=1"]);
    cluster.json(0, &["delete", "g/n/gone"]);
    let big = format!("v={}", "x".repeat(1000));
    cluster.json(0, &["put", "g/n/big", "--tag", &big, "--local"]);
    let round = cluster.json(0, &["repair", "--group", "g", "--shard", "0", "--wait"]);
    let failed: u64 = round["syncs"]
        .as_array()
        .expect("syncs")
        .iter()
        .map(|sync| {
            sync["failed"].as_u64().unwrap_or(0) + sync["peer_failed"].as_u64().unwrap_or(0)
        })
        .sum();
    assert_eq!(round["ok"], true, "the round itself completed: {round}");
    assert!(failed > 0, "n2 failed to apply the large copy: {round}");
    // The origin handles the results of its rounds one after the other, in the order they
    // finish, and sends a round's notices (awaiting each copy's answer) before it looks at the
    // next result. So once every copy has recorded a later complete round of n1's, any notice
    // of the failed round has arrived: the checks below cannot pass because a notice is late.
    cluster.json(0, &["put", "x/n/small", "--tag", "v=1"]);
    let control = cluster.json(0, &["repair", "--group", "x", "--shard", "0", "--wait"]);
    assert_eq!(control["ok"], true, "the round of x completed: {control}");
    for i in 0..3 {
        assert!(
            eventually(Duration::from_secs(20), || {
                !group_status(&cluster, i, "x")["last_repair_age_s"].is_null()
            }),
            "n{} recorded the complete round of x: {}",
            i + 1,
            group_status(&cluster, i, "x")
        );
    }
    // A purge pass past the grace on every node.
    let deleted = stored(&cluster, 0, "gone").map_or(0, |p| p.delete_time);
    witnesses.purged_after(&cluster, deleted);
    for i in 0..3 {
        let status = shard_status(&cluster, i);
        assert!(
            status["last_repair_age_s"].is_null() && status["purge_cutoff_ns"].is_null(),
            "n{}: a round with failed applies counts for nothing: {status}",
            i + 1
        );
        assert!(
            stored(&cluster, i, "gone").is_some_and(|p| p.delete_time > 0),
            "n{} keeps the tombstone",
            i + 1
        );
    }
}

#[test]
fn a_single_copy_shard_purges_after_the_grace() {
    let cluster = Cluster::start(1, &config(0));
    cluster.json(0, &["put", "g/n/one", "--tag", "a=1"]);
    cluster.json(0, &["delete", "g/n/one"]);
    assert!(stored(&cluster, 0, "one").is_some_and(|p| p.delete_time > 0));
    let purged = eventually(Duration::from_secs(20), || {
        stored(&cluster, 0, "one").is_none()
    });
    assert!(purged, "the tombstone was purged; log:\n{}", cluster.log(0));
    let status = shard_status(&cluster, 0);
    assert!(status["purged_below_ns"].as_i64().is_some(), "{status}");
    assert!(status["purge_blocked"].is_null(), "{status}");
}

#[test]
fn a_write_that_loses_to_a_newer_copy_says_superseded() {
    let cluster = Cluster::start(3, &config(2));
    let current = cluster.json(0, &["put", "g/n/s", "--tag", "v=new"]);
    let revision = current["mod_revision"].as_i64().expect("revision");
    for args in [
        vec!["put", "g/n/s", "--tag", "v=old", "--revision", "5"],
        vec!["delete", "g/n/s", "--revision", "5"],
    ] {
        let mut all = args.clone();
        all.extend(["--output", "json"]);
        let output = cluster.cli(1, &all);
        assert!(
            !output.status.success(),
            "{args:?} lost, and exits non-zero"
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&format!("superseded by revision {revision}")),
            "{stderr}"
        );
        let answer: Value = serde_json::from_slice(&output.stdout).expect("JSON on stdout");
        assert_eq!(answer["superseded"], revision, "{answer}");
    }
    assert_eq!(cluster.json(2, &["get", "g/n/s"])["tags"]["v"], "new");
    let newer = cluster.json(0, &["put", "g/n/s", "--tag", "v=newer"]);
    assert!(newer["superseded"].is_null(), "{newer}");
}
