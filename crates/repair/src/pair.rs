//! A deterministic in-memory harness: one client and one server joined by two message queues.
//!
//! Tests and benches use it to run the real protocol without sockets: [`Pair::step`] moves one
//! message each way, [`Pair::drive_bounded`] steps until both sides finish. Messages can be
//! inspected, dropped or injected between steps.

use std::collections::VecDeque;

use propd_proto::v1 as pb;

use crate::client::Client;
use crate::config::Config;
use crate::error::SyncError;
use crate::report::{ServerReport, SyncReport};
use crate::server::Server;
use crate::store_api::RepairStore;

/// Which side failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PairError {
    /// The client failed.
    #[error("client: {0}")]
    Client(SyncError),
    /// The server failed.
    #[error("server: {0}")]
    Server(SyncError),
    /// The sync did not finish: the step bound was reached, or a step moved nothing.
    #[error("not finished after {steps} steps")]
    Stalled {
        /// The bound.
        steps: usize,
    },
}

/// A client store and a server store, with the two state machines and the messages in flight.
#[derive(Debug)]
pub struct Pair<'a, C, S> {
    client_store: &'a C,
    server_store: &'a S,
    /// The client.
    pub client: Client,
    /// The server.
    pub server: Server,
    /// Client messages not yet delivered.
    pub to_server: VecDeque<pb::RepairRequest>,
    /// Server messages not yet delivered.
    pub to_client: VecDeque<pb::RepairResponse>,
    steps: usize,
}

impl<'a, C: RepairStore, S: RepairStore> Pair<'a, C, S> {
    /// A pair about to sync (group, shard); both sides use `config`.
    pub fn new(
        client_store: &'a C,
        server_store: &'a S,
        group: &str,
        shard: u32,
        config: Config,
    ) -> Result<Self, PairError> {
        Self::with_configs(
            client_store,
            server_store,
            group,
            shard,
            config.clone(),
            config,
        )
    }

    /// A pair whose sides use different configs (another protocol version, other limits).
    pub fn with_configs(
        client_store: &'a C,
        server_store: &'a S,
        group: &str,
        shard: u32,
        client_config: Config,
        server_config: Config,
    ) -> Result<Self, PairError> {
        let client =
            Client::new(client_store, group, shard, client_config).map_err(PairError::Client)?;
        let server = Server::new(server_config).map_err(PairError::Server)?;
        Ok(Pair {
            client_store,
            server_store,
            client,
            server,
            to_server: VecDeque::new(),
            to_client: VecDeque::new(),
            steps: 0,
        })
    }

    /// Whether both sides finished and nothing is in flight.
    pub fn is_finished(&self) -> bool {
        self.client.is_done()
            && self.server.is_done()
            && self.to_server.is_empty()
            && self.to_client.is_empty()
    }

    /// One step: each side emits at most one message, then at most one message is delivered each
    /// way (the server reads only when it has nothing left to send, as the driver does).
    /// Returns whether anything happened.
    pub fn step(&mut self) -> Result<bool, PairError> {
        self.steps += 1;
        let mut progress = false;
        if let Some(msg) = self
            .client
            .poll_transmit(self.client_store)
            .map_err(PairError::Client)?
        {
            self.to_server.push_back(msg);
            progress = true;
        }
        let server_out = self
            .server
            .poll_transmit(self.server_store)
            .map_err(PairError::Server)?;
        let server_idle = server_out.is_none();
        if let Some(msg) = server_out {
            self.to_client.push_back(msg);
            progress = true;
        }
        if server_idle && let Some(msg) = self.to_server.pop_front() {
            self.server
                .handle(self.server_store, msg)
                .map_err(PairError::Server)?;
            progress = true;
        }
        if let Some(msg) = self.to_client.pop_front() {
            self.client
                .handle(self.client_store, msg)
                .map_err(PairError::Client)?;
            progress = true;
        }
        Ok(progress)
    }

    /// Steps until both sides finish, at most `max_steps` steps; returns both reports. A step in
    /// which nothing happens before both finish is a stall (an error), not a wait.
    pub fn drive_bounded(
        &mut self,
        max_steps: usize,
    ) -> Result<(SyncReport, ServerReport), PairError> {
        let start = self.steps;
        while !self.is_finished() {
            if self.steps - start >= max_steps || (!self.step()? && !self.is_finished()) {
                return Err(PairError::Stalled {
                    steps: self.steps - start,
                });
            }
        }
        Ok((self.client.report().clone(), self.server.report().clone()))
    }

    /// Steps taken so far.
    pub fn steps(&self) -> usize {
        self.steps
    }
}

/// Runs one whole sync in memory and returns the client's and the server's reports.
pub fn sync_in_memory<C: RepairStore, S: RepairStore>(
    client_store: &C,
    server_store: &S,
    group: &str,
    shard: u32,
    config: Config,
) -> Result<(SyncReport, ServerReport), PairError> {
    let mut pair = Pair::new(client_store, server_store, group, shard, config)?;
    pair.drive_bounded(10_000_000)
}
