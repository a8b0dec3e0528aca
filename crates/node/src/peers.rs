//! Channels to the other members and what this node believes of their health.
//!
//! Channels connect lazily and reconnect by themselves; health is what the last probe or call
//! saw. Health never changes placement (DESIGN §4): a down node stays in every node list, is
//! skipped while down and repaired when it answers again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use propd_proto::MAX_MESSAGE_BYTES;
use propd_proto::v1::admin_service_client::AdminServiceClient;
use propd_proto::v1::property_service_client::PropertyServiceClient;
use tonic::transport::{Channel, Endpoint};

use crate::config::Member;
use crate::node::lock;

/// How long connecting to a member may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The other members' channels and health.
#[derive(Debug)]
pub(crate) struct Peers {
    me: String,
    channels: HashMap<String, Channel>,
    up: Mutex<HashMap<String, bool>>,
}

impl Peers {
    /// Lazy channels to every member but `me`; all start as up (optimistic until a probe says
    /// otherwise).
    pub(crate) fn new(me: &str, members: &[Member]) -> Self {
        let mut channels = HashMap::new();
        let mut up = HashMap::new();
        for member in members.iter().filter(|m| m.id != me) {
            let endpoint = Endpoint::from_shared(format!("http://{}", member.addr))
                .expect("a socket address is a valid URI")
                .connect_timeout(CONNECT_TIMEOUT)
                .tcp_nodelay(true);
            channels.insert(member.id.clone(), endpoint.connect_lazy());
            up.insert(member.id.clone(), true);
        }
        Self {
            me: me.to_owned(),
            channels,
            up: Mutex::new(up),
        }
    }

    /// The channel to a member, `None` for this node or an unknown id.
    pub(crate) fn channel(&self, id: &str) -> Option<Channel> {
        self.channels.get(id).cloned()
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

    /// Records what a probe or call saw; returns true when the member just came back up.
    pub(crate) fn set_up(&self, id: &str, up: bool) -> bool {
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

    /// The other members' ids.
    pub(crate) fn others(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.channels.keys().cloned().collect();
        ids.sort();
        ids
    }
}
