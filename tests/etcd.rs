//! A real etcd for the membership tests: Debian's `etcd` binary (installed by
//! `.ci/install-etcd` when missing) on free loopback ports with a temporary data directory,
//! stopped on drop. It can be stopped and started again on the same ports and data.

#![allow(
    clippy::print_stdout,
    reason = "a test that cannot get an etcd says SKIPPED and why, on the test's output"
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Certs, PortHold, http_get, https_get, run_bounded};

/// One single-member etcd.
#[derive(Debug)]
pub struct Etcd {
    /// Holds the data directory and the log.
    pub dir: tempfile::TempDir,
    /// The client port on 127.0.0.1.
    pub client_port: u16,
    peer_port: u16,
    /// The two ports, held while etcd is stopped so that no other test draws them.
    holds: [PortHold; 2],
    binary: PathBuf,
    child: Option<Child>,
    /// With TLS: the certificates (`etcd.pem` serves, `etcd-client.pem` is a client's).
    certs: Option<Certs>,
}

impl Etcd {
    /// Starts an etcd and waits until it is healthy; `None`, with the reason printed as
    /// `SKIPPED: ...`, only when no etcd is installed and `.ci/install-etcd` cannot install one.
    pub fn start() -> Option<Etcd> {
        Self::start_with(None)
    }

    /// Like [`Etcd::start`], serving clients over TLS only and asking each for a certificate
    /// (`--client-cert-auth`): `propd cert` issues `etcd.pem` (its server certificate, for
    /// 127.0.0.1) and `etcd-client.pem` (a client's) into `certs` from its CA.
    pub fn start_tls(certs: &Certs) -> Option<Etcd> {
        Self::start_with(Some(certs.clone()))
    }

    fn start_with(certs: Option<Certs>) -> Option<Etcd> {
        let binary = etcd_binary()?;
        let holds = [PortHold::new(), PortHold::new()];
        if let Some(certs) = &certs {
            certs.issue(&[
                "--member",
                &format!("etcd=127.0.0.1:{}", holds[0].port()),
                "--client",
                "etcd-client=read",
            ]);
        }
        let mut etcd = Etcd {
            dir: tempfile::tempdir().expect("temp dir"),
            client_port: holds[0].port(),
            peer_port: holds[1].port(),
            holds,
            binary,
            child: None,
            certs,
        };
        etcd.resume();
        Some(etcd)
    }

    /// The endpoint a node or client is given: `http://127.0.0.1:PORT`, or `https://` with TLS.
    pub fn endpoint(&self) -> String {
        let scheme = if self.certs.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// Kills etcd (SIGKILL) and reaps it; its data stays, its ports are held again.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            for hold in &mut self.holds {
                hold.retake();
            }
        }
    }

    /// Starts etcd again on the same ports and data, and waits (at most 30 s) until it is
    /// healthy.
    pub fn resume(&mut self) {
        self.stop();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("opening the etcd log");
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        for hold in &mut self.holds {
            hold.release();
        }
        let mut command = Command::new(&self.binary);
        if let Some(certs) = &self.certs {
            command
                .arg(format!("--cert-file={}", certs.cert("etcd").display()))
                .arg(format!("--key-file={}", certs.key("etcd").display()))
                .arg(format!("--trusted-ca-file={}", certs.ca().display()))
                .arg("--client-cert-auth");
        }
        let child = command
            .arg("--name=test")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("spawning etcd");
        self.child = Some(child);
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.client_port));
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let health = match &self.certs {
                None => http_get(addr, "/health"),
                Some(certs) => https_get(addr, "/health", certs, "etcd-client"),
            };
            if health.is_some_and(|(code, body)| code == 200 && body.contains("true")) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("etcd did not become healthy; log:\n{}", self.log());
    }

    /// The log of etcd so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The etcd binary, installed by the project's script when missing; `None` (with the reason
/// printed) only when it cannot be installed on this machine.
fn etcd_binary() -> Option<PathBuf> {
    let find = || {
        let output = Command::new("which").arg("etcd").output().ok()?;
        output
            .status
            .success()
            .then(|| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
    };
    if let Some(found) = find() {
        return Some(found);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/install-etcd");
    let mut command = Command::new("bash");
    command.arg(&script);
    match run_bounded(command, Duration::from_secs(1500)) {
        Ok(output) if output.status.success() => {}
        Ok(output) => {
            println!(
                "SKIPPED: etcd is not installed and {} failed: {}",
                script.display(),
                String::from_utf8_lossy(&output.stderr)
            );
            return None;
        }
        Err(error) => {
            println!("SKIPPED: etcd could not be installed: {error}");
            return None;
        }
    }
    let found = find();
    if found.is_none() {
        println!(
            "SKIPPED: {} ran but no etcd is on the PATH",
            script.display()
        );
    }
    found
}
