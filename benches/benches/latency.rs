//! Latency of coordinated gets on a 3-node local cluster of real `propd serve` processes (the
//! release binary), with the servers' accepted sockets without `TCP_NODELAY` (propd before
//! issue "Faults a node meets": Nagle's algorithm held small answers back until the peer's
//! delayed ACK, about 40 ms) and with it (now), in the same run.
//!
//! `PROPD_BENCH_GETS` sequential gets (default 1 000) of one property of about 200 canonical
//! bytes, through the coordinator on the first node, which reads every copy. Prints p50, p90,
//! p99 and the maximum of each side, and the ratio of the p99s.

#![allow(
    clippy::print_stdout,
    reason = "a bench prints the figures it measured"
)]

use std::time::{Duration, Instant};

use propd_proto::v1;
use propd_proto::v1::property_service_client::PropertyServiceClient;
use propd_tests::Cluster;
use tonic::transport::Endpoint;

const GROUP: &str = "[[groups]]\nname = \"g\"\nshard_num = 1\nreplicas = 2\n\n[repair]\nenabled = false\nscrub_bytes_per_second = 0\n";

/// Percentiles of one side, in milliseconds.
struct Figures {
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
}

fn measure(server_nodelay: &str, gets: usize) -> Figures {
    let mut cluster = Cluster::configure(3, GROUP);
    cluster.env.push((
        "PROPD_BENCH_SERVER_NODELAY".to_owned(),
        server_nodelay.to_owned(),
    ));
    for i in 0..3 {
        cluster.start_node(i);
    }
    for i in 0..3 {
        cluster.wait_ready(i);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let mut times = runtime.block_on(async {
        let channel = Endpoint::from_shared(format!("http://{}", cluster.nodes[0].listen))
            .expect("an address")
            .tcp_nodelay(true)
            .connect()
            .await
            .expect("connecting to n1");
        let mut client = PropertyServiceClient::new(channel);
        let blob = "x".repeat(160);
        client
            .apply(v1::ApplyRequest {
                property: Some(v1::Property {
                    group: "g".into(),
                    name: "bench".into(),
                    id: "one".into(),
                    tags: vec![v1::Tag {
                        key: "blob".into(),
                        value: Some(v1::TagValue {
                            value: Some(v1::tag_value::Value::Str(blob)),
                        }),
                    }],
                    mod_revision: 0,
                    delete_time: 0,
                }),
                local: false,
            })
            .await
            .expect("put");
        let request = v1::GetRequest {
            group: "g".into(),
            name: "bench".into(),
            id: "one".into(),
            local: false,
            include_deleted: false,
        };
        // Warm the channels between the nodes first.
        for _ in 0..50 {
            client.get(request.clone()).await.expect("get");
        }
        let mut times = Vec::with_capacity(gets);
        for _ in 0..gets {
            let started = Instant::now();
            let got = client.get(request.clone()).await.expect("get");
            times.push(started.elapsed());
            assert!(got.into_inner().property.is_some());
        }
        times
    });
    times.sort();
    let at = |q: f64| {
        let index = ((times.len() as f64 * q) as usize).min(times.len() - 1);
        times[index].as_secs_f64() * 1e3
    };
    Figures {
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        max: times
            .last()
            .copied()
            .unwrap_or(Duration::ZERO)
            .as_secs_f64()
            * 1e3,
    }
}

fn main() {
    let gets = std::env::var("PROPD_BENCH_GETS")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(1_000);
    let before = measure("off", gets);
    let after = measure("on", gets);
    for (label, f) in [
        ("server TCP_NODELAY off (before)", &before),
        ("server TCP_NODELAY on (now)", &after),
    ] {
        println!(
            "latency/coordinated_get ({gets} gets, {label}): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            f.p50, f.p90, f.p99, f.max
        );
    }
    println!(
        "latency/coordinated_get: p99 before / now = {:.1}x, p50 before / now = {:.1}x",
        before.p99 / after.p99,
        before.p50 / after.p50
    );
}
