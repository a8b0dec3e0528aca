//! The cost of mutual TLS (issue 13), each measurement against its plaintext twin in the same
//! criterion run:
//!
//! - repair throughput: `PROPD_BENCH_TLS_N` (default 100 000) properties of about 2 KB synced
//!   from a full redb store into an empty one over loopback tonic (`transport::sync` against
//!   `RepairServer`), plaintext against mutual TLS (rustls with ring, TLS 1.3, ECDSA P-256
//!   certificates from one CA, as `propd cert` issues them). Each iteration syncs into a fresh
//!   empty store and times the sync alone;
//! - single-write latency: one `Apply` at a time through a 3-node cluster of `propd serve`
//!   processes (the release build; one group of one shard with a copy on every node,
//!   `write_acks = 2`), a plaintext cluster against one with `[tls]` on every node and the
//!   client speaking mutual TLS.
//!
//! Goal: TLS costs at most 10% of repair throughput.

#![allow(
    missing_docs,
    reason = "criterion's macros generate undocumented items"
)]

use std::cell::OnceCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use propd_benches::loopback::{GROUP, Tls, bulk_load, open, serve_repair, timed_sync};
use propd_benches::properties::{big_property, property};
use propd_proto::v1;
use propd_proto::v1::property_service_client::PropertyServiceClient;
use propd_store::{RedbStore, WriteDurability};
use propd_tests::Cluster;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity, ServerTlsConfig};

/// A CA and, signed by it, a server certificate for `localhost` and a client certificate.
struct Pki {
    ca: String,
    server: (String, String),
    client: (String, String),
}

impl Pki {
    fn new() -> Self {
        let ca_key = rcgen::KeyPair::generate().expect("a CA key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).expect("the CA");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf = |name: &str| {
            let key = rcgen::KeyPair::generate().expect("a key");
            let params = rcgen::CertificateParams::new(vec![name.to_owned()]).expect("params");
            let cert = params.signed_by(&key, &issuer).expect("a certificate");
            (cert.pem(), key.serialize_pem())
        };
        Pki {
            ca: ca_cert.pem(),
            server: leaf("localhost"),
            client: leaf("n1"),
        }
    }
}

/// The source store of the throughput bench: `n` properties of about 2 KB.
fn loaded(n: u64) -> (tempfile::TempDir, Arc<RedbStore>) {
    let dir = tempfile::tempdir().expect("dir");
    let store = open(dir.path(), WriteDurability::Immediate);
    bulk_load(&store, n, 1024, big_property);
    (dir, Arc::new(store))
}

/// Syncs `source` into a fresh empty store served on loopback, with TLS when `tls` is given;
/// returns the time of the sync alone.
async fn one_sync(source: &RedbStore, n: u64, tls: Option<&Tls>) -> Duration {
    let dir = tempfile::tempdir().expect("dir");
    let target = Arc::new(open(dir.path(), WriteDurability::Immediate));
    let served = serve_repair(target, tls).await;
    let (elapsed, report) = timed_sync(&served, source).await;
    assert_eq!(report.peer_applied, n, "the copy must be complete");
    elapsed
}

fn repair_throughput(c: &mut Criterion) {
    let n = std::env::var("PROPD_BENCH_TLS_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let pki = Pki::new();
    let tls = Tls {
        server: ServerTlsConfig::new()
            .identity(Identity::from_pem(&pki.server.0, &pki.server.1))
            .client_ca_root(Certificate::from_pem(&pki.ca)),
        client: ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&pki.ca))
            .identity(Identity::from_pem(&pki.client.0, &pki.client.1))
            .domain_name("localhost"),
    };
    let (_dir, source) = loaded(n);
    let mut group = c.benchmark_group("tls_repair_throughput");
    group.sample_size(10);
    group.throughput(criterion::Throughput::Elements(n));
    for (name, tls) in [("plaintext", None), ("mutual_tls", Some(&tls))] {
        group.bench_function(name, |b| {
            b.iter_custom(|iterations| {
                (0..iterations)
                    .map(|_| runtime.block_on(one_sync(&source, n, tls)))
                    .sum()
            });
        });
    }
    group.finish();
}

/// Property number `i` on the wire, its revision left to the coordinator.
fn wire(i: u64) -> v1::Property {
    let property = property(i);
    v1::Property {
        group: GROUP.to_owned(),
        name: property.name,
        id: property.id,
        tags: Vec::new(),
        mod_revision: 0,
        delete_time: 0,
    }
}

fn single_write(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let shared = format!(
        "write_acks = 2\n\n[[groups]]\nname = \"{GROUP}\"\nshard_num = 1\nreplicas = 2\n\n\
         [repair]\nenabled = false\n"
    );
    let next = AtomicU64::new(0);
    let mut group = c.benchmark_group("tls_single_write");
    for (name, tls) in [("plaintext", false), ("mutual_tls", true)] {
        // Started on first use, so that a filter that skips this bench starts no cluster.
        let running: OnceCell<(Cluster, PropertyServiceClient<Channel>)> = OnceCell::new();
        group.bench_function(name, |b| {
            let (_, api) = running.get_or_init(|| {
                let cluster = if tls {
                    Cluster::start_tls(3, &shared)
                } else {
                    Cluster::start_plaintext(3, &shared)
                };
                let channel = runtime
                    .block_on(cluster.endpoint(0).tcp_nodelay(true).connect())
                    .expect("connect");
                (cluster, PropertyServiceClient::new(channel))
            });
            b.iter(|| {
                let i = next.fetch_add(1, Ordering::Relaxed);
                runtime
                    .block_on(api.clone().apply(v1::ApplyRequest {
                        property: Some(wire(i)),
                        local: false,
                    }))
                    .expect("an acknowledged write")
            });
        });
    }
    group.finish();
}

criterion_group!(benches, repair_throughput, single_write);
criterion_main!(benches);
