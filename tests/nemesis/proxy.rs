//! A fault-injecting TCP proxy on 127.0.0.1, one listener per directed link.
//!
//! A node dials its peers at the member addresses of its own config, so every node's config
//! lists, for each other member, the address of the listener of the link (that node → that
//! member); clients get a link of their own per node. A connection's link is therefore known from
//! the listener it arrived on, and rules apply per directed pair: the nemesis can hold the bytes
//! of one direction (a partition: held, not lost, as TCP would retransmit them once the network
//! heals), delay them with jitter, limit their rate, close new connections as soon as they are
//! accepted, and cut every open connection of a link mid-stream.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::rng::Rng;

/// Who opens the connections of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Endpoint {
    /// The workload's clients.
    Client,
    /// Node `i` (index into the cluster's nodes).
    Node(usize),
}

/// A directed link: the connections that `from` opens to node `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Link {
    /// The dialer.
    pub from: Endpoint,
    /// The node dialed.
    pub to: usize,
}

/// The two directions of bytes on a link's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// From the dialer to the node dialed.
    Request,
    /// From the node dialed back to the dialer.
    Response,
}

/// What a link does to its traffic. The default passes everything through untouched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    /// Bytes from the dialer are held (not delivered, not lost) while set.
    pub hold_requests: bool,
    /// Bytes to the dialer are held while set.
    pub hold_responses: bool,
    /// New connections are closed as soon as they are accepted.
    pub refuse: bool,
    /// Every chunk of bytes is delivered this much later ...
    pub delay: Duration,
    /// ... plus a uniformly drawn extra of at most this (order is kept).
    pub jitter: Duration,
    /// Bytes per second in each direction; 0 for no limit.
    pub bandwidth: u64,
}

impl Rules {
    fn holds(&self, flow: Flow) -> bool {
        match flow {
            Flow::Request => self.hold_requests,
            Flow::Response => self.hold_responses,
        }
    }
}

/// What a link has seen, for reports and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Connections accepted and forwarded.
    pub accepted: u64,
    /// Connections closed at once because the link refused them.
    pub refused: u64,
    /// Open connections closed by a cut.
    pub cut: u64,
}

#[derive(Debug)]
struct Shared {
    rules: watch::Sender<Rules>,
    /// Bumped by every cut; a connection closes when it differs from the value it started with.
    cuts: watch::Sender<u64>,
    stats: Mutex<LinkStats>,
}

impl Shared {
    fn count(&self, f: impl FnOnce(&mut LinkStats)) {
        f(&mut self.stats.lock().expect("proxy stats lock poisoned"));
    }
}

#[derive(Debug)]
struct LinkHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

/// The listeners of every link, and their rules. Dropping it closes every listener and cuts
/// every connection.
#[derive(Debug)]
pub struct Proxy {
    links: BTreeMap<Link, LinkHandle>,
}

impl Proxy {
    /// Binds one listener on 127.0.0.1 for each `(link, target)` and starts forwarding to the
    /// target. `seed` draws the jitter.
    pub async fn start(
        links: impl IntoIterator<Item = (Link, SocketAddr)>,
        seed: u64,
    ) -> std::io::Result<Proxy> {
        let mut handles = BTreeMap::new();
        for (n, (link, target)) in links.into_iter().enumerate() {
            let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
            let addr = listener.local_addr()?;
            let shared = Arc::new(Shared {
                rules: watch::channel(Rules::default()).0,
                cuts: watch::channel(0).0,
                stats: Mutex::new(LinkStats::default()),
            });
            let accept = tokio::spawn(accept_loop(
                listener,
                target,
                Arc::clone(&shared),
                Rng::stream(seed, n as u64),
            ));
            handles.insert(
                link,
                LinkHandle {
                    addr,
                    shared,
                    accept,
                },
            );
        }
        Ok(Proxy { links: handles })
    }

    fn handle(&self, link: Link) -> &LinkHandle {
        self.links
            .get(&link)
            .unwrap_or_else(|| panic!("the proxy has no link {link:?}"))
    }

    /// Every link, in order.
    pub fn links(&self) -> impl Iterator<Item = Link> + '_ {
        self.links.keys().copied()
    }

    /// The address to dial for `link`.
    pub fn addr(&self, link: Link) -> SocketAddr {
        self.handle(link).addr
    }

    /// The rules of `link` now.
    pub fn rules(&self, link: Link) -> Rules {
        self.handle(link).shared.rules.borrow().clone()
    }

    /// Changes the rules of `link`; open connections follow at once.
    pub fn update(&self, link: Link, change: impl FnOnce(&mut Rules)) {
        self.handle(link).shared.rules.send_modify(change);
    }

    /// Closes every open connection of `link`, mid-stream.
    pub fn cut(&self, link: Link) {
        self.handle(link).shared.cuts.send_modify(|g| *g += 1);
    }

    /// Default rules on every link.
    pub fn heal_all(&self) {
        for handle in self.links.values() {
            handle.shared.rules.send_replace(Rules::default());
        }
    }

    /// What `link` has seen so far.
    pub fn stats(&self, link: Link) -> LinkStats {
        *self
            .handle(link)
            .shared
            .stats
            .lock()
            .expect("proxy stats lock poisoned")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for handle in self.links.values() {
            handle.accept.abort();
            handle.shared.cuts.send_modify(|g| *g += 1);
        }
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>, mut rng: Rng) {
    loop {
        let inbound = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of descriptors or similar: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        if shared.rules.borrow().refuse {
            shared.count(|s| s.refused += 1);
            drop(inbound);
            continue;
        }
        shared.count(|s| s.accepted += 1);
        let generation = *shared.cuts.borrow();
        tokio::spawn(connection(
            inbound,
            target,
            Arc::clone(&shared),
            generation,
            rng.next_u64(),
        ));
    }
}

/// Forwards one accepted connection until both sides close, either fails, or a cut.
async fn connection(
    inbound: TcpStream,
    target: SocketAddr,
    shared: Arc<Shared>,
    generation: u64,
    seed: u64,
) {
    let mut cuts = shared.cuts.subscribe();
    let cut = async move {
        loop {
            if *cuts.borrow_and_update() != generation {
                return;
            }
            if cuts.changed().await.is_err() {
                return;
            }
        }
    };
    let forward = async {
        // A node that is down refuses; the dialer then sees its connection closed.
        let outbound =
            match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(target)).await {
                Ok(Ok(stream)) => stream,
                _ => return,
            };
        let _ = inbound.set_nodelay(true);
        let _ = outbound.set_nodelay(true);
        let (from_dialer, to_dialer) = inbound.into_split();
        let (from_target, to_target) = outbound.into_split();
        let requests = pump(
            from_dialer,
            to_target,
            shared.rules.subscribe(),
            Flow::Request,
            Rng::new(seed),
        );
        let responses = pump(
            from_target,
            to_dialer,
            shared.rules.subscribe(),
            Flow::Response,
            Rng::new(seed ^ 0x5555),
        );
        let _ = tokio::try_join!(requests, responses);
    };
    tokio::select! {
        () = cut => shared.count(|s| s.cut += 1),
        () = forward => {}
    }
}

/// Copies one direction, applying the link's rules; `Ok` when the reader reached its end (the
/// end is forwarded), `Err` when either socket failed.
async fn pump(
    mut reader: OwnedReadHalf,
    mut writer: OwnedWriteHalf,
    rules: watch::Receiver<Rules>,
    flow: Flow,
    mut rng: Rng,
) -> std::io::Result<()> {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(64);
    let read_rules = rules.clone();
    let read_side = async move {
        let mut buf = vec![0_u8; 16 * 1024];
        let mut last = Instant::now();
        loop {
            let n = reader.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), std::io::Error>(());
            }
            let (delay, jitter) = {
                let r = read_rules.borrow();
                (r.delay, r.jitter)
            };
            let extra = if jitter.is_zero() {
                Duration::ZERO
            } else {
                Duration::from_micros(rng.below(jitter.as_micros() as u64 + 1))
            };
            // Never before an earlier chunk: TCP keeps order.
            let at = (Instant::now() + delay + extra).max(last);
            last = at;
            if tx.send((at, buf[..n].to_vec())).await.is_err() {
                return Ok(());
            }
        }
    };
    let mut write_rules = rules;
    let write_side = async move {
        while let Some((at, bytes)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            let mut rest = bytes.as_slice();
            while !rest.is_empty() {
                wait_while_held(&mut write_rules, flow).await;
                let bandwidth = write_rules.borrow().bandwidth;
                if bandwidth == 0 {
                    writer.write_all(rest).await?;
                    rest = &[];
                } else {
                    // Slices of a twentieth of a second each.
                    let slice = ((bandwidth / 20).max(1) as usize).min(rest.len());
                    writer.write_all(&rest[..slice]).await?;
                    rest = &rest[slice..];
                    tokio::time::sleep(Duration::from_secs_f64(slice as f64 / bandwidth as f64))
                        .await;
                }
            }
        }
        writer.shutdown().await
    };
    tokio::try_join!(read_side, write_side).map(|_| ())
}

async fn wait_while_held(rules: &mut watch::Receiver<Rules>, flow: Flow) {
    loop {
        if !rules.borrow_and_update().holds(flow) {
            return;
        }
        if rules.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server; returns its address.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    const A: Link = Link {
        from: Endpoint::Node(0),
        to: 1,
    };
    const B: Link = Link {
        from: Endpoint::Client,
        to: 1,
    };

    async fn proxy() -> Proxy {
        let target = echo().await;
        Proxy::start([(A, target), (B, target)], 1).await.unwrap()
    }

    /// Writes `data` and reads as many bytes back, within `limit`.
    async fn round_trip(
        stream: &mut TcpStream,
        data: &[u8],
        limit: Duration,
    ) -> Result<Vec<u8>, String> {
        stream.write_all(data).await.map_err(|e| e.to_string())?;
        let mut back = vec![0_u8; data.len()];
        match tokio::time::timeout(limit, stream.read_exact(&mut back)).await {
            Ok(Ok(_)) => Ok(back),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".to_owned()),
        }
    }

    #[tokio::test]
    async fn passes_bytes_through_untouched_by_default() {
        let proxy = proxy().await;
        let mut stream = TcpStream::connect(proxy.addr(A)).await.unwrap();
        let data: Vec<u8> = (0..100_000_u32).map(|i| (i % 251) as u8).collect();
        let back = round_trip(&mut stream, &data, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(back, data);
        assert_eq!(proxy.stats(A).accepted, 1);
        assert_eq!(proxy.stats(B).accepted, 0);
    }

    #[tokio::test]
    async fn held_bytes_arrive_intact_after_the_heal_and_only_on_their_link() {
        let proxy = proxy().await;
        let mut a = TcpStream::connect(proxy.addr(A)).await.unwrap();
        let mut b = TcpStream::connect(proxy.addr(B)).await.unwrap();
        proxy.update(A, |r| r.hold_requests = true);
        let err = round_trip(&mut a, b"held", Duration::from_millis(300))
            .await
            .unwrap_err();
        assert_eq!(err, "timed out");
        // The other link still passes.
        assert_eq!(
            round_trip(&mut b, b"free", Duration::from_secs(2))
                .await
                .unwrap(),
            b"free"
        );
        proxy.update(A, |r| r.hold_requests = false);
        let mut back = [0_u8; 4];
        tokio::time::timeout(Duration::from_secs(2), a.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&back, b"held");
    }

    #[tokio::test]
    async fn held_responses_block_only_the_way_back() {
        let proxy = proxy().await;
        let mut a = TcpStream::connect(proxy.addr(A)).await.unwrap();
        proxy.update(A, |r| r.hold_responses = true);
        assert!(
            round_trip(&mut a, b"x", Duration::from_millis(300))
                .await
                .is_err()
        );
        proxy.heal_all();
        let mut back = [0_u8; 1];
        tokio::time::timeout(Duration::from_secs(2), a.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&back, b"x");
    }

    #[tokio::test]
    async fn refused_connections_close_at_once() {
        let proxy = proxy().await;
        proxy.update(A, |r| r.refuse = true);
        let mut a = TcpStream::connect(proxy.addr(A)).await.unwrap();
        let mut buf = [0_u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(2), a.read(&mut buf))
            .await
            .expect("a refused connection closes, it does not hang");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert_eq!(proxy.stats(A).refused, 1);
        proxy.update(A, |r| r.refuse = false);
        let mut again = TcpStream::connect(proxy.addr(A)).await.unwrap();
        assert!(
            round_trip(&mut again, b"ok", Duration::from_secs(2))
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn a_cut_closes_open_connections_mid_stream_and_not_later_ones() {
        let proxy = proxy().await;
        let mut a = TcpStream::connect(proxy.addr(A)).await.unwrap();
        let mut b = TcpStream::connect(proxy.addr(B)).await.unwrap();
        round_trip(&mut a, b"before", Duration::from_secs(2))
            .await
            .unwrap();
        proxy.cut(A);
        let mut buf = [0_u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(2), a.read(&mut buf))
            .await
            .expect("a cut connection closes");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert_eq!(proxy.stats(A).cut, 1);
        // Other links and new connections are untouched.
        round_trip(&mut b, b"still", Duration::from_secs(2))
            .await
            .unwrap();
        let mut later = TcpStream::connect(proxy.addr(A)).await.unwrap();
        round_trip(&mut later, b"after", Duration::from_secs(2))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn delay_slows_each_direction() {
        let proxy = proxy().await;
        proxy.update(A, |r| {
            r.delay = Duration::from_millis(100);
            r.jitter = Duration::from_millis(20);
        });
        let mut a = TcpStream::connect(proxy.addr(A)).await.unwrap();
        let started = std::time::Instant::now();
        round_trip(&mut a, b"slow", Duration::from_secs(2))
            .await
            .unwrap();
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(200),
            "a round trip crosses the delay twice: {took:?}"
        );
    }

    #[tokio::test]
    async fn bandwidth_limits_the_rate() {
        let proxy = proxy().await;
        proxy.update(A, |r| r.bandwidth = 100_000);
        let mut a = TcpStream::connect(proxy.addr(A)).await.unwrap();
        let data = vec![7_u8; 30_000];
        let started = std::time::Instant::now();
        let back = round_trip(&mut a, &data, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(back, data);
        let took = started.elapsed();
        // 30 kB at 100 kB/s goes in six slices of 5 kB, a twentieth of a second apart: the
        // last slice leaves at least 0.25 s after the first.
        assert!(took >= Duration::from_millis(250), "{took:?}");
    }

    #[tokio::test]
    async fn a_dialer_of_a_dead_target_sees_its_connection_closed() {
        let dead = {
            let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
            listener.local_addr().unwrap()
        };
        let proxy = Proxy::start([(A, dead)], 3).await.unwrap();
        let mut a = TcpStream::connect(proxy.addr(A)).await.unwrap();
        let mut buf = [0_u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), a.read(&mut buf))
            .await
            .expect("closed, not hung");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
}
