//! `propd cert`: a development CA and the certificates of members and clients, as PEM files.
//!
//! Files in the output directory: `ca.pem` and `ca.key` (made once, then reused), and for each
//! member or client NAME, `NAME.pem` and `NAME.key`. A member's certificate names its id as a
//! DNS SAN (what peers check when they dial it and what makes a caller a member) and its
//! address's IP as an IP SAN (what a CLI checks when it dials the address). A client's
//! certificate carries its role as the URI SAN `propd:role:ROLE`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration as TimeDuration, OffsetDateTime};

use crate::auth::ROLE_PREFIX;

/// The CA's common name; the issuer of every certificate `propd cert` makes.
const CA_NAME: &str = "propd development CA";

/// Why certificates could not be made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CertError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// rcgen refused the parameters or the key.
    #[error("{what}: {source}")]
    Rcgen {
        /// What was being made.
        what: String,
        /// What rcgen said.
        source: rcgen::Error,
    },
    /// A name or role that cannot go into a certificate.
    #[error("{0}")]
    Invalid(String),
}

/// One certificate to issue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Subject {
    /// A member: its id and gRPC address.
    Member {
        /// Member id (DNS SAN).
        id: String,
        /// Its address (IP SAN).
        addr: SocketAddr,
    },
    /// A client: a name (file name and common name) and a role.
    Client {
        /// File and common name.
        name: String,
        /// `read`, `write` or `admin`.
        role: String,
    },
}

impl Subject {
    fn name(&self) -> &str {
        match self {
            Subject::Member { id, .. } => id,
            Subject::Client { name, .. } => name,
        }
    }
}

fn rcgen_error(what: &str) -> impl Fn(rcgen::Error) -> CertError + '_ {
    move |source| CertError::Rcgen {
        what: what.to_owned(),
        source,
    }
}

fn write(path: &Path, text: &str) -> Result<(), CertError> {
    std::fs::write(path, text).map_err(|source| CertError::Io {
        path: path.to_owned(),
        source,
    })
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// The CA in `dir`, made when `ca.key` is not there yet.
fn ca(dir: &Path) -> Result<Issuer<'static, KeyPair>, CertError> {
    let key_path = dir.join("ca.key");
    if key_path.exists() {
        let pem = std::fs::read_to_string(&key_path).map_err(|source| CertError::Io {
            path: key_path.clone(),
            source,
        })?;
        let key = KeyPair::from_pem(&pem).map_err(rcgen_error("reading ca.key"))?;
        // The same name and key give the same issuer name and key identifier as the CA
        // certificate made the first time.
        return Ok(Issuer::new(ca_params(), key));
    }
    let key = KeyPair::generate().map_err(rcgen_error("CA key"))?;
    let params = ca_params();
    let cert = params.self_signed(&key).map_err(rcgen_error("CA"))?;
    write(&dir.join("ca.pem"), &cert.pem())?;
    write(&key_path, &key.serialize_pem())?;
    Ok(Issuer::new(params, key))
}

fn params_for(subject: &Subject) -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, subject.name());
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    match subject {
        Subject::Member { id, addr } => {
            let dns = id.clone().try_into().map_err(|_| {
                CertError::Invalid(format!("member id `{id}` cannot be a DNS name"))
            })?;
            params.subject_alt_names = vec![SanType::DnsName(dns), SanType::IpAddress(addr.ip())];
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
        }
        Subject::Client { role, .. } => {
            if !matches!(role.as_str(), "read" | "write" | "admin") {
                return Err(CertError::Invalid(format!(
                    "role `{role}`: expected read, write or admin"
                )));
            }
            let uri = format!("{ROLE_PREFIX}{role}")
                .try_into()
                .map_err(rcgen_error("role URI"))?;
            params.subject_alt_names = vec![SanType::URI(uri)];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
    }
    Ok(params)
}

/// Issues a certificate for each subject into `dir` (made if missing), valid from now for
/// `days` days; a negative `days` makes certificates that have already expired (for testing
/// that they are refused). Returns the files written.
pub(crate) fn issue(
    dir: &Path,
    subjects: &[Subject],
    days: i64,
) -> Result<Vec<PathBuf>, CertError> {
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
        path: dir.to_owned(),
        source,
    })?;
    for subject in subjects {
        let name = subject.name();
        if name.is_empty() || name == "ca" || name.contains(['/', '\\']) || name.starts_with('.') {
            return Err(CertError::Invalid(format!(
                "`{name}` cannot name a certificate file"
            )));
        }
    }
    let issuer = ca(dir)?;
    let now = OffsetDateTime::now_utc();
    let (not_before, not_after) = if days >= 0 {
        (now - TimeDuration::hours(1), now + TimeDuration::days(days))
    } else {
        (
            now + TimeDuration::days(days - 1),
            now + TimeDuration::days(days),
        )
    };
    let mut written = vec![dir.join("ca.pem")];
    for subject in subjects {
        let mut params = params_for(subject)?;
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate().map_err(rcgen_error(subject.name()))?;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(rcgen_error(subject.name()))?;
        let cert_path = dir.join(format!("{}.pem", subject.name()));
        let key_path = dir.join(format!("{}.key", subject.name()));
        write(&cert_path, &cert.pem())?;
        write(&key_path, &key.serialize_pem())?;
        written.push(cert_path);
        written.push(key_path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{CertIdentity, Permission};

    #[test]
    fn members_and_clients_get_the_names_the_checks_read_and_the_ca_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        let subjects = [
            Subject::Member {
                id: "n1".into(),
                addr: "127.0.0.1:7001".parse().unwrap(),
            },
            Subject::Client {
                name: "alice".into(),
                role: "write".into(),
            },
        ];
        issue(dir.path(), &subjects, 30).unwrap();
        let ca_before = std::fs::read(dir.path().join("ca.pem")).unwrap();
        let der = |name: &str| {
            let pem = std::fs::read(dir.path().join(name)).unwrap();
            use rustls_pki_types::pem::PemObject as _;
            rustls_pki_types::CertificateDer::from_pem_slice(&pem).unwrap()
        };
        let node = CertIdentity::from_der(&der("n1.pem")).unwrap();
        assert_eq!(node.dns, vec!["n1".to_owned()]);
        let alice = CertIdentity::from_der(&der("alice.pem")).unwrap();
        assert_eq!(alice.role, Some(Permission::Write));
        assert!(alice.dns.is_empty());

        // A second run issues under the same CA, whose certificate stays as it was, and the
        // new certificate verifies against it.
        issue(
            dir.path(),
            &[Subject::Client {
                name: "bob".into(),
                role: "read".into(),
            }],
            1,
        )
        .unwrap();
        assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca_before);
        let paths = crate::tls::TlsPaths {
            cert: dir.path().join("n1.pem"),
            key: dir.path().join("n1.key"),
            ca: dir.path().join("ca.pem"),
        };
        crate::tls::server_config(
            &paths,
            crate::tls::ALPN_H2,
            crate::tls::ClientCert::Required,
        )
        .unwrap();
        let ca_der = der("ca.pem");
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        let bob_der = der("bob.pem");
        let (_, bob) = x509_parser::parse_x509_certificate(&bob_der).unwrap();
        assert_eq!(bob.issuer(), ca.subject());
        bob.verify_signature(Some(ca.public_key())).unwrap();
    }

    #[test]
    fn bad_roles_and_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let role = issue(
            dir.path(),
            &[Subject::Client {
                name: "x".into(),
                role: "root".into(),
            }],
            1,
        )
        .unwrap_err();
        assert!(role.to_string().contains("role `root`"), "{role}");
        let name = issue(
            dir.path(),
            &[Subject::Client {
                name: "../x".into(),
                role: "read".into(),
            }],
            1,
        )
        .unwrap_err();
        assert!(name.to_string().contains("cannot name"), "{name}");
    }
}
