//! Channels to the other members and what this node believes of their health.
//!
//! Channels connect lazily and reconnect by themselves; health is what the last probe or call
//! saw. Health never changes placement (DESIGN §4): a down node stays in every node list, is
//! skipped while down and repaired when it answers again.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use propd_gossip::transport::MemberChannels;
use propd_proto::MAX_MESSAGE_BYTES;
use propd_proto::peer::is_unreachable;
use propd_proto::v1::admin_service_client::AdminServiceClient;
use propd_proto::v1::property_service_client::PropertyServiceClient;
use tonic::transport::{Channel, Endpoint};

use crate::config::Member;
use crate::node::lock;
use crate::tls::{TlsError, TlsPaths, client_config};

/// How long connecting to a member may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a ping of a member believed down may take before it counts as still down.
const PING_TIMEOUT: Duration = Duration::from_millis(500);

/// The one channel to each member, shared by the property API, repair, the probes and the
/// gossip driver, and the other members' health.
#[derive(Debug)]
pub(crate) struct Peers {
    me: String,
    channels: MemberChannels,
    addresses: Mutex<HashMap<String, SocketAddr>>,
    up: Mutex<HashMap<String, bool>>,
    /// Members whose last probe or call ran out of time: they accept connections but do not
    /// answer (a stopped process), so calling them costs a whole timeout.
    hung: Mutex<HashSet<String>>,
    /// Woken whenever a member is found hung, so that a read waiting for it stops waiting.
    hung_found: tokio::sync::Notify,
}

impl Peers {
    /// Lazy channels to every member (this node's too: the gossip may report to itself); every
    /// other member starts as up (optimistic until a probe says otherwise).
    pub(crate) fn new(me: &str, members: &[Member]) -> Self {
        let addresses = members
            .iter()
            .map(|m| (m.id.clone(), format!("http://{}", m.addr)))
            .collect();
        let up = members
            .iter()
            .filter(|m| m.id != me)
            .map(|m| (m.id.clone(), true))
            .collect();
        Self {
            me: me.to_owned(),
            channels: MemberChannels::new(addresses, CONNECT_TIMEOUT),
            addresses: Mutex::new(members.iter().map(|m| (m.id.clone(), m.addr)).collect()),
            up: Mutex::new(up),
            hung: Mutex::default(),
            hung_found: tokio::sync::Notify::new(),
        }
    }

    /// Replaces the members (a membership change seen in etcd): channels to unchanged members
    /// are kept, a new member starts as up, a member that left is forgotten. With `tls`, every
    /// channel is remade over TLS.
    pub(crate) fn set_members(
        &self,
        members: &[Member],
        tls: Option<&TlsPaths>,
    ) -> Result<(), TlsError> {
        *lock(&self.addresses) = members.iter().map(|m| (m.id.clone(), m.addr)).collect();
        match tls {
            Some(paths) => self.use_tls(paths)?,
            None => self.channels.set_members(
                members
                    .iter()
                    .map(|m| (m.id.clone(), format!("http://{}", m.addr)))
                    .collect(),
            ),
        }
        let mut up = lock(&self.up);
        up.retain(|id, _| members.iter().any(|m| &m.id == id));
        for member in members.iter().filter(|m| m.id != self.me) {
            up.entry(member.id.clone()).or_insert(true);
        }
        Ok(())
    }

    /// Remakes every channel over mutual TLS with the identity in `paths`; each checks that
    /// the member it reaches holds a certificate naming the member id it meant to reach. Called
    /// at start and again whenever the files change (calls in flight finish on the old ones).
    pub(crate) fn use_tls(&self, paths: &TlsPaths) -> Result<(), TlsError> {
        let mut channels = HashMap::new();
        let addresses = lock(&self.addresses).clone();
        for (id, addr) in &addresses {
            let address = format!("https://{addr}");
            let refused = |error: tonic::transport::Error| TlsError::Client {
                member: id.clone(),
                message: error.to_string(),
            };
            let endpoint = Endpoint::from_shared(address.clone())
                .map_err(refused)?
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true)
                .tls_config(client_config(paths, Some(id))?)
                .map_err(refused)?;
            channels.insert(id.clone(), (address, endpoint.connect_lazy()));
        }
        self.channels.replace_channels(channels);
        Ok(())
    }

    /// The pool of channels, for the gossip driver.
    pub(crate) fn channels(&self) -> MemberChannels {
        self.channels.clone()
    }

    /// The channel to another member, `None` for this node or an unknown id.
    pub(crate) fn channel(&self, id: &str) -> Option<Channel> {
        if id == self.me {
            return None;
        }
        self.channels.channel(id)
    }

    /// A property API client for a member.
    pub(crate) fn property_client(&self, id: &str) -> Option<PropertyServiceClient<Channel>> {
        self.channel(id).map(|channel| {
            PropertyServiceClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES)
        })
    }

    /// An admin client for a member.
    pub(crate) fn admin_client(&self, id: &str) -> Option<AdminServiceClient<Channel>> {
        self.channel(id).map(AdminServiceClient::new)
    }

    /// Whether a member is believed up (this node always is).
    pub(crate) fn is_up(&self, id: &str) -> bool {
        id == self.me || lock(&self.up).get(id).copied().unwrap_or(false)
    }

    /// Whether a member is believed hung: down, and its last probe or call timed out rather
    /// than being refused. Requests skip a hung member instead of waiting for it; a member
    /// that is merely down (refusing connections) fails fast and is still called.
    pub(crate) fn is_hung(&self, id: &str) -> bool {
        lock(&self.hung).contains(id)
    }

    /// Resolves the next time a member is found hung (create it before checking
    /// [`Peers::is_hung`], so that no finding is missed in between).
    pub(crate) fn hung_found(&self) -> tokio::sync::futures::Notified<'_> {
        self.hung_found.notified()
    }

    /// Records what a probe or call saw; returns true when the member just came back up.
    pub(crate) fn set_up(&self, id: &str, up: bool) -> bool {
        if up {
            lock(&self.hung).remove(id);
        }
        let mut map = lock(&self.up);
        match map.get_mut(id) {
            Some(state) => {
                let came_back = up && !*state;
                *state = up;
                came_back
            }
            None => false,
        }
    }

    /// Records how a call to member `id` ended: an answer (even an error status) means it is
    /// up; a status that says it could not be reached marks it down, and hung when the call ran
    /// out of time. Returns true when the member just came back up.
    pub(crate) fn saw_call<T>(&self, id: &str, result: &Result<T, tonic::Status>) -> bool {
        match result {
            Err(status) if is_unreachable(status) => {
                // tonic reports a call's own deadline as `Cancelled` ("Timeout expired").
                if matches!(
                    status.code(),
                    tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
                ) {
                    lock(&self.hung).insert(id.to_owned());
                    self.hung_found.notify_waiters();
                }
                self.set_up(id, false)
            }
            Err(_) => false,
            Ok(_) => self.set_up(id, true),
        }
    }

    /// Whether a member answers a ping within [`PING_TIMEOUT`]; records what it saw.
    pub(crate) async fn answers(&self, id: &str) -> bool {
        let Some(mut client) = self.admin_client(id) else {
            return false;
        };
        let mut request = tonic::Request::new(propd_proto::v1::PingRequest {});
        request.set_timeout(PING_TIMEOUT);
        let answer = client.ping(request).await;
        self.saw_call(id, &answer);
        answer.is_ok()
    }

    /// The other members' ids.
    pub(crate) fn others(&self) -> Vec<String> {
        let mut ids: Vec<String> = lock(&self.up).keys().cloned().collect();
        ids.sort();
        ids
    }
}
