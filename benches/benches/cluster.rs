//! Criterion bench of coordinated writes through a local 3-node cluster of real `propd serve`
//! processes (the release build) on 127.0.0.1, ports chosen free: acknowledged writes per second
//! and p50/p99 latency with 1, 8, 50 and 200 concurrent clients, group commit on against off
//! (`store.group_commit`). Both clusters run side by side and are measured in interleaved rounds.
//!
//! Every cluster holds one group of three shards with a copy on every node, `write_acks = 2`;
//! each client sends its `Apply`s (new properties of about 200 canonical bytes, revisions assigned
//! by the coordinator) to one node, the clients spread over the three. Goal (issue 18): with 50
//! clients at least 10x the throughput of one sync per write, p99 no worse; one client no slower.

#![allow(
    missing_docs,
    reason = "criterion's macros generate undocumented items"
)]
#![allow(
    clippy::print_stdout,
    reason = "a bench prints the figures it measured beside criterion's output"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use propd_benches::acks;
use propd_benches::properties::property;
use propd_merkle::TagValue;
use propd_proto::v1;
use propd_proto::v1::property_service_client::PropertyServiceClient;
use propd_tests::Cluster;
use tonic::transport::{Channel, Endpoint};

/// The shared configuration of a bench cluster.
fn shared(group_commit: bool) -> String {
    format!(
        "write_acks = 2\n\n[[groups]]\nname = \"bench\"\nshard_num = 3\nreplicas = 2\n\n\
         [repair]\nenabled = false\n\n[store]\ngroup_commit = {group_commit}\n"
    )
}

/// Property number `i` on the wire, its revision left to the coordinator.
fn wire(i: u64) -> v1::Property {
    let property = property(i);
    v1::Property {
        group: property.group,
        name: property.name,
        id: property.id,
        tags: property
            .tags
            .into_iter()
            .map(|(key, value)| v1::Tag {
                key,
                value: Some(v1::TagValue {
                    value: Some(match value {
                        TagValue::Str(text) => v1::tag_value::Value::Str(text),
                        TagValue::Int(number) => v1::tag_value::Value::Int(number),
                        TagValue::Binary(bytes) => v1::tag_value::Value::Binary(bytes),
                    }),
                }),
            })
            .collect(),
        mod_revision: 0,
        delete_time: 0,
    }
}

/// A running cluster and a channel to each of its nodes.
struct Bench {
    _cluster: Cluster,
    channels: Vec<Channel>,
    next: Arc<AtomicU64>,
}

impl Bench {
    fn start(runtime: &tokio::runtime::Runtime, group_commit: bool) -> Self {
        let cluster = Cluster::start(3, &shared(group_commit));
        let channels = cluster
            .nodes
            .iter()
            .map(|node| {
                let endpoint = Endpoint::from_shared(format!("http://{}", node.listen))
                    .expect("a node address")
                    .tcp_nodelay(true);
                runtime.block_on(endpoint.connect()).expect("connect")
            })
            .collect();
        Bench {
            _cluster: cluster,
            channels,
            next: Arc::new(AtomicU64::new(0)),
        }
    }

    /// `clients` concurrent clients write new properties, one `Apply` at a time each, until
    /// `done` says so (given the writes that client made); returns every acknowledged write's
    /// latency and the time taken.
    fn run(
        &self,
        runtime: &tokio::runtime::Runtime,
        clients: usize,
        done: impl Fn(u64) -> bool + Clone + Send + 'static,
    ) -> (Vec<Duration>, Duration) {
        runtime.block_on(async {
            let start = Instant::now();
            let tasks: Vec<_> = (0..clients)
                .map(|client| {
                    let mut api = PropertyServiceClient::new(self.channels[client % 3].clone());
                    let next = Arc::clone(&self.next);
                    let done = done.clone();
                    tokio::spawn(async move {
                        let mut mine = Vec::new();
                        while !done(mine.len() as u64) {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let sent = Instant::now();
                            api.apply(v1::ApplyRequest {
                                property: Some(wire(i)),
                                local: false,
                            })
                            .await
                            .expect("an acknowledged write");
                            mine.push(sent.elapsed());
                        }
                        mine
                    })
                })
                .collect();
            let mut latencies = Vec::new();
            for task in tasks {
                latencies.extend(task.await.expect("a client task"));
            }
            (latencies, start.elapsed())
        })
    }
}

fn cluster_writes(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let sides = [("group_commit", true), ("sync_per_write", false)];
    let benches = sides.map(|(_, group_commit)| Bench::start(&runtime, group_commit));

    let mut group = c.benchmark_group("cluster_write");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for clients in [1, 50] {
        for ((label, _), bench) in sides.iter().zip(&benches) {
            group.bench_function(format!("{clients}_clients/{label}"), |b| {
                // Time per acknowledged write: `iters` writes shared by the clients.
                b.iter_custom(|iters| {
                    acks::time_writes(iters, clients, |share| {
                        bench.run(&runtime, clients, move |made| made >= share).1
                    })
                })
            });
        }
    }
    group.finish();

    for clients in acks::WRITERS {
        acks::claim("cluster_write", clients, |side, deadline| {
            benches[side].run(&runtime, clients, move |_| Instant::now() >= deadline)
        });
    }
}

criterion_group!(benches, cluster_writes);
criterion_main!(benches);
