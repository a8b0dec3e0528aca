//! Support for the whole-system tests in `it/`: a cluster of real `propd serve` processes on
//! 127.0.0.1 with ports chosen at run time, and the `propd` CLI to drive it.
//!
//! Everything is bounded in time: waits poll with deadlines and every child is killed on drop.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `propd` binary of the current source.
///
/// Built once per test process with `cargo build -p propd-node --bin propd` into the target
/// directory this test executable lives in, whether or not a binary is there already: a binary
/// left by an earlier build would otherwise run the cluster suite against old code. When the
/// binary is up to date the build is a no-op check; when several test processes start at once
/// (nextest runs each test in a process of its own), cargo's lock on the target directory
/// serializes their builds. A bench (running from `target/release`) gets the release binary the
/// same way, so that it measures the current code.
pub fn propd_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        // The test executable lives in target/<profile>/deps/.
        let exe = std::env::current_exe().expect("current test executable");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>/deps");
        let profile = profile_dir
            .file_name()
            .and_then(|name| name.to_str())
            .expect("a profile directory name");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let mut build = Command::new(cargo);
        // The features of `cargo xtask ci` (the whole workspace, every feature): the build that
        // compiled this suite already made that binary, so this is a no-op there, where another
        // feature set would rebuild propd-node and replace the binary in every run.
        build.args([
            "build",
            "--quiet",
            "--workspace",
            "--all-features",
            "--bin",
            "propd",
        ]);
        // `debug` is the `dev` profile's directory; any other is named as its profile.
        if profile != "debug" {
            build.args(["--profile", profile]);
        }
        let status = build
            .env(
                "CARGO_TARGET_DIR",
                profile_dir.parent().expect("target dir"),
            )
            .status()
            .expect("running cargo build for the propd binary");
        assert!(status.success(), "building propd failed");
        let binary = profile_dir.join("propd");
        assert!(binary.exists(), "{} was not built", binary.display());
        binary
    })
}

/// A port on 127.0.0.1 reserved by a socket bound to it without listening (a [`DeadAddr`]):
/// connections to it are refused, as to a stopped node, and no other test can draw it (its
/// `bind` fails) until [`PortHold::release`] closes the socket, just before the node that owns
/// the port starts and binds it.
#[derive(Debug)]
pub struct PortHold {
    port: u16,
    socket: Option<socket2::Socket>,
}

impl PortHold {
    /// Reserves a random port of 10000..30000, below Linux's ephemeral range (32768..61000): a
    /// port the kernel hands out for `bind(0)` or an outgoing connection, in this process or in
    /// a parallel test, can then never be the port of a node that a test stopped and will
    /// restart.
    pub fn new() -> PortHold {
        use std::hash::{BuildHasher as _, Hasher as _};
        loop {
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u32(std::process::id());
            hasher.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            );
            let port = 10_000 + (hasher.finish() % 20_000) as u16;
            // A port that a listener of another test holds cannot be bound; one that only a
            // closing connection holds (TIME_WAIT) can be by the node, but not by this socket
            // without SO_REUSEADDR, so such a port is passed over too.
            if let Some(socket) = bound_socket(port) {
                return PortHold {
                    port,
                    socket: Some(socket),
                };
            }
        }
    }

    /// The reserved port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Closes the reserving socket so that the port's owner can bind it.
    pub fn release(&mut self) {
        self.socket = None;
    }

    /// Takes the port back after its owner stopped. Best effort: it fails while connections
    /// the owner closed linger in TIME_WAIT on the port (then nothing listens there either).
    pub fn retake(&mut self) {
        if self.socket.is_none() {
            self.socket = bound_socket(self.port);
        }
    }
}

/// A TCP socket bound to 127.0.0.1:`port` (0: any) without listening and without
/// `SO_REUSEADDR`, or `None` when the port is taken.
fn bound_socket(port: u16) -> Option<socket2::Socket> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .expect("a TCP socket");
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], port)).into())
        .ok()?;
    Some(socket)
}

impl Default for PortHold {
    fn default() -> Self {
        PortHold::new()
    }
}

/// An address on 127.0.0.1 where nothing answers, for as long as the value lives: a TCP socket
/// bound to the port without listening, so connections to it are refused and no other socket
/// (which would need `SO_REUSEADDR` on both) can bind the port meanwhile. `std` can only bind a
/// socket by listening on it, hence `socket2`.
#[derive(Debug)]
pub struct DeadAddr {
    addr: SocketAddr,
    _socket: socket2::Socket,
}

impl DeadAddr {
    /// Binds a fresh port of the kernel's choice without listening.
    pub fn new() -> DeadAddr {
        let socket = bound_socket(0).expect("binding a port");
        let addr = socket
            .local_addr()
            .expect("the bound address")
            .as_socket()
            .expect("an IP address");
        DeadAddr {
            addr,
            _socket: socket,
        }
    }

    /// The address where nothing answers.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Default for DeadAddr {
    fn default() -> Self {
        DeadAddr::new()
    }
}

/// One node's addresses and files.
#[derive(Debug)]
pub struct NodeSpec {
    /// Node id (`n1`, `n2`, ...).
    pub id: String,
    /// gRPC address.
    pub listen: SocketAddr,
    /// HTTP address.
    pub http: SocketAddr,
    /// Its config file.
    pub config: PathBuf,
    /// Its log file (stdout and stderr).
    pub log: PathBuf,
}

/// A running (or stopped) cluster of `propd serve` processes.
#[derive(Debug)]
pub struct Cluster {
    /// Holds the config files, data directories and logs.
    pub dir: tempfile::TempDir,
    /// The nodes, in id order.
    pub nodes: Vec<NodeSpec>,
    /// With mutual TLS on: the certificates (`None`: plaintext).
    pub certs: Option<Certs>,
    /// Environment variables every node is started with (beside `RUST_LOG`).
    pub env: Vec<(String, String)>,
    children: Vec<Option<Child>>,
    /// Each node's two ports, held while the node is not running.
    ports: Vec<[PortHold; 2]>,
}

impl Cluster {
    /// Writes the config of `n` nodes sharing `shared` (TOML: top-level keys first, then tables
    /// such as `[[groups]]` and `[repair]`), starts them and waits until each answers.
    ///
    /// With `PROPD_TEST_TLS=1` in the environment this is [`Cluster::start_tls`]: the whole
    /// suite then runs with mutual TLS on (`cargo xtask ci` runs it both ways).
    pub fn start(n: usize, shared: &str) -> Cluster {
        Self::start_with(n, shared, tls_from_env())
    }

    /// Like [`Cluster::start`], with mutual TLS on: `propd cert` makes a CA, a certificate per
    /// member and the clients `admin`, `writer` and `reader` (roles admin, write, read) in
    /// `<dir>/certs`; every config gets a `[tls]` table; [`Cluster::cli`] speaks TLS as `admin`.
    pub fn start_tls(n: usize, shared: &str) -> Cluster {
        Self::start_with(n, shared, true)
    }

    /// Like [`Cluster::start`], always in plaintext (for clients that cannot present a
    /// certificate, such as a headless browser).
    pub fn start_plaintext(n: usize, shared: &str) -> Cluster {
        Self::start_with(n, shared, false)
    }

    fn start_with(n: usize, shared: &str, tls: bool) -> Cluster {
        let mut cluster = Cluster::configure_with(n, shared, tls);
        for i in 0..n {
            cluster.start_node(i);
        }
        for i in 0..n {
            cluster.wait_ready(i);
        }
        cluster
    }

    /// Writes the config of `n` nodes as [`Cluster::start`] does, and starts none of them.
    pub fn configure(n: usize, shared: &str) -> Cluster {
        Self::configure_with(n, shared, false)
    }

    fn configure_with(n: usize, shared: &str, tls: bool) -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let ports: Vec<[PortHold; 2]> =
            (0..n).map(|_| [PortHold::new(), PortHold::new()]).collect();
        let nodes: Vec<NodeSpec> = (1..=n)
            .map(|i| {
                let [listen, http] = &ports[i - 1];
                let listen = SocketAddr::from(([127, 0, 0, 1], listen.port()));
                let http = SocketAddr::from(([127, 0, 0, 1], http.port()));
                NodeSpec {
                    id: format!("n{i}"),
                    listen,
                    http,
                    config: dir.path().join(format!("n{i}.toml")),
                    log: dir.path().join(format!("n{i}.log")),
                }
            })
            .collect();
        let members: String = nodes
            .iter()
            .map(|node| {
                format!(
                    "[[members]]\nid = \"{}\"\naddr = \"{}\"\n\n",
                    node.id, node.listen
                )
            })
            .collect();
        let certs = tls.then(|| {
            let certs = Certs {
                dir: dir.path().join("certs"),
            };
            let mut args = vec!["--out".to_owned(), certs.dir.display().to_string()];
            for node in &nodes {
                args.extend([
                    "--member".to_owned(),
                    format!("{}={}", node.id, node.listen),
                ]);
            }
            for client in ["admin=admin", "writer=write", "reader=read"] {
                args.extend(["--client".to_owned(), client.to_owned()]);
            }
            certs.issue(&args.iter().map(String::as_str).collect::<Vec<_>>());
            certs
        });
        for node in &nodes {
            let data_dir = dir.path().join(&node.id);
            let tls_table = certs.as_ref().map_or_else(String::new, |certs| {
                format!(
                    "[tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n",
                    certs.cert(&node.id).display().to_string(),
                    certs.key(&node.id).display().to_string(),
                    certs.ca().display().to_string(),
                )
            });
            let text = format!(
                "node_id = \"{}\"\nlisten = \"{}\"\nhttp = \"{}\"\ndata_dir = {:?}\n{shared}\n{members}{tls_table}",
                node.id,
                node.listen,
                node.http,
                data_dir.display().to_string(),
            );
            std::fs::write(&node.config, text).expect("writing a config file");
        }
        let children = nodes.iter().map(|_| None).collect();
        Cluster {
            dir,
            nodes,
            certs,
            env: Vec::new(),
            children,
            ports,
        }
    }

    /// The data directory of node `i`.
    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(&self.nodes[i].id)
    }

    /// The database file of node `i`.
    pub fn data_file(&self, i: usize) -> PathBuf {
        self.data_dir(i).join("propd.redb")
    }

    /// Sends `signal` (`STOP`, `CONT`, ...) to node `i`.
    pub fn signal(&self, i: usize, signal: &str) {
        let child = self.children[i].as_ref().expect("the node is running");
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Starts node `i` (index into `nodes`) and does not wait. Its ports are released just
    /// before it starts.
    pub fn start_node(&mut self, i: usize) {
        for hold in &mut self.ports[i] {
            hold.release();
        }
        let node = &self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("opening a log file");
        let child = Command::new(propd_binary())
            .args(["serve", "--config"])
            .arg(&node.config)
            .env(
                "RUST_LOG",
                std::env::var("PROPD_TEST_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("spawning propd serve");
        self.children[i] = Some(child);
    }

    /// Waits (at most 30 s) until node `i` answers `/health`; fails at once when it exited.
    pub fn wait_ready(&mut self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(child) = self.children[i].as_mut()
                && let Some(exit) = child.try_wait().expect("polling a child")
            {
                panic!(
                    "node {} exited ({exit}) before it was ready; log:\n{}",
                    self.nodes[i].id,
                    self.log(i)
                );
            }
            if self.http(i, "/health").is_some_and(|(code, _)| code == 200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "node {} did not become healthy; log:\n{}",
            self.nodes[i].id,
            self.log(i)
        );
    }

    /// Waits (at most 30 s) until node `i` is ready (`None`) or has exited (its exit status), for
    /// a start that may be refused: either way the outcome is seen, however slow the start.
    pub fn wait_ready_or_exit(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(exit) = self.wait_exit(i, Duration::ZERO) {
                return Some(exit);
            }
            if self.http(i, "/health").is_some_and(|(code, _)| code == 200) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "node {} neither became healthy nor exited; log:\n{}",
            self.nodes[i].id,
            self.log(i)
        );
    }

    /// Kills node `i` with SIGKILL and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for hold in &mut self.ports[i] {
            hold.retake();
        }
    }

    /// Sends SIGTERM to node `i` and waits (at most 30 s) for it to exit; returns whether it
    /// exited successfully.
    pub fn terminate(&mut self, i: usize) -> bool {
        if self.children[i].is_none() {
            return false;
        }
        self.signal_terminate(i);
        match self.wait_exit(i, Duration::from_secs(30)) {
            Some(exit) => exit.success(),
            None => {
                self.kill(i);
                false
            }
        }
    }

    /// Sends SIGTERM to node `i` without waiting for it to exit; [`Cluster::wait_exit`] then
    /// collects it.
    pub fn signal_terminate(&mut self, i: usize) {
        let child = self.children[i].as_ref().expect("the node runs");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits (at most `limit`) for node `i` to exit (by itself or after a signal); its exit
    /// status, or `None` when it still runs (it is then left running: [`Cluster::kill`] ends it).
    pub fn wait_exit(&mut self, i: usize, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            let child = self.children[i].as_mut()?;
            if let Some(status) = child.try_wait().expect("polling a child") {
                self.children[i] = None;
                for hold in &mut self.ports[i] {
                    hold.retake();
                }
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Restarts node `i` and waits until it is ready.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.start_node(i);
        self.wait_ready(i);
    }

    /// The log of node `i` so far.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    /// A gRPC endpoint of node `i`: plaintext, or in a TLS cluster mutual TLS with node `i`'s
    /// own member certificate (a member may call every RPC, as anyone may in plaintext).
    pub fn endpoint(&self, i: usize) -> tonic::transport::Endpoint {
        self.endpoint_as(i, &self.nodes[i].id)
    }

    /// Like [`Cluster::endpoint`], presenting the certificate `name` of the cluster's
    /// certificates (`<dir>/certs/NAME.pem`) in a TLS cluster.
    pub fn endpoint_as(&self, i: usize, name: &str) -> tonic::transport::Endpoint {
        let node = &self.nodes[i];
        let Some(certs) = &self.certs else {
            return tonic::transport::Endpoint::from_shared(format!("http://{}", node.listen))
                .expect("a valid URL");
        };
        let read = |path: PathBuf| std::fs::read(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read(certs.ca())))
            .identity(tonic::transport::Identity::from_pem(
                read(certs.cert(name)),
                read(certs.key(name)),
            ))
            .domain_name(node.id.clone());
        tonic::transport::Endpoint::from_shared(format!("https://{}", node.listen))
            .expect("a valid URL")
            .tls_config(tls)
            .expect("a valid TLS config")
    }

    /// The CLI flags that reach node `i` as client `admin` in a TLS cluster; none in plaintext.
    pub fn tls_args(&self, i: usize) -> Vec<String> {
        self.certs.as_ref().map_or_else(Vec::new, |certs| {
            certs.client_args("admin", &self.nodes[i].id)
        })
    }

    /// `GET path` on node `i`'s HTTP port: over TLS as `admin` in a TLS cluster.
    pub fn http(&self, i: usize, path: &str) -> Option<(u16, String)> {
        match &self.certs {
            None => http_get(self.nodes[i].http, path),
            Some(certs) => https_get(self.nodes[i].http, path, certs, "admin"),
        }
    }

    /// Runs `propd ARGS --server <node i>` (at most 120 s; on a timeout the panic shows every
    /// node's log); in a TLS cluster as client `admin`.
    pub fn cli(&self, i: usize, args: &[&str]) -> Output {
        self.cli_as(i, "admin", args)
    }

    /// Like [`Cluster::cli`], as the client `client` of a TLS cluster (no effect in plaintext).
    pub fn cli_as(&self, i: usize, client: &str, args: &[&str]) -> Output {
        let mut command = Command::new(propd_binary());
        command
            .args(args)
            .args(["--server", &self.nodes[i].listen.to_string()])
            .stdin(Stdio::null());
        if let Some(certs) = &self.certs {
            command.args(certs.client_args(client, &self.nodes[i].id));
        }
        run_bounded(command, Duration::from_secs(120)).unwrap_or_else(|error| {
            let logs: Vec<String> = (0..self.nodes.len())
                .map(|n| format!("--- {} ---\n{}", self.nodes[n].id, self.log(n)))
                .collect();
            panic!("{error}\n{}", logs.join("\n"))
        })
    }

    /// Node `i`'s own copy of `entity` as `propd get --local` prints it, `None` when it has
    /// none.
    pub fn local_copy(&self, i: usize, entity: &str) -> Option<Value> {
        let output = self.cli(i, &["get", entity, "--local", "--output", "json"]);
        output
            .status
            .success()
            .then(|| serde_json::from_slice(&output.stdout).expect("get prints JSON"))
    }

    /// Runs `propd ARGS --server <node i> --output json`, asserts success, parses stdout.
    pub fn json(&self, i: usize, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let output = self.cli(i, &all);
        assert!(
            output.status.success(),
            "propd {all:?} at {} failed: {}\nlog:\n{}",
            self.nodes[i].id,
            String::from_utf8_lossy(&output.stderr),
            self.log(i)
        );
        serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
            panic!(
                "propd {all:?}: stdout is not JSON ({error}): {}",
                String::from_utf8_lossy(&output.stdout)
            )
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
    }
}

/// Runs `propd ARGS --server ADDR`, with a time bound.
pub fn cli_at(server: &str, args: &[&str]) -> Output {
    let mut command = Command::new(propd_binary());
    command
        .args(args)
        .args(["--server", server])
        .stdin(Stdio::null());
    run_bounded(command, Duration::from_secs(120)).unwrap_or_else(|error| panic!("{error}"))
}

/// Whether `PROPD_TEST_TLS=1` asks every [`Cluster::start`] for mutual TLS.
pub fn tls_from_env() -> bool {
    std::env::var("PROPD_TEST_TLS").is_ok_and(|value| value == "1")
}

/// A directory of certificates made by `propd cert`.
#[derive(Debug, Clone)]
pub struct Certs {
    /// `ca.pem`, `ca.key`, `NAME.pem`, `NAME.key`.
    pub dir: PathBuf,
}

impl Certs {
    /// Runs `propd cert --out <dir> ARGS` (ARGS may repeat `--out`: the first wins only if
    /// given first), asserting success.
    pub fn issue(&self, args: &[&str]) {
        let mut command = Command::new(propd_binary());
        command.arg("cert");
        if !args.contains(&"--out") {
            command.arg("--out").arg(&self.dir);
        }
        command.args(args).stdin(Stdio::null());
        let output = run_bounded(command, Duration::from_secs(60)).expect("propd cert");
        assert!(
            output.status.success(),
            "propd cert {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// `NAME.pem`.
    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }

    /// `NAME.key`.
    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }

    /// The CLI flags that speak TLS as `client` to the member `server_name`.
    pub fn client_args(&self, client: &str, server_name: &str) -> Vec<String> {
        vec![
            "--ca".to_owned(),
            self.ca().display().to_string(),
            "--cert".to_owned(),
            self.cert(client).display().to_string(),
            "--key".to_owned(),
            self.key(client).display().to_string(),
            "--server-name".to_owned(),
            server_name.to_owned(),
        ]
    }
}

/// `GET path` over TLS with the client certificate `client` of `certs`, checking the server's
/// certificate against the CA and the address's IP: `(status code, body)`, or `None` when
/// nothing answers or the handshake fails.
pub fn https_get(
    addr: SocketAddr,
    path: &str,
    certs: &Certs,
    client: &str,
) -> Option<(u16, String)> {
    https_get_as(addr, path, certs, Some(client))
}

/// Like [`https_get`], presenting the client certificate `client` of `certs`, or none.
pub fn https_get_as(
    addr: SocketAddr,
    path: &str,
    certs: &Certs,
    client: Option<&str>,
) -> Option<(u16, String)> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(certs.ca()).ok()? {
        roots.add(ca.ok()?).ok()?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots);
    let config = match client {
        Some(client) => {
            let chain = CertificateDer::pem_file_iter(certs.cert(client))
                .ok()?
                .collect::<Result<Vec<_>, _>>()
                .ok()?;
            let key = PrivateKeyDer::from_pem_file(certs.key(client)).ok()?;
            builder.with_client_auth_cert(chain, key).ok()?
        }
        None => builder.with_no_client_auth(),
    };
    let name = ServerName::IpAddress(addr.ip().into());
    let connection = rustls::ClientConnection::new(std::sync::Arc::new(config), name).ok()?;
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut stream = rustls::StreamOwned::new(connection, tcp);
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut bytes = Vec::new();
    // A server that closes without close_notify ends the read with an error after the body.
    let _ = stream.read_to_end(&mut bytes);
    parse_response(&String::from_utf8_lossy(&bytes))
}

fn parse_response(response: &str) -> Option<(u16, String)> {
    let code = response.split(' ').nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Some((code, body))
}

/// Runs a command, killing it if it outlives `limit` (then the error says so, with its stderr).
pub fn run_bounded(mut command: Command, limit: Duration) -> Result<Output, String> {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning a command");
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().expect("polling a child").is_some() {
            return Ok(child.wait_with_output().expect("collecting output"));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().expect("collecting output");
            return Err(format!(
                "{command:?} ran longer than {limit:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A bare HTTP/1.1 GET: `(status code, body)`, or `None` when nothing answers.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    parse_response(&response)
}

/// Polls `condition` every 100 ms until it holds or `limit` passes; returns whether it held.
pub fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub mod etcd;
pub mod nemesis;
