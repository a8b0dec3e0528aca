//! The workload: concurrent clients doing puts, deletes and gets on a small key space through
//! every node, each recording what it asked and what it was told.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use propd_proto::v1::property_service_client::PropertyServiceClient;
use propd_proto::v1::{self, tag_value};
use tonic::transport::{Channel, Endpoint};

use super::history::{History, Op, Outcome, Request, Version, now_nanos};
use super::rng::Rng;

/// The tag holding each put's unique value.
pub const VALUE_TAG: &str = "v";
/// The property name of every entity of the workload.
pub const NAME: &str = "item";

/// What the clients do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Concurrent clients.
    pub clients: usize,
    /// The number of the first client: loads that share one history number their clients
    /// apart, so that every value written in it is unique (`c<client>-<sequence>`).
    pub first_client: usize,
    /// Entities, spread round-robin over the groups.
    pub entities: usize,
    /// Groups.
    pub groups: Vec<String>,
    /// Bound on one request, after which its outcome is indeterminate.
    pub timeout: Duration,
    /// The seed (each client draws from its own stream of it).
    pub seed: u64,
}

impl Workload {
    /// The entity with this index: `(group, name, id)`.
    pub fn entity(&self, index: usize) -> (String, String, String) {
        (
            self.groups[index % self.groups.len()].clone(),
            NAME.to_owned(),
            format!("{index}"),
        )
    }
}

/// A channel to `addr` that connects lazily and reconnects by itself.
pub fn channel(addr: SocketAddr, timeout: Duration) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("a socket address is a valid URI")
        .connect_timeout(Duration::from_secs(1))
        .timeout(timeout)
        .tcp_nodelay(true)
        .connect_lazy()
}

/// Whether an error proves that nothing was written: only a refusal of the request itself.
fn definite(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::InvalidArgument
            | tonic::Code::FailedPrecondition
            | tonic::Code::OutOfRange
            | tonic::Code::Unimplemented
            | tonic::Code::Unauthenticated
            | tonic::Code::PermissionDenied
    )
}

fn failure(status: &tonic::Status) -> Outcome {
    let error = format!("{:?}: {}", status.code(), status.message());
    if definite(status) {
        Outcome::Failed { error }
    } else {
        Outcome::Indeterminate { error }
    }
}

/// The version a wire property stands for.
pub fn version_of(property: &v1::Property) -> Version {
    let value = (property.delete_time == 0).then(|| {
        property
            .tags
            .iter()
            .find(|tag| tag.key == VALUE_TAG)
            .and_then(|tag| tag.value.as_ref())
            .and_then(|value| match &value.value {
                Some(tag_value::Value::Str(text)) => Some(text.clone()),
                _ => None,
            })
            .unwrap_or_default()
    });
    Version {
        revision: property.mod_revision,
        value,
    }
}

/// Runs every client until `stop` flips to true, recording into `history`. `coordinators`
/// holds the address through which each node is reached.
pub async fn run(
    workload: &Workload,
    coordinators: &[SocketAddr],
    history: Arc<History>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let channels: Vec<Channel> = coordinators
        .iter()
        .map(|addr| channel(*addr, workload.timeout))
        .collect();
    let mut clients = tokio::task::JoinSet::new();
    for client in workload.first_client..workload.first_client + workload.clients {
        let workload = workload.clone();
        let channels = channels.clone();
        let history = Arc::clone(&history);
        let stop = stop.clone();
        clients.spawn(async move {
            one_client(client, &workload, &channels, &history, stop).await;
        });
    }
    while clients.join_next().await.is_some() {}
}

async fn one_client(
    client: usize,
    workload: &Workload,
    channels: &[Channel],
    history: &History,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut rng = Rng::stream(workload.seed, 1_000 + client as u64);
    let mut sequence = 0_u64;
    while !*stop.borrow() {
        let coordinator = rng.below(channels.len() as u64) as usize;
        let mut api = PropertyServiceClient::new(channels[coordinator].clone());
        let (group, name, id) = workload.entity(rng.below(workload.entities as u64) as usize);
        let roll = rng.below(100);
        let start = now_nanos();
        let (request, outcome) = if roll < 45 {
            sequence += 1;
            let value = format!("c{client}-{sequence}");
            let property = v1::Property {
                group: group.clone(),
                name: name.clone(),
                id: id.clone(),
                tags: vec![v1::Tag {
                    key: VALUE_TAG.to_owned(),
                    value: Some(v1::TagValue {
                        value: Some(tag_value::Value::Str(value.clone())),
                    }),
                }],
                mod_revision: 0,
                delete_time: 0,
            };
            let outcome = match api
                .apply(v1::ApplyRequest {
                    property: Some(property),
                    local: false,
                })
                .await
            {
                Ok(answer) => {
                    let answer = answer.into_inner();
                    answered(answer.mod_revision, answer.superseded)
                }
                Err(status) => failure(&status),
            };
            (Request::Put { value }, outcome)
        } else if roll < 60 {
            let outcome = match api
                .delete(v1::DeleteRequest {
                    group: group.clone(),
                    name: name.clone(),
                    id: id.clone(),
                    mod_revision: 0,
                    delete_time: 0,
                    local: false,
                })
                .await
            {
                Ok(answer) => {
                    let answer = answer.into_inner();
                    answered(answer.mod_revision, answer.superseded)
                }
                Err(status) => failure(&status),
            };
            (Request::Delete, outcome)
        } else {
            let outcome = match api
                .get(v1::GetRequest {
                    group: group.clone(),
                    name: name.clone(),
                    id: id.clone(),
                    local: false,
                    include_deleted: false,
                })
                .await
            {
                Ok(answer) => Outcome::Read {
                    found: answer.into_inner().property.as_ref().map(version_of),
                },
                Err(status) => failure(&status),
            };
            (Request::Get, outcome)
        };
        history.record(Op {
            client,
            coordinator,
            entity: format!("{group}/{name}/{id}"),
            request,
            outcome,
            start,
            end: now_nanos(),
        });
        tokio::time::sleep(Duration::from_millis(rng.between(0, 20))).await;
    }
}

/// What an answered write did: acknowledged with its revision, unless it answered that it lost to
/// a newer version (`superseded`). Such a write is not acknowledged, yet a copy that lacked the
/// newer version may hold it until repair replaces it, so reads may see it meanwhile: it is
/// recorded as indeterminate.
fn answered(revision: i64, superseded: i64) -> Outcome {
    if superseded == 0 {
        Outcome::Written { revision }
    } else {
        Outcome::Indeterminate {
            error: format!("superseded by revision {superseded} (written with {revision})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entities_spread_over_the_groups() {
        let workload = Workload {
            clients: 8,
            first_client: 0,
            entities: 6,
            groups: vec!["g0".to_owned(), "g1".to_owned(), "g2".to_owned()],
            timeout: Duration::from_secs(1),
            seed: 1,
        };
        let groups: Vec<String> = (0..6).map(|i| workload.entity(i).0).collect();
        assert_eq!(groups, ["g0", "g1", "g2", "g0", "g1", "g2"]);
        assert_eq!(workload.entity(4).2, "4");
    }

    #[test]
    fn versions_read_the_value_tag_and_tombstones() {
        let mut property = v1::Property {
            group: "g0".to_owned(),
            name: NAME.to_owned(),
            id: "1".to_owned(),
            tags: vec![v1::Tag {
                key: VALUE_TAG.to_owned(),
                value: Some(v1::TagValue {
                    value: Some(tag_value::Value::Str("c1-1".to_owned())),
                }),
            }],
            mod_revision: 5,
            delete_time: 0,
        };
        assert_eq!(
            version_of(&property),
            Version {
                revision: 5,
                value: Some("c1-1".to_owned())
            }
        );
        property.delete_time = 9;
        assert_eq!(version_of(&property).value, None);
        property.delete_time = 0;
        property.tags.clear();
        assert_eq!(version_of(&property).value.as_deref(), Some(""));
    }

    #[test]
    fn a_write_answered_superseded_is_not_acknowledged() {
        assert_eq!(answered(7, 0), Outcome::Written { revision: 7 });
        assert!(matches!(answered(7, 9), Outcome::Indeterminate { .. }));
    }

    #[test]
    fn only_refusals_of_the_request_are_definite_failures() {
        assert!(matches!(
            failure(&tonic::Status::invalid_argument("bad")),
            Outcome::Failed { .. }
        ));
        for status in [
            tonic::Status::unavailable("only 1 of 3 copies"),
            tonic::Status::deadline_exceeded("slow"),
            tonic::Status::internal("store"),
            tonic::Status::cancelled("gone"),
        ] {
            assert!(
                matches!(failure(&status), Outcome::Indeterminate { .. }),
                "{status:?}"
            );
        }
    }
}
