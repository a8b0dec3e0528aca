//! Caps on the repair streams this node serves: `repair.max_streams` from all peers together
//! and `repair.max_streams_per_peer` for one peer. Each open stream holds a task, a store
//! snapshot and memory; without a cap one peer (or anyone, without `[tls]`) could open them
//! until the node starves. A stream over a cap is refused with `RESOURCE_EXHAUSTED` before it
//! reads anything; that sync fails and the next round retries it.
//!
//! The peer is the member id its certificate names with `[tls]`, its IP address without.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use propd_proto::v1::RepairRequest;
use propd_proto::v1::repair_service_server::RepairService;
use propd_repair::transport::ResponseStream;
use tokio_stream::StreamExt as _;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Request, Response, Status, Streaming};

use crate::auth::CertIdentity;
use crate::node::lock;

/// How many streams are open, in all and per peer.
#[derive(Debug, Default)]
struct Open {
    total: u32,
    by_peer: HashMap<String, u32>,
}

/// The two caps and the streams open now.
#[derive(Debug)]
pub(crate) struct StreamLimits {
    max_total: u32,
    max_per_peer: u32,
    open: Mutex<Open>,
}

/// One open stream, counted until it is dropped.
#[derive(Debug)]
pub(crate) struct StreamPermit {
    limits: Arc<StreamLimits>,
    peer: String,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut open = lock(&self.limits.open);
        open.total -= 1;
        if let Some(count) = open.by_peer.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                open.by_peer.remove(&self.peer);
            }
        }
    }
}

impl StreamLimits {
    /// Caps of `max_total` streams in all and `max_per_peer` per peer.
    pub(crate) fn new(max_total: u32, max_per_peer: u32) -> Arc<Self> {
        Arc::new(Self {
            max_total,
            max_per_peer,
            open: Mutex::new(Open::default()),
        })
    }

    /// Counts one more stream for `peer`, or refuses it naming the cap it would pass.
    pub(crate) fn acquire(self: &Arc<Self>, peer: &str) -> Result<StreamPermit, Status> {
        let mut open = lock(&self.open);
        let mine = open.by_peer.get(peer).copied().unwrap_or(0);
        if mine >= self.max_per_peer {
            return Err(Status::resource_exhausted(format!(
                "{mine} repair streams from {peer} are open, the limit per peer (repair.max_streams_per_peer)"
            )));
        }
        if open.total >= self.max_total {
            return Err(Status::resource_exhausted(format!(
                "{} repair streams are open, the limit (repair.max_streams)",
                open.total
            )));
        }
        open.total += 1;
        *open.by_peer.entry(peer.to_owned()).or_default() += 1;
        Ok(StreamPermit {
            limits: Arc::clone(self),
            peer: peer.to_owned(),
        })
    }
}

/// Who opened a stream: the member id (first DNS name) of its TLS certificate, else its IP.
fn peer_of<T>(request: &Request<T>) -> String {
    let certificate = request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(TlsConnectInfo::peer_certs)
        .and_then(|certs| {
            certs
                .first()
                .and_then(|c| CertIdentity::from_der(c.as_ref()))
        })
        .and_then(|identity| identity.dns.into_iter().next());
    certificate
        .or_else(|| request.remote_addr().map(|addr| addr.ip().to_string()))
        .unwrap_or_else(|| "unknown".to_owned())
}

/// A repair service that serves at most as many streams at once as [`StreamLimits`] allows.
pub(crate) struct LimitedRepair<R> {
    inner: R,
    limits: Arc<StreamLimits>,
}

impl<R> LimitedRepair<R> {
    /// `inner` under `limits`.
    pub(crate) fn new(inner: R, limits: Arc<StreamLimits>) -> Self {
        Self { inner, limits }
    }
}

#[tonic::async_trait]
impl<R> RepairService for LimitedRepair<R>
where
    R: RepairService<RepairStream = ResponseStream>,
{
    type RepairStream = ResponseStream;

    async fn repair(
        &self,
        request: Request<Streaming<RepairRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let peer = peer_of(&request);
        let permit = self.limits.acquire(&peer).inspect_err(|status| {
            tracing::warn!(peer, message = status.message(), "repair stream refused");
        })?;
        let (metadata, stream, extensions) = self.inner.repair(request).await?.into_parts();
        Ok(Response::from_parts(
            metadata,
            holding(stream, permit),
            extensions,
        ))
    }
}

/// `stream`, counted by `permit` as long as it lives: until the sync ends or is dropped.
fn holding(stream: ResponseStream, permit: StreamPermit) -> ResponseStream {
    Box::pin(stream.map(move |item| {
        let _open = &permit;
        item
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_gets_its_share_and_all_peers_the_total() {
        let limits = StreamLimits::new(3, 2);
        let a1 = limits.acquire("a").unwrap();
        let _a2 = limits.acquire("a").unwrap();
        let refused = limits.acquire("a").unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused.message().contains("repair.max_streams_per_peer"),
            "{}",
            refused.message()
        );
        let _b1 = limits.acquire("b").unwrap();
        let refused = limits.acquire("c").unwrap_err();
        assert!(
            refused.message().contains("(repair.max_streams)"),
            "{}",
            refused.message()
        );
        drop(a1);
        let _c1 = limits.acquire("c").unwrap();
        assert!(limits.acquire("a").is_err(), "the total is full again");
    }

    #[test]
    fn a_stream_counts_until_it_is_dropped() {
        let limits = StreamLimits::new(8, 1);
        let open = holding(
            Box::pin(tokio_stream::pending()),
            limits.acquire("a").unwrap(),
        );
        assert!(limits.acquire("a").is_err());
        drop(open);
        assert!(limits.acquire("a").is_ok());
    }
}
