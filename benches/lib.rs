//! Shared data generators and set-ups for the criterion benches in `benches/`.

/// Deterministic properties of about 200 canonical bytes (the size DESIGN §10 measures with).
pub mod properties {
    use std::fmt::Write as _;

    use propd_merkle::{Property, TagValue};

    /// Property number `i` of group `bench`, name `prop`: id `id-{i:010}`, three tags.
    pub fn property(i: u64) -> Property {
        let mut property = Property::default();
        fill(&mut property, i);
        property
    }

    /// Rewrites `property` in place into property number `i`, reusing its allocations, so that a
    /// bench can stream a million properties without a million allocations.
    pub fn fill(property: &mut Property, i: u64) {
        if property.group.is_empty() {
            property.group.push_str("bench");
            property.name.push_str("prop");
            property
                .tags
                .insert("service".into(), TagValue::Str("checkout-frontend".into()));
            property.tags.insert("port".into(), TagValue::Int(0));
            property
                .tags
                .insert("blob".into(), TagValue::Binary(vec![0; 96]));
        }
        property.id.clear();
        let _ = write!(property.id, "id-{i:010}");
        if let Some(TagValue::Int(port)) = property.tags.get_mut("port") {
            *port = (i % 65_536) as i64;
        }
        if let Some(TagValue::Binary(blob)) = property.tags.get_mut("blob") {
            blob[..8].copy_from_slice(&i.to_le_bytes());
        }
        property.mod_revision = 1_700_000_000_000_000_000 + i as i64;
        property.delete_time = 0;
    }

    /// Property number `i` with its blob tag grown to 2000 bytes (about 2 KB canonical): the
    /// large properties of the repair throughput and fill benches.
    pub fn big_property(i: u64) -> Property {
        let mut p = property(i);
        p.tags.insert(
            "blob".into(),
            TagValue::Binary((0..2000u32).map(|b| (u64::from(b) ^ i) as u8).collect()),
        );
        p
    }
}

/// Redb stores of one group (`bench`, one shard) and a repair server over one on loopback:
/// the set-up of the benches that sync over tonic.
pub mod loopback {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use propd_merkle::{Property, Shape};
    use propd_repair::SyncReport;
    use propd_repair::transport::{RepairServer, TransportConfig, sync};
    use propd_store::{GroupDef, Groups, RedbStore, RepairStore, StoreConfig, WriteDurability};
    use tonic::transport::{Channel, ClientTlsConfig, Endpoint, Server, ServerTlsConfig};

    /// The group every bench store holds.
    pub const GROUP: &str = "bench";

    /// An empty store in `dir` holding [`GROUP`] with one shard, default shape.
    pub fn open(dir: &Path, durability: WriteDurability) -> RedbStore {
        let mut config = StoreConfig::new(
            dir,
            Groups::new([GroupDef::new(GROUP, 1, 1)]).expect("valid groups"),
            Shape::default(),
        );
        config.durability = durability;
        RedbStore::open(config).expect("open")
    }

    /// Loads properties `make(0..n)` in key order, `batch` per transaction, then flushes the
    /// tree.
    pub fn bulk_load(store: &RedbStore, n: u64, batch: usize, make: fn(u64) -> Property) {
        let mut pending = Vec::with_capacity(batch);
        for i in 0..n {
            pending.push(make(i));
            if pending.len() == batch || i + 1 == n {
                store
                    .repair_apply_batch(GROUP, 0, std::mem::take(&mut pending))
                    .expect("load");
            }
        }
        store.flush(GROUP, 0).expect("flush");
    }

    /// The TLS settings of both ends (the server's name is `localhost`).
    #[derive(Clone, Debug)]
    pub struct Tls {
        /// The server's identity and the CA it checks clients against.
        pub server: ServerTlsConfig,
        /// The client's identity and the CA it checks the server against.
        pub client: ClientTlsConfig,
    }

    /// A repair server on a free loopback port and a channel to it; dropping it stops the
    /// server.
    #[derive(Debug)]
    pub struct Served {
        /// The connected channel.
        pub channel: Channel,
        server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    }

    impl Drop for Served {
        fn drop(&mut self) {
            self.server.abort();
        }
    }

    /// Serves a [`RepairServer`] over `store` (default transport config) on a free port of
    /// 127.0.0.1, with TLS when `tls` is given, and connects a channel to it.
    pub async fn serve_repair<S: RepairStore + 'static>(
        store: Arc<S>,
        tls: Option<&Tls>,
    ) -> Served {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let service = RepairServer::new(store, TransportConfig::default()).into_service();
        let mut builder = Server::builder();
        if let Some(tls) = tls {
            builder = builder.tls_config(tls.server.clone()).expect("server TLS");
        }
        let server = tokio::spawn(
            builder
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let endpoint = match tls {
            None => Endpoint::from_shared(format!("http://{addr}")).expect("uri"),
            Some(tls) => Endpoint::from_shared(format!("https://localhost:{}", addr.port()))
                .expect("uri")
                .tls_config(tls.client.clone())
                .expect("client TLS"),
        };
        let channel = endpoint.connect().await.expect("connect");
        Served { channel, server }
    }

    /// One sync of `client` as the client (default transport config) against the server of
    /// `served`: its time and the client's report.
    pub async fn timed_sync<S: RepairStore>(served: &Served, client: &S) -> (Duration, SyncReport) {
        let started = Instant::now();
        let report = sync(
            served.channel.clone(),
            client,
            GROUP,
            0,
            &TransportConfig::default(),
        )
        .await
        .expect("sync");
        (started.elapsed(), report)
    }
}

/// Figures of acknowledged writes from concurrent writers: throughput and latency percentiles,
/// shared by the store and cluster write benches.
pub mod acks {
    use std::time::{Duration, Instant};

    /// The writer counts every concurrent write bench measures.
    pub const WRITERS: [usize; 4] = [1, 8, 50, 200];

    /// One round's figures.
    #[derive(Debug, Clone, Copy)]
    pub struct Figures {
        /// Acknowledged writes per second, all writers together.
        pub per_second: f64,
        /// Median latency of one acknowledged write.
        pub p50: Duration,
        /// 99th percentile latency.
        pub p99: Duration,
    }

    impl Figures {
        /// The figures of a round that acknowledged one write per entry of `latencies` in
        /// `elapsed`.
        pub fn of(mut latencies: Vec<Duration>, elapsed: Duration) -> Self {
            assert!(!latencies.is_empty(), "a round acknowledged no write");
            latencies.sort_unstable();
            let at = |fraction: f64| {
                let index = ((latencies.len() as f64 * fraction).ceil() as usize).max(1) - 1;
                latencies[index.min(latencies.len() - 1)]
            };
            Figures {
                per_second: latencies.len() as f64 / elapsed.as_secs_f64(),
                p50: at(0.50),
                p99: at(0.99),
            }
        }

        /// The median round of several, each figure taken on its own.
        pub fn median(rounds: &[Figures]) -> Self {
            fn middle<T: Copy + PartialOrd>(mut values: Vec<T>) -> T {
                values.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
                values[values.len() / 2]
            }
            Figures {
                per_second: middle(rounds.iter().map(|f| f.per_second).collect()),
                p50: middle(rounds.iter().map(|f| f.p50).collect()),
                p99: middle(rounds.iter().map(|f| f.p99).collect()),
            }
        }
    }

    /// One line comparing group commit (`on`) with one sync per write (`off`) at `writers`.
    pub fn compare_line(bench: &str, writers: usize, on: Figures, off: Figures) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        format!(
            "{bench}/{writers} writers: group commit {:.0} writes/s p50 {:.1} ms p99 {:.1} ms; \
             one sync per write {:.0} writes/s p50 {:.1} ms p99 {:.1} ms; throughput x{:.2}, \
             p99 x{:.2}",
            on.per_second,
            ms(on.p50),
            ms(on.p99),
            off.per_second,
            ms(off.p50),
            ms(off.p99),
            on.per_second / off.per_second,
            on.p99.as_secs_f64() / off.p99.as_secs_f64()
        )
    }

    /// For criterion's `iter_custom`: `run(share)` has each of `writers` writers make `share`
    /// writes and returns the time taken, which is scaled to `iters` writes.
    pub fn time_writes(iters: u64, writers: usize, run: impl FnOnce(u64) -> Duration) -> Duration {
        let share = iters.div_ceil(writers as u64).max(1);
        run(share).mul_f64(iters as f64 / (share * writers as u64) as f64)
    }

    /// The claim at `writers`: three timed rounds of each side (0: group commit, 1: one sync per
    /// write), interleaved; `round(side, deadline)` writes until the deadline and returns each
    /// write's latency and the time taken. Prints the medians side by side.
    pub fn claim(
        bench: &str,
        writers: usize,
        mut round: impl FnMut(usize, Instant) -> (Vec<Duration>, Duration),
    ) {
        let mut rounds = [Vec::new(), Vec::new()];
        for _ in 0..3 {
            for (side, figures) in rounds.iter_mut().enumerate() {
                let (latencies, elapsed) = round(side, Instant::now() + round_time());
                figures.push(Figures::of(latencies, elapsed));
            }
        }
        let [on, off] = rounds.map(|side| Figures::median(&side));
        #[allow(
            clippy::print_stdout,
            reason = "a bench prints the figures it measured"
        )]
        {
            println!("{}", compare_line(bench, writers, on, off));
        }
    }

    /// How long one timed round of a concurrent write bench lasts
    /// (`PROPD_BENCH_ROUND_SECONDS`, default 3).
    pub fn round_time() -> Duration {
        let seconds = std::env::var("PROPD_BENCH_ROUND_SECONDS")
            .ok()
            .and_then(|text| text.parse().ok())
            .unwrap_or(3.0);
        Duration::from_secs_f64(seconds)
    }
}

/// Figures a bench measures outside criterion (bytes on the wire, one-off timings), kept beside
/// criterion's results so that `cargo xtask bench-report` can chart them.
pub mod results {
    use std::path::PathBuf;

    /// `<target>/criterion/propd`, found from the bench executable (`<target>/<profile>/deps/`).
    pub fn dir() -> Option<PathBuf> {
        let exe = std::env::current_exe().ok()?;
        let target = exe.parent()?.parent()?.parent()?;
        Some(target.join("criterion").join("propd"))
    }

    /// Writes `json` as `<dir>/<name>.json`; a failure is printed, never fatal (the figures are
    /// printed anyway).
    pub fn record(name: &str, json: &str) {
        let Some(dir) = dir() else {
            return;
        };
        let path = dir.join(format!("{name}.json"));
        let written = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, json));
        if let Err(error) = written {
            #[allow(clippy::print_stderr, reason = "a bench's note on its own output")]
            {
                eprintln!("could not record {}: {error}", path.display());
            }
        }
    }
}
