//! Who may call what: every RPC needs a permission, and the caller's TLS certificate grants
//! some.
//!
//! A certificate whose DNS name (SAN) is a configured member id is that member: it may call
//! everything, peer-only services included (replica writes, gossip, repair streams, the
//! complete-round notice, liveness probes). Any other certificate from the cluster CA is a
//! client whose role is the URI SAN `propd:role:read`, `propd:role:write` or
//! `propd:role:admin`; each role includes the smaller ones. The role travels in the
//! certificate because the connection is mutually authenticated anyway: one credential, checked
//! once by the TLS handshake (CA, expiry), revocable by rotating the CA, with no token file to
//! keep in step across nodes.
//!
//! Without `[tls]` every call is allowed (the single-node loopback default).

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll};

use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::metrics::AuthRefusals;

/// The URI SAN prefix that carries a client's role.
pub(crate) const ROLE_PREFIX: &str = "propd:role:";

/// What an RPC needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Permission {
    /// Any certificate from the cluster CA, with or without a role: health checks.
    Authenticated,
    /// Get, query, tree, status, round results and progress, server reflection.
    Read,
    /// Put and delete.
    Write,
    /// Starting rounds, pause/resume, throttle, import.
    Admin,
    /// Only another member.
    Peer,
}

impl Permission {
    fn name(self) -> &'static str {
        match self {
            Permission::Authenticated => "any",
            Permission::Read => "read",
            Permission::Write => "write",
            Permission::Admin => "admin",
            Permission::Peer => "member",
        }
    }

    fn from_role(role: &str) -> Option<Self> {
        match role {
            "read" => Some(Permission::Read),
            "write" => Some(Permission::Write),
            "admin" => Some(Permission::Admin),
            _ => None,
        }
    }
}

/// The permission a gRPC method (`/package.Service/Method`) needs. A method not listed needs
/// a member's certificate, so that a new RPC is closed until someone decides who may call it.
///
/// Health checks (`grpc.health.v1.Health`) are open to any certificate from the cluster CA,
/// role or not: they say only whether the node serves, and a probe (a load balancer, a
/// Kubernetes gRPC probe) should need the smallest credential. Server reflection describes the
/// API to tools like `grpcurl`; it changes nothing but is only useful to someone who will call
/// the API, so it needs `read`, like every other look at the node.
pub(crate) fn required(path: &str) -> Permission {
    let method = path.trim_start_matches('/');
    match method {
        "grpc.health.v1.Health/Check" | "grpc.health.v1.Health/Watch" => Permission::Authenticated,
        "propd.v1.PropertyService/Get"
        | "propd.v1.PropertyService/Query"
        | "propd.v1.AdminService/Tree"
        | "propd.v1.AdminService/Status"
        | "propd.v1.AdminService/GetResult"
        | "propd.v1.AdminService/WatchRound"
        | "grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        | "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo" => Permission::Read,
        "propd.v1.PropertyService/Apply" | "propd.v1.PropertyService/Delete" => Permission::Write,
        "propd.v1.AdminService/PropagateNow"
        | "propd.v1.AdminService/PauseRepair"
        | "propd.v1.AdminService/ResumeRepair"
        | "propd.v1.AdminService/SetThrottle"
        // An import keeps the revisions and delete times it is given (a restore): an operator's.
        | "propd.v1.PropertyService/Import" => Permission::Admin,
        _ => Permission::Peer,
    }
}

/// What a certificate says about its holder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CertIdentity {
    /// DNS names (SAN).
    pub(crate) dns: Vec<String>,
    /// The largest role among its `propd:role:*` URIs.
    pub(crate) role: Option<Permission>,
}

impl CertIdentity {
    /// Reads the SANs of a DER certificate; `None` when it does not parse.
    pub(crate) fn from_der(der: &[u8]) -> Option<Self> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let mut identity = CertIdentity::default();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(dns) => identity.dns.push((*dns).to_owned()),
                    GeneralName::URI(uri) => {
                        let role = uri
                            .strip_prefix(ROLE_PREFIX)
                            .and_then(Permission::from_role);
                        identity.role = identity.role.max(role);
                    }
                    _ => {}
                }
            }
        }
        Some(identity)
    }
}

/// What a request on the HTTP port needs; `None`: nothing, not even a certificate.
///
/// `/health` is open to any TLS client, with or without a certificate: HTTPS probes (a
/// Kubernetes `httpGet` probe, most load balancers' health checks) cannot present a client
/// certificate, and the answer says only whether the node serves (its id, or why its store
/// cannot serve). The status page, `/status.json` and `/metrics` show the cluster's members,
/// shards, rounds and traffic: they need `read`, like the gRPC status, or a member's
/// certificate. Any other path needs `read` too, so that nothing new is open by accident.
pub(crate) fn required_http(path: &str) -> Option<Permission> {
    match path {
        "/health" => None,
        _ => Some(Permission::Read),
    }
}

/// Decides one gRPC call: `Ok` or the status that refuses it, naming what is missing.
pub(crate) fn decide(
    method: &str,
    members: &HashSet<String>,
    leaf: Option<&[u8]>,
) -> Result<(), tonic::Status> {
    decide_for(method, required(method), members, leaf)
}

/// Decides whether the certificate `leaf` (if any) may do `what`, which needs `needed`.
pub(crate) fn decide_for(
    what: &str,
    needed: Permission,
    members: &HashSet<String>,
    leaf: Option<&[u8]>,
) -> Result<(), tonic::Status> {
    let method = what;
    let Some(leaf) = leaf else {
        return Err(tonic::Status::unauthenticated(format!(
            "{method} needs a client certificate (role `{}`); none was presented",
            needed.name()
        )));
    };
    let Some(identity) = CertIdentity::from_der(leaf) else {
        return Err(tonic::Status::unauthenticated(format!(
            "{method}: the client certificate does not parse"
        )));
    };
    if needed == Permission::Authenticated || identity.dns.iter().any(|name| members.contains(name))
    {
        return Ok(());
    }
    if needed == Permission::Peer {
        return Err(tonic::Status::permission_denied(format!(
            "{method} is for cluster members only; the certificate names {:?}, no configured member",
            identity.dns
        )));
    }
    match identity.role {
        Some(role) if role >= needed => Ok(()),
        Some(role) => Err(tonic::Status::permission_denied(format!(
            "{method} needs role `{}`; the certificate carries role `{}`",
            needed.name(),
            role.name()
        ))),
        None => Err(tonic::Status::permission_denied(format!(
            "{method} needs role `{}`; the certificate carries no `{ROLE_PREFIX}*` URI",
            needed.name()
        ))),
    }
}

/// The tower layer that checks every gRPC call (see [`decide`]); refusals bump `refusals`.
#[derive(Debug, Clone)]
pub(crate) struct AuthLayer {
    /// `None`: TLS is off, everything passes. Shared by every clone, so that
    /// [`AuthLayer::set_members`] reaches the running servers.
    members: Option<Arc<RwLock<Arc<HashSet<String>>>>>,
    refusals: AuthRefusals,
}

impl AuthLayer {
    /// Checks calls against `members` when TLS is on (`Some`), passes all when off.
    pub(crate) fn new(members: Option<HashSet<String>>, refusals: AuthRefusals) -> Self {
        Self {
            members: members.map(|m| Arc::new(RwLock::new(Arc::new(m)))),
            refusals,
        }
    }

    /// Replaces the members whose certificates may call everything (a membership change seen
    /// in etcd); nothing changes when TLS is off. Calls already admitted finish.
    pub(crate) fn set_members(&self, members: HashSet<String>) {
        if let Some(current) = &self.members {
            *current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(members);
        }
    }

    /// The members whose certificates may call everything; `None` when TLS is off.
    fn members(&self) -> Option<Arc<HashSet<String>>> {
        self.members
            .as_ref()
            .map(|m| Arc::clone(&m.read().unwrap_or_else(PoisonError::into_inner)))
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`AuthLayer`] makes.
#[derive(Debug, Clone)]
pub(crate) struct Auth<S> {
    inner: S,
    layer: AuthLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if let Some(members) = self.layer.members() {
            let certs = request
                .extensions()
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(TlsConnectInfo::peer_certs);
            let leaf = certs.as_ref().and_then(|c| c.first()).map(|c| c.as_ref());
            if let Err(status) = decide(request.uri().path(), &members, leaf) {
                self.layer.refusals.inc(status.code());
                tracing::info!(method = request.uri().path(), code = ?status.code(), message = status.message(), "call refused");
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
        }
        Box::pin(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(dns: &[&str], uris: &[&str]) -> Vec<u8> {
        let mut params =
            rcgen::CertificateParams::new(dns.iter().map(|d| (*d).to_owned()).collect::<Vec<_>>())
                .unwrap();
        for uri in uris {
            params
                .subject_alt_names
                .push(rcgen::SanType::URI((*uri).try_into().unwrap()));
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn members() -> HashSet<String> {
        ["n1".to_owned(), "n2".to_owned()].into()
    }

    #[test]
    fn methods_need_what_the_issue_says() {
        assert_eq!(required("/propd.v1.PropertyService/Get"), Permission::Read);
        assert_eq!(required("/propd.v1.AdminService/Status"), Permission::Read);
        assert_eq!(
            required("/propd.v1.PropertyService/Apply"),
            Permission::Write
        );
        assert_eq!(
            required("/propd.v1.AdminService/SetThrottle"),
            Permission::Admin
        );
        assert_eq!(
            required("/propd.v1.PropertyService/Import"),
            Permission::Admin
        );
        assert_eq!(
            required("/propd.v1.PropertyService/ReplicaWrite"),
            Permission::Peer
        );
        assert_eq!(required("/propd.v1.RepairService/Repair"), Permission::Peer);
        assert_eq!(
            required("/propd.v1.GossipService/Propagate"),
            Permission::Peer
        );
        assert_eq!(
            required("/propd.v1.AdminService/RecordCompleteRepair"),
            Permission::Peer
        );
        assert_eq!(required("/propd.v1.AdminService/Ping"), Permission::Peer);
        assert_eq!(
            required("/propd.v1.AdminService/WatchRound"),
            Permission::Read
        );
        assert_eq!(
            required("/grpc.health.v1.Health/Check"),
            Permission::Authenticated
        );
        assert_eq!(
            required("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Permission::Read
        );
        assert_eq!(required("/something.New/Call"), Permission::Peer);
    }

    #[test]
    fn members_may_do_everything_and_clients_what_their_role_allows() {
        let members = members();
        let node = cert(&["n1"], &[]);
        assert!(decide("/propd.v1.RepairService/Repair", &members, Some(&node)).is_ok());
        assert!(decide("/propd.v1.AdminService/SetThrottle", &members, Some(&node)).is_ok());

        let outsider = cert(&["n9"], &[]);
        let refused = decide(
            "/propd.v1.PropertyService/ReplicaWrite",
            &members,
            Some(&outsider),
        )
        .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert!(
            refused.message().contains("members only"),
            "{}",
            refused.message()
        );

        let writer = cert(&[], &["propd:role:write"]);
        assert!(decide("/propd.v1.PropertyService/Apply", &members, Some(&writer)).is_ok());
        assert!(decide("/propd.v1.PropertyService/Get", &members, Some(&writer)).is_ok());
        let refused = decide(
            "/propd.v1.AdminService/PauseRepair",
            &members,
            Some(&writer),
        )
        .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert!(
            refused.message().contains("needs role `admin`"),
            "{}",
            refused.message()
        );
        let refused =
            decide("/propd.v1.RepairService/Repair", &members, Some(&writer)).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);

        let reader = cert(&[], &["propd:role:read", "propd:role:bogus"]);
        assert!(decide("/propd.v1.PropertyService/Apply", &members, Some(&reader)).is_err());
        let admin = cert(&[], &["propd:role:admin"]);
        assert!(decide("/propd.v1.AdminService/SetThrottle", &members, Some(&admin)).is_ok());

        let none = decide("/propd.v1.PropertyService/Get", &members, None).unwrap_err();
        assert_eq!(none.code(), tonic::Code::Unauthenticated);
        let roleless = cert(&[], &[]);
        let refused =
            decide("/propd.v1.PropertyService/Get", &members, Some(&roleless)).unwrap_err();
        assert!(
            refused.message().contains("no `propd:role:*`"),
            "{}",
            refused.message()
        );
        assert!(decide("/grpc.health.v1.Health/Check", &members, Some(&roleless)).is_ok());
        let none = decide("/grpc.health.v1.Health/Check", &members, None).unwrap_err();
        assert_eq!(none.code(), tonic::Code::Unauthenticated);
        let refused = decide(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            &members,
            Some(&roleless),
        )
        .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    }
}
