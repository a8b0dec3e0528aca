//! Shared data generators for the criterion benches in `benches/`.

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
