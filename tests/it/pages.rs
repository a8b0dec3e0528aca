//! Paged queries, export and import over real `propd serve` processes: pages add up to the
//! unpaged answer, copies that differ are merged page by page (and repaired), an export restores
//! a wiped cluster exactly (tombstones and revisions kept, newer data never overwritten), and a
//! bad line refuses the whole import.

use std::collections::BTreeMap;
use std::time::Duration;

use propd_proto::v1;
use propd_proto::v1::property_service_client::PropertyServiceClient;
use propd_tests::{Cluster, eventually};
use serde_json::Value;

fn config(shard_num: u32, replicas: u32) -> String {
    format!(
        "write_acks = 1\n\n[[groups]]\nname = \"g\"\nshard_num = {shard_num}\nreplicas = {replicas}\n\n[repair]\nenabled = false\n"
    )
}

fn block_on<T>(future: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(future)
}

/// Runs `call` with a client of node `i` (each call in a runtime of its own, with its own
/// connection; over mutual TLS in a TLS cluster).
fn with_client<T, F: Future<Output = T>>(
    cluster: &Cluster,
    i: usize,
    call: impl FnOnce(PropertyServiceClient<tonic::transport::Channel>) -> F,
) -> T {
    let endpoint = cluster.endpoint(i);
    block_on(async move {
        let client = PropertyServiceClient::new(endpoint.connect().await.expect("connect"));
        call(client).await
    })
}

fn property(id: &str, revision: i64, tag: &str) -> v1::Property {
    v1::Property {
        group: "g".into(),
        name: "n".into(),
        id: id.into(),
        tags: vec![v1::Tag {
            key: "v".into(),
            value: Some(v1::TagValue {
                value: Some(v1::tag_value::Value::Str(tag.into())),
            }),
        }],
        mod_revision: revision,
        delete_time: 0,
    }
}

/// `(id, revision, delete_time)` of each property, in answer order.
fn versions(properties: &[v1::Property]) -> Vec<(String, i64, i64)> {
    properties
        .iter()
        .map(|p| (p.id.clone(), p.mod_revision, p.delete_time))
        .collect()
}

/// Every page of `request` from node `i`, checking each page's size; the pages in order.
fn all_pages(cluster: &Cluster, i: usize, mut request: v1::QueryRequest) -> Vec<Vec<v1::Property>> {
    let mut pages = Vec::new();
    loop {
        let page = request.clone();
        let answer = with_client(cluster, i, |mut api| async move { api.query(page).await })
            .expect("a page")
            .into_inner();
        assert!(answer.properties.len() <= request.limit as usize);
        assert_eq!(answer.page_version, 1);
        pages.push(answer.properties);
        if answer.next_page_token.is_empty() {
            return pages;
        }
        assert_ne!(
            request.page_token, answer.next_page_token,
            "a page moves on"
        );
        request.page_token = answer.next_page_token;
    }
}

fn query(limit: u32, local: bool, include_deleted: bool) -> v1::QueryRequest {
    v1::QueryRequest {
        group: "g".into(),
        limit,
        local,
        include_deleted,
        ..Default::default()
    }
}

fn import(cluster: &Cluster, i: usize, properties: Vec<v1::Property>, local: bool) {
    with_client(cluster, i, |mut api| async move {
        api.import(v1::ImportRequest {
            properties,
            local,
            dry_run: false,
        })
        .await
    })
    .expect("import");
}

#[test]
fn a_query_across_pages_equals_the_unpaged_answer() {
    let cluster = Cluster::start(3, &config(4, 2));
    // Names that are prefixes of each other, and ids with '/': entity order is byte order.
    let mut written = Vec::new();
    for i in 0..240 {
        let name = ["a", "a-b", "ab", "b"][i % 4];
        let mut p = property(&format!("{i:03}/x"), 100 + i as i64, "v");
        p.name = name.into();
        written.push(p);
    }
    import(&cluster, 0, written, false);
    let whole = with_client(&cluster, 1, |mut api| async move {
        api.query(query(1_000_000, false, false)).await
    })
    .expect("unpaged")
    .into_inner();
    assert_eq!(whole.properties.len(), 240);
    assert!(whole.next_page_token.is_empty());
    let keys: Vec<String> = whole
        .properties
        .iter()
        .map(|p| format!("{}/{}/{}", p.group, p.name, p.id))
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "entity order");

    for limit in [1, 7, 240] {
        let pages = all_pages(&cluster, 2, query(limit, false, false));
        let joined: Vec<v1::Property> = pages.into_iter().flatten().collect();
        assert_eq!(joined, whole.properties, "limit {limit}");
    }
    // The CLI streams every page as JSON lines.
    let output = cluster.cli(
        0,
        &[
            "query", "--group", "g", "--limit", "9", "--all", "--output", "json",
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 240);
    assert_eq!(lines[0]["id"], whole.properties[0].id.as_str());
    // One page prints its token; the next page starts after it.
    let first = cluster.json(0, &["query", "--group", "g", "--limit", "100"]);
    assert_eq!(first["properties"].as_array().unwrap().len(), 100);
    let token = first["next_page_token"]
        .as_str()
        .expect("a token")
        .to_owned();
    let second = cluster.json(
        0,
        &[
            "query",
            "--group",
            "g",
            "--limit",
            "100",
            "--page-token",
            &token,
        ],
    );
    assert_eq!(
        second["properties"][0]["id"],
        whole.properties[100].id.as_str()
    );
    // Bounds and bad tokens are refused naming the field.
    let output = cluster.cli(0, &["query", "--group", "g", "--limit", "1000001"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("--limit"));
    let output = cluster.cli(0, &["query", "--group", "g", "--page-token", "nonsense"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("page_token"));
}

#[test]
fn copies_that_differ_are_merged_across_pages_and_repaired() {
    let cluster = Cluster::start(3, &config(1, 3));
    import(
        &cluster,
        0,
        (0..60)
            .map(|i| property(&format!("{i:02}"), 10, "old"))
            .collect(),
        false,
    );
    // Each copy diverges its own way: n1 holds newer versions of 0, 3, 6..., n2 alone holds 60..69,
    // n3 holds tombstones of 1, 11, 21..., newer than everything else.
    let newer: Vec<_> = (0..60)
        .step_by(3)
        .map(|i| property(&format!("{i:02}"), 20, "new"))
        .collect();
    import(&cluster, 0, newer, true);
    import(
        &cluster,
        1,
        (60..70)
            .map(|i| property(&format!("{i:02}"), 10, "only-n2"))
            .collect(),
        true,
    );
    let tombstones: Vec<_> = (1..60)
        .step_by(10)
        .map(|i| {
            let mut p = property(&format!("{i:02}"), 30, "");
            p.tags.clear();
            p.delete_time = 30;
            p
        })
        .collect();
    import(&cluster, 2, tombstones, true);

    let mut expected: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for i in 0..70 {
        let revision = match i {
            60.. => 10,
            _ if i % 10 == 1 => 30,
            _ if i % 3 == 0 => 20,
            _ => 10,
        };
        let deleted = if i < 60 && i % 10 == 1 { 30 } else { 0 };
        expected.insert(format!("{i:02}"), (revision, deleted));
    }
    let with_tombstones: Vec<(String, i64, i64)> = expected
        .iter()
        .map(|(id, (r, d))| (id.clone(), *r, *d))
        .collect();
    let live: Vec<(String, i64, i64)> = with_tombstones
        .iter()
        .filter(|(_, _, d)| *d == 0)
        .cloned()
        .collect();
    for limit in [4, 13] {
        let pages = all_pages(&cluster, 1, query(limit, false, false));
        assert!(pages.len() > 3, "several pages");
        let joined: Vec<v1::Property> = pages.into_iter().flatten().collect();
        assert_eq!(versions(&joined), live, "limit {limit}");
        let joined: Vec<v1::Property> = all_pages(&cluster, 0, query(limit, false, true))
            .into_iter()
            .flatten()
            .collect();
        assert_eq!(
            versions(&joined),
            with_tombstones,
            "tombstones too, limit {limit}"
        );
    }
    // Read repair brought every copy to the merged state.
    let repaired = eventually(Duration::from_secs(20), || {
        (0..3).all(|i| {
            let own: Vec<v1::Property> = all_pages(&cluster, i, query(50, true, true))
                .into_iter()
                .flatten()
                .collect();
            versions(&own) == with_tombstones
        })
    });
    assert!(repaired, "every copy holds the merged state");
}

fn export(cluster: &Cluster, i: usize, path: &std::path::Path) -> Vec<Value> {
    let output = cluster.cli(
        i,
        &[
            "export",
            "--group",
            "g",
            "--page-size",
            "17",
            "--file",
            path.to_str().unwrap(),
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("exported "));
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect()
}

#[test]
fn export_wipe_import_restores_every_property_and_tombstone_and_never_overwrites_newer() {
    let mut cluster = Cluster::start(2, &config(3, 2));
    for i in 0..90 {
        cluster.json(
            i % 2,
            &["put", &format!("g/n/{i:02}"), "--tag", &format!("k={i}")],
        );
        if i % 9 == 0 {
            cluster.json(0, &["delete", &format!("g/n/{i:02}")]);
        }
    }
    let exported = export(&cluster, 0, &cluster.dir.path().join("before.jsonl"));
    assert_eq!(exported.len(), 90);
    assert_eq!(
        exported.iter().filter(|p| p["delete_time"] != 0).count(),
        10
    );

    // Wipe both nodes.
    for i in 0..2 {
        cluster.kill(i);
        std::fs::remove_dir_all(cluster.dir.path().join(&cluster.nodes[i].id)).unwrap();
        cluster.start_node(i);
    }
    for i in 0..2 {
        cluster.wait_ready(i);
    }
    assert_eq!(
        export(&cluster, 1, &cluster.dir.path().join("empty.jsonl")).len(),
        0
    );
    // Data written after the export, on the wiped cluster: newer than the exported versions.
    cluster.json(0, &["put", "g/n/05", "--tag", "k=after"]);
    let after = cluster.json(0, &["get", "g/n/05"]);

    let file = cluster.dir.path().join("before.jsonl");
    let output = cluster.cli(1, &["import", file.to_str().unwrap()]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        summary.contains("imported 90 properties: 89 stored, 1 unchanged"),
        "{summary}"
    );

    let restored = export(&cluster, 0, &cluster.dir.path().join("after.jsonl"));
    let mut expected = exported.clone();
    let kept = expected.iter_mut().find(|p| p["id"] == "05").unwrap();
    *kept = serde_json::json!({
        "group": "g", "name": "n", "id": "05", "delete_time": 0,
        "mod_revision": after["mod_revision"], "tags": {"k": "after"},
    });
    assert_eq!(
        restored, expected,
        "every property and tombstone, and the newer 05 kept"
    );
    // Both copies hold it all.
    let own: Vec<v1::Property> = all_pages(&cluster, 1, query(1000, true, true))
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(own.len(), 90);
    // Again: nothing changes.
    let output = cluster.cli(0, &["import", file.to_str().unwrap()]);
    let summary = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(summary.contains("0 stored, 90 unchanged"), "{summary}");
    // One shard exports only its own.
    let output = cluster.cli(0, &["export", "--group", "g", "--shard", "1"]);
    assert!(output.status.success());
    let shard_lines = String::from_utf8_lossy(&output.stdout).lines().count();
    assert!(shard_lines > 0 && shard_lines < 90, "{shard_lines}");
}

#[test]
fn bad_import_lines_are_refused_by_line_and_field_and_nothing_is_stored() {
    let cluster = Cluster::start(2, &config(2, 2));
    let good = |id: &str| {
        format!(
            r#"{{"group":"g","name":"n","id":"{id}","mod_revision":5,"delete_time":0,"tags":{{}}}}"#
        )
    };
    let far_future = i64::MAX / 2;
    let cases = [
        (
            format!(
                "{}\n{}\n{{\"group\":\"g\",\"name\":\"n\",\"id\":\"c\",\"mod_revision\":\"x\"}}\n",
                good("a"),
                good("b")
            ),
            "line 3: mod_revision: expected an integer",
        ),
        (
            format!(
                "{}\n\n{}\n",
                good("a"),
                good("b").replace("\"g\"", "\"nogroup\"")
            ),
            "line 3: group: unknown group \"nogroup\"",
        ),
        (
            format!(
                "{}\n{}\n",
                good("a"),
                good("b").replace(":5,", &format!(":{far_future},"))
            ),
            "line 2: mod_revision: ",
        ),
        (
            format!(
                "{}\n{}\n",
                good("a"),
                good("b").replace("\"tags\"", "\"tagz\"")
            ),
            "line 2: tagz: unknown field",
        ),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let file = cluster.dir.path().join(format!("bad{i}.jsonl"));
        std::fs::write(&file, text).unwrap();
        let output = cluster.cli(0, &["import", file.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "case {i}");
        assert!(stderr.contains(expected), "case {i}: {stderr}");
        for node in 0..2 {
            let own: Vec<v1::Property> = all_pages(&cluster, node, query(10, true, true))
                .into_iter()
                .flatten()
                .collect();
            assert!(
                own.is_empty(),
                "case {i}: nothing stored on node {node}: {own:?}"
            );
        }
    }
}
