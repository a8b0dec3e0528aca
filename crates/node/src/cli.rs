//! The command line: `propd serve` and the client commands that drive a node over gRPC.
//!
//! Every client command prints its result on stdout (`--output text|json`) and exits 0, or
//! prints one line on stderr and exits non-zero.

use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use propd_proto::v1;
use propd_proto::v1::admin_service_client::AdminServiceClient;
use propd_proto::v1::property_service_client::PropertyServiceClient;
use serde_json::{Value, json};
use tonic::transport::{Channel, Endpoint};

use propd_store::GroupDef;

mod members;
mod transfer;

use crate::certs::{Subject, issue};
use crate::config::{
    DEFAULT_LISTEN, Member, Partial, PartialEtcd, PartialMetrics, PartialRepair, PartialStore,
    PartialTelemetry, PartialTls, PartialTree,
};
use crate::tls::cli_client_config;

/// propd: a replicated property store whose replicas repair themselves.
#[derive(Debug, Parser)]
#[command(name = "propd", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node (with no config: one local node with safe defaults, printed at start).
    Serve(Box<ServeArgs>),
    /// Create or update a property.
    Put(PutArgs),
    /// Read a property.
    Get(GetArgs),
    /// Delete a property (every copy stores the same tombstone).
    Delete(DeleteArgs),
    /// Query the properties of a group: one page, or every page with --all.
    Query(transfer::QueryArgs),
    /// Write a group (or one shard) as JSON lines, tombstones included (a backup).
    Export(transfer::ExportArgs),
    /// Write the properties of an export, keeping their versions: newer versions win.
    Import(transfer::ImportArgs),
    /// Start a repair round for a shard with this node as origin, or pause/resume background repair.
    Repair(RepairArgs),
    /// Show a shard's Merkle tree: shape, root, revision, per-slot digests and counts.
    Tree(TreeArgs),
    /// Show the cluster as this node sees it and the repair status of its shards.
    Status(StatusArgs),
    /// Members in etcd: list, drain, remove, replace.
    Member(members::MemberArgs),
    /// Groups in etcd: create, alter, list.
    Group(members::GroupArgs),
    /// Make a development CA (once per directory) and member and client certificates (PEM).
    Cert(CertArgs),
}

/// Flags of `propd serve`; each is also a `PROPD_*` environment variable and a config key.
#[derive(Debug, Args)]
struct ServeArgs {
    /// TOML config file.
    #[arg(long, env = "PROPD_CONFIG")]
    config: Option<PathBuf>,
    /// `node_id`: this node's id.
    #[arg(long, env = "PROPD_NODE_ID")]
    node_id: Option<String>,
    /// `listen`: gRPC address (property API, gossip, repair, admin).
    #[arg(long, env = "PROPD_LISTEN")]
    listen: Option<String>,
    /// `http`: HTTP address for the status page, /metrics and /health.
    #[arg(long, env = "PROPD_HTTP")]
    http: Option<String>,
    /// `data_dir`: where the store keeps its files.
    #[arg(long, env = "PROPD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// `[[members]]`, as ID=ADDR (repeat, or comma-separate in the variable).
    #[arg(long = "member", env = "PROPD_MEMBERS", value_delimiter = ',', value_parser = parse_member)]
    members: Vec<Member>,
    /// `[[groups]]`, as NAME:SHARD_NUM:REPLICAS (repeat, or comma-separate in the variable).
    #[arg(long = "group", env = "PROPD_GROUPS", value_delimiter = ',', value_parser = parse_group)]
    groups: Vec<GroupDef>,
    /// `write_acks`: copies that must acknowledge a coordinated write.
    #[arg(long, env = "PROPD_WRITE_ACKS")]
    write_acks: Option<u32>,
    /// `max_property_bytes`: the largest accepted property.
    #[arg(long, env = "PROPD_MAX_PROPERTY_BYTES")]
    max_property_bytes: Option<usize>,
    /// `max_clock_skew`: bound on clock differences and on client-chosen times ("30s").
    #[arg(long, env = "PROPD_MAX_CLOCK_SKEW")]
    max_clock_skew: Option<String>,
    /// `repair.enabled`: run background repair rounds.
    #[arg(long, env = "PROPD_REPAIR_ENABLED")]
    repair_enabled: Option<bool>,
    /// `repair.period`: every shard is repaired within this ("30s", "10m", "24h").
    #[arg(long, env = "PROPD_REPAIR_PERIOD")]
    repair_period: Option<String>,
    /// `repair.cron`: a five-field cron window (UTC) outside which background rounds do not start.
    #[arg(long, env = "PROPD_REPAIR_CRON")]
    repair_cron: Option<String>,
    /// `repair.sync_timeout`: bound on one pairwise sync.
    #[arg(long, env = "PROPD_REPAIR_SYNC_TIMEOUT")]
    repair_sync_timeout: Option<String>,
    /// `repair.round_timeout`: bound on one propagation.
    #[arg(long, env = "PROPD_REPAIR_ROUND_TIMEOUT")]
    repair_round_timeout: Option<String>,
    /// `repair.verify_interval`: how often trees are checked against a full rebuild.
    #[arg(long, env = "PROPD_REPAIR_VERIFY_INTERVAL")]
    repair_verify_interval: Option<String>,
    /// `repair.tombstone_grace`: tombstones younger than this are never purged.
    #[arg(long, env = "PROPD_REPAIR_TOMBSTONE_GRACE")]
    repair_tombstone_grace: Option<String>,
    /// `repair.throttle_bytes_per_second`: repair traffic limit (0: none).
    #[arg(long, env = "PROPD_REPAIR_THROTTLE_BYTES_PER_SECOND")]
    repair_throttle_bytes_per_second: Option<u64>,
    /// `repair.max_streams`: repair streams served at once, from all peers.
    #[arg(long, env = "PROPD_REPAIR_MAX_STREAMS")]
    repair_max_streams: Option<u32>,
    /// `repair.max_streams_per_peer`: repair streams served at once for one peer.
    #[arg(long, env = "PROPD_REPAIR_MAX_STREAMS_PER_PEER")]
    repair_max_streams_per_peer: Option<u32>,
    /// `store.group_commit`: synced writes waiting for the same sync share one transaction.
    #[arg(long, env = "PROPD_STORE_GROUP_COMMIT")]
    store_group_commit: Option<bool>,
    /// `metrics.shard_labels`: label repair metrics by shard too.
    #[arg(long, env = "PROPD_METRICS_SHARD_LABELS")]
    metrics_shard_labels: Option<bool>,
    /// `telemetry.otlp_endpoint`: export every round's trace over OTLP/gRPC to this URL.
    #[arg(long, env = "PROPD_TELEMETRY_OTLP_ENDPOINT")]
    telemetry_otlp_endpoint: Option<String>,
    /// `tree.algorithm`: the trees' hash, `sha512` or `blake3` (fixed when the store is created).
    #[arg(long, env = "PROPD_TREE_ALGORITHM")]
    tree_algorithm: Option<String>,
    /// `tree.slot_count`: children of each tree's root.
    #[arg(long, env = "PROPD_TREE_SLOT_COUNT")]
    tree_slot_count: Option<u32>,
    /// `tree.fanout`: children of each node below the slots.
    #[arg(long, env = "PROPD_TREE_FANOUT")]
    tree_fanout: Option<u32>,
    /// `tree.depth`: bucket levels below the slots.
    #[arg(long, env = "PROPD_TREE_DEPTH")]
    tree_depth: Option<u32>,
    /// `tree.digest_width`: bytes kept of every digest.
    #[arg(long, env = "PROPD_TREE_DIGEST_WIDTH")]
    tree_digest_width: Option<u32>,
    /// `log_format`: `text` (default) or `json`, one object per line.
    #[arg(long, env = "PROPD_LOG_FORMAT")]
    log_format: Option<String>,
    /// `etcd.endpoints`: take members and groups from this etcd (repeat, or comma-separate).
    #[arg(long = "etcd", env = "PROPD_ETCD_ENDPOINTS", value_delimiter = ',')]
    etcd_endpoints: Vec<String>,
    /// `etcd.prefix`: this cluster's key prefix in etcd (default `/propd`).
    #[arg(long, env = "PROPD_ETCD_PREFIX")]
    etcd_prefix: Option<String>,
    #[command(flatten)]
    etcd_tls: members::EtcdTlsArgs,
    /// `tls.cert`: this node's certificate chain (PEM); with key and ca, turns on mutual TLS.
    #[arg(long, env = "PROPD_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// `tls.key`: this node's private key (PEM).
    #[arg(long, env = "PROPD_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// `tls.ca`: the CA that signs members' and clients' certificates (PEM).
    #[arg(long, env = "PROPD_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// `insecure`: allow plaintext on a non-loopback address.
    #[arg(long, env = "PROPD_INSECURE")]
    insecure: Option<bool>,
    /// How fast the scrub rereads stored rows, bytes per second (0: off).
    #[arg(long, env = "PROPD_REPAIR_SCRUB_BYTES_PER_SECOND")]
    repair_scrub_bytes_per_second: Option<u64>,
    /// Start with an empty store if the data file is damaged (it is kept as
    /// `propd.redb.damaged`); without it such a node refuses to start.
    #[arg(long, env = "PROPD_ALLOW_EMPTY_STORE", num_args = 0..=1, default_missing_value = "true")]
    allow_empty_store: Option<bool>,
}

impl ServeArgs {
    /// Flags and environment over the file over the defaults.
    fn into_partial(self) -> Result<Partial> {
        let file = match &self.config {
            Some(path) => Partial::from_file(path)?,
            None => Partial::default(),
        };
        let flags = Partial {
            node_id: self.node_id,
            listen: self.listen,
            http: self.http,
            data_dir: self.data_dir,
            write_acks: self.write_acks,
            max_property_bytes: self.max_property_bytes,
            max_clock_skew: self.max_clock_skew,
            allow_empty_store: self.allow_empty_store,
            members: (!self.members.is_empty()).then_some(self.members),
            groups: (!self.groups.is_empty()).then_some(self.groups),
            repair: PartialRepair {
                enabled: self.repair_enabled,
                period: self.repair_period,
                cron: self.repair_cron,
                sync_timeout: self.repair_sync_timeout,
                round_timeout: self.repair_round_timeout,
                verify_interval: self.repair_verify_interval,
                tombstone_grace: self.repair_tombstone_grace,
                throttle_bytes_per_second: self.repair_throttle_bytes_per_second,
                max_streams: self.repair_max_streams,
                max_streams_per_peer: self.repair_max_streams_per_peer,
                scrub_bytes_per_second: self.repair_scrub_bytes_per_second,
            },
            store: PartialStore {
                group_commit: self.store_group_commit,
            },
            metrics: PartialMetrics {
                shard_labels: self.metrics_shard_labels,
            },
            telemetry: PartialTelemetry {
                otlp_endpoint: self.telemetry_otlp_endpoint,
            },
            tree: PartialTree {
                algorithm: self.tree_algorithm,
                slot_count: self.tree_slot_count,
                fanout: self.tree_fanout,
                depth: self.tree_depth,
                digest_width: self.tree_digest_width,
            },
            log_format: self.log_format,
            etcd: PartialEtcd {
                endpoints: (!self.etcd_endpoints.is_empty()).then_some(self.etcd_endpoints),
                prefix: self.etcd_prefix,
                tls_ca: self.etcd_tls.etcd_tls_ca,
                tls_cert: self.etcd_tls.etcd_tls_cert,
                tls_key: self.etcd_tls.etcd_tls_key,
            },
            insecure: self.insecure,
            tls: PartialTls {
                cert: self.tls_cert,
                key: self.tls_key,
                ca: self.tls_ca,
            },
        };
        Ok(flags.over(file))
    }
}

fn parse_member(text: &str) -> Result<Member, String> {
    let (id, addr) = text
        .split_once('=')
        .ok_or_else(|| format!("member `{text}`: expected ID=ADDR"))?;
    let addr = addr
        .parse()
        .map_err(|_| format!("member `{text}`: `{addr}` is not an address"))?;
    Ok(Member {
        id: id.to_owned(),
        addr,
    })
}

fn parse_group(text: &str) -> Result<GroupDef, String> {
    let parts: Vec<&str> = text.split(':').collect();
    let [name, shard_num, replicas] = parts.as_slice() else {
        return Err(format!("group `{text}`: expected NAME:SHARD_NUM:REPLICAS"));
    };
    Ok(GroupDef {
        name: (*name).to_owned(),
        shard_num: shard_num
            .parse()
            .map_err(|_| format!("group `{text}`: bad shard_num"))?,
        replicas: replicas
            .parse()
            .map_err(|_| format!("group `{text}`: bad replicas"))?,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Args)]
struct Client {
    /// The node to talk to.
    #[arg(long, default_value = DEFAULT_LISTEN)]
    server: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// CA certificate (PEM) the node's certificate must be signed by; turns on TLS.
    #[arg(long, env = "PROPD_CA")]
    ca: Option<PathBuf>,
    /// Client certificate (PEM) carrying a role (`propd cert --client NAME=ROLE`).
    #[arg(long, env = "PROPD_CERT", requires = "key")]
    cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "PROPD_KEY", requires = "cert")]
    key: Option<PathBuf>,
    /// The name the node's certificate must carry (its member id); default: the address.
    #[arg(long, env = "PROPD_SERVER_NAME")]
    server_name: Option<String>,
}

#[derive(Debug, Args)]
struct CertArgs {
    /// Directory for the files: ca.pem and ca.key (made once, then reused), NAME.pem, NAME.key.
    #[arg(long)]
    out: PathBuf,
    /// Issue a member certificate for every member of this config file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// A member to issue for, as ID=ADDR (repeat).
    #[arg(long = "member", value_parser = parse_member)]
    members: Vec<Member>,
    /// A client to issue for, as NAME=ROLE with ROLE read, write or admin (repeat).
    #[arg(long = "client")]
    clients: Vec<String>,
    /// Days of validity from now; a negative number makes already-expired certificates.
    #[arg(long, default_value_t = 365, allow_negative_numbers = true)]
    days: i64,
}

#[derive(Debug, Args)]
struct PutArgs {
    #[command(flatten)]
    client: Client,
    /// group/name/id
    entity: String,
    /// A tag, as KEY=VALUE (a string value); repeat for more.
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// The revision to write (default: assigned by the coordinator).
    #[arg(long)]
    revision: Option<i64>,
    /// Write only this node's own copy (no coordination).
    #[arg(long)]
    local: bool,
}

#[derive(Debug, Args)]
struct GetArgs {
    #[command(flatten)]
    client: Client,
    /// group/name/id
    entity: String,
    /// Read only this node's own copy (no coordination, no read repair).
    #[arg(long)]
    local: bool,
}

#[derive(Debug, Args)]
struct DeleteArgs {
    #[command(flatten)]
    client: Client,
    /// group/name/id
    entity: String,
    /// The revision of the tombstone (default: assigned by the coordinator).
    #[arg(long)]
    revision: Option<i64>,
    /// Delete only this node's own copy (no coordination).
    #[arg(long)]
    local: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RepairAction {
    /// Pause background repair rounds on this node.
    Pause,
    /// Resume background repair rounds on this node.
    Resume,
}

#[derive(Debug, Args)]
struct RepairArgs {
    #[command(flatten)]
    client: Client,
    /// `pause` or `resume` background repair instead of starting a round.
    action: Option<RepairAction>,
    #[arg(long, required_unless_present = "action")]
    group: Option<String>,
    #[arg(long, required_unless_present = "action")]
    shard: Option<u32>,
    /// Wait for the round's result and print its trace.
    #[arg(long)]
    wait: bool,
    /// Compute the differences without applying them (implies --wait).
    #[arg(long)]
    preview: bool,
}

#[derive(Debug, Args)]
struct TreeArgs {
    #[command(flatten)]
    client: Client,
    #[arg(long)]
    group: String,
    #[arg(long)]
    shard: u32,
}

#[derive(Debug, Args)]
struct StatusArgs {
    #[command(flatten)]
    client: Client,
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let config = args.into_partial()?.resolve()?;
            crate::server::serve(config).await
        }
        Command::Put(args) => put(args).await,
        Command::Get(args) => get(args).await,
        Command::Delete(args) => delete(args).await,
        Command::Query(args) => transfer::query(args).await,
        Command::Export(args) => transfer::export(args).await,
        Command::Import(args) => transfer::import(args).await,
        Command::Repair(args) => repair(args).await,
        Command::Tree(args) => tree(args).await,
        Command::Status(args) => status(args).await,
        Command::Member(args) => members::member(args).await,
        Command::Group(args) => members::group(args).await,
        Command::Cert(args) => cert(args),
    }
}

fn cert(args: CertArgs) -> Result<()> {
    let mut subjects = Vec::new();
    if let Some(path) = &args.config {
        let config = Partial::from_file(path)?.resolve()?;
        subjects.extend(config.members.into_iter().map(|m| Subject::Member {
            id: m.id,
            addr: m.addr,
        }));
    }
    subjects.extend(args.members.into_iter().map(|m| Subject::Member {
        id: m.id,
        addr: m.addr,
    }));
    for client in &args.clients {
        let (name, role) = client
            .split_once('=')
            .ok_or_else(|| anyhow!("--client `{client}`: expected NAME=ROLE"))?;
        subjects.push(Subject::Client {
            name: name.to_owned(),
            role: role.to_owned(),
        });
    }
    let written = issue(&args.out, &subjects, args.days)?;
    #[allow(clippy::print_stdout, reason = "the CLI's output")]
    for path in written {
        println!("{}", path.display());
    }
    Ok(())
}

async fn channel(client: &Client) -> Result<Channel> {
    let server = client.server.as_str();
    let scheme = if client.ca.is_some() { "https" } else { "http" };
    let uri = if server.contains("://") {
        server.to_owned()
    } else {
        format!("{scheme}://{server}")
    };
    let mut endpoint = Endpoint::from_shared(uri.clone())
        .with_context(|| format!("--server `{server}` is not an address"))?;
    if let Some(ca) = &client.ca {
        let identity = client.cert.as_deref().zip(client.key.as_deref());
        endpoint = endpoint.tls_config(cli_client_config(
            ca,
            identity,
            client.server_name.as_deref(),
        )?)?;
    }
    endpoint
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(60 * 60))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|error| anyhow!("cannot reach {server}: {}", source_chain(&error)))
}

fn source_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(next) = source {
        text.push_str(": ");
        text.push_str(&next.to_string());
        source = next.source();
    }
    text
}

fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow!("{}: {}", code_name(status.code()), status.message())
}

fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::NotFound => "not found",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::DeadlineExceeded => "deadline exceeded",
        tonic::Code::FailedPrecondition => "failed precondition",
        tonic::Code::AlreadyExists => "already exists",
        tonic::Code::ResourceExhausted => "resource exhausted",
        _ => "error",
    }
}

fn split_entity(entity: &str) -> Result<(String, String, String)> {
    let parsed: propd_merkle::Entity = entity
        .parse()
        .map_err(|error| anyhow!("entity `{entity}`: {error}"))?;
    Ok((
        parsed.group().to_owned(),
        parsed.name().to_owned(),
        parsed.id().to_owned(),
    ))
}

fn parse_tags(tags: &[String]) -> Result<Vec<v1::Tag>> {
    tags.iter()
        .map(|tag| {
            let (key, value) = tag
                .split_once('=')
                .ok_or_else(|| anyhow!("--tag `{tag}`: expected KEY=VALUE"))?;
            if key.is_empty() {
                bail!("--tag `{tag}`: the key is empty");
            }
            Ok(v1::Tag {
                key: key.to_owned(),
                value: Some(v1::TagValue {
                    value: Some(v1::tag_value::Value::Str(value.to_owned())),
                }),
            })
        })
        .collect()
}

/// Writes the command's result on stdout. A closed stdout (`propd ... | head`) is an
/// `io::ErrorKind::BrokenPipe` error, which `main` ends quietly.
fn print(output: Output, value: &Value, text: &str) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match output {
        Output::Json => writeln!(stdout, "{value}"),
        Output::Text => writeln!(stdout, "{text}"),
    }?;
    stdout.flush()
}

/// Whether `error` comes from writing to a pipe whose reader is gone: nothing is left to say.
pub fn is_closed_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn tag_json(value: Option<&v1::TagValue>) -> Value {
    match value.and_then(|v| v.value.as_ref()) {
        Some(v1::tag_value::Value::Str(s)) => json!(s),
        Some(v1::tag_value::Value::Int(i)) => json!(i),
        Some(v1::tag_value::Value::Binary(b)) => json!(hex::encode(b)),
        None => Value::Null,
    }
}

fn property_json(property: &v1::Property) -> Value {
    let tags: serde_json::Map<String, Value> = property
        .tags
        .iter()
        .map(|t| (t.key.clone(), tag_json(t.value.as_ref())))
        .collect();
    json!({
        "group": property.group,
        "name": property.name,
        "id": property.id,
        "tags": tags,
        "mod_revision": property.mod_revision,
        "delete_time": property.delete_time,
    })
}

fn property_text(property: &v1::Property) -> String {
    let tags: Vec<String> = property
        .tags
        .iter()
        .map(|t| format!("{}={}", t.key, tag_json(t.value.as_ref())))
        .collect();
    let state = if property.delete_time > 0 {
        format!(" deleted_at={}", property.delete_time)
    } else {
        String::new()
    };
    format!(
        "{}/{}/{} revision={}{} {}",
        property.group,
        property.name,
        property.id,
        property.mod_revision,
        state,
        tags.join(" ")
    )
}

async fn put(args: PutArgs) -> Result<()> {
    let (group, name, id) = split_entity(&args.entity)?;
    let tags = parse_tags(&args.tags)?;
    let mut client = PropertyServiceClient::new(channel(&args.client).await?);
    let request = v1::ApplyRequest {
        property: Some(v1::Property {
            group,
            name,
            id,
            tags,
            mod_revision: args.revision.unwrap_or(0),
            delete_time: 0,
        }),
        local: args.local,
    };
    let response = client
        .apply(request)
        .await
        .map_err(status_error)?
        .into_inner();
    print(
        args.client.output,
        &json!({
            "mod_revision": response.mod_revision,
            "acknowledged": response.acknowledged,
            "copies": response.copies,
            "superseded": superseded_json(response.superseded),
        }),
        &format!(
            "{} revision={} acknowledged={}/{}",
            outcome_word(response.superseded, "ok"),
            response.mod_revision,
            response.acknowledged,
            response.copies
        ),
    )?;
    superseded_exit(response.superseded)
}

/// `superseded` in JSON: the revision, or `null` when the write took effect.
fn superseded_json(superseded: i64) -> Value {
    (superseded != 0).then_some(superseded).into()
}

fn outcome_word(superseded: i64, ok: &str) -> String {
    if superseded != 0 {
        format!("superseded by revision {superseded} (nothing changed):")
    } else {
        ok.to_owned()
    }
}

/// A write that lost to a newer version on every copy exits non-zero.
fn superseded_exit(superseded: i64) -> Result<()> {
    if superseded != 0 {
        bail!("superseded by revision {superseded}");
    }
    Ok(())
}

async fn get(args: GetArgs) -> Result<()> {
    let (group, name, id) = split_entity(&args.entity)?;
    let mut client = PropertyServiceClient::new(channel(&args.client).await?);
    let request = v1::GetRequest {
        group,
        name,
        id,
        local: args.local,
        include_deleted: false,
    };
    let response = client
        .get(request)
        .await
        .map_err(status_error)?
        .into_inner();
    match response.property {
        Some(property) => {
            print(
                args.client.output,
                &property_json(&property),
                &property_text(&property),
            )?;
            Ok(())
        }
        None => bail!("not found: {}", args.entity),
    }
}

async fn delete(args: DeleteArgs) -> Result<()> {
    let (group, name, id) = split_entity(&args.entity)?;
    let mut client = PropertyServiceClient::new(channel(&args.client).await?);
    let request = v1::DeleteRequest {
        group,
        name,
        id,
        mod_revision: args.revision.unwrap_or(0),
        delete_time: 0,
        local: args.local,
    };
    let response = client
        .delete(request)
        .await
        .map_err(status_error)?
        .into_inner();
    print(
        args.client.output,
        &json!({
            "found": response.found,
            "mod_revision": response.mod_revision,
            "delete_time": response.delete_time,
            "acknowledged": response.acknowledged,
            "copies": response.copies,
            "superseded": superseded_json(response.superseded),
        }),
        &format!(
            "{} {} revision={} delete_time={} acknowledged={}/{}",
            outcome_word(response.superseded, "ok"),
            if response.superseded != 0 {
                "not deleted"
            } else if response.found {
                "deleted"
            } else {
                "tombstone written (no live copy found)"
            },
            response.mod_revision,
            response.delete_time,
            response.acknowledged,
            response.copies
        ),
    )?;
    superseded_exit(response.superseded)
}

async fn repair(args: RepairArgs) -> Result<()> {
    let mut client = AdminServiceClient::new(channel(&args.client).await?);
    if let Some(action) = args.action {
        let response = match action {
            RepairAction::Pause => client.pause_repair(v1::PauseRequest {}).await,
            RepairAction::Resume => client.resume_repair(v1::ResumeRequest {}).await,
        }
        .map_err(status_error)?
        .into_inner();
        let word = if response.paused { "paused" } else { "running" };
        print(
            args.client.output,
            &json!({"paused": response.paused}),
            &format!("background repair {word}"),
        )?;
        return Ok(());
    }
    let (Some(group), Some(shard)) = (args.group, args.shard) else {
        bail!("--group and --shard are required to start a round");
    };
    let wait = args.wait || args.preview;
    let request = v1::PropagateNowRequest {
        group: group.clone(),
        shard,
        wait: false,
        preview: args.preview,
        timeout_ms: 0,
    };
    let started = Instant::now();
    let response = client
        .propagate_now(request)
        .await
        .map_err(status_error)?
        .into_inner();
    if !wait {
        print(
            args.client.output,
            &json!({"message_id": response.message_id}),
            &format!("started {}", response.message_id),
        )?;
        return Ok(());
    }
    let label = format!("repairing {group}/{shard}");
    let result = follow_round(&mut client, &response.message_id, &label).await?;
    let (json, text) = result_output(&response.message_id, &result, started.elapsed());
    print(args.client.output, &json, &text)?;
    let ok = result.outcome == v1::PropagationOutcome::Completed as i32;
    if !ok {
        bail!(
            "repair round {} did not complete: {}",
            response.message_id,
            outcome_text(&result)
        );
    }
    Ok(())
}

fn outcome_text(result: &v1::PropagationResult) -> String {
    let outcome = v1::PropagationOutcome::try_from(result.outcome).map_or_else(
        |_| format!("outcome {}", result.outcome),
        |o| o.as_str_name().to_owned(),
    );
    if result.error.is_empty() {
        outcome
    } else {
        format!("{outcome}: {}", result.error)
    }
}

fn result_output(
    message_id: &str,
    result: &v1::PropagationResult,
    elapsed: Duration,
) -> (Value, String) {
    let ok = result.outcome == v1::PropagationOutcome::Completed as i32;
    let mut syncs = Vec::new();
    let mut skipped = Vec::new();
    let mut lines = vec![format!(
        "{} {message_id} in {:.2}s ({})",
        if ok { "ok" } else { "failed" },
        elapsed.as_secs_f64(),
        outcome_text(result)
    )];
    for span in &result.trace {
        let report = span.report.clone().unwrap_or_default();
        if span.kind == v1::trace_span::Kind::Skip as i32 {
            skipped.push(json!({"from": span.from, "to": span.to, "error": span.error, "duration_ms": span.duration_ms}));
            lines.push(format!(
                "  skip {} -> {}: {}",
                span.from, span.to, span.error
            ));
            continue;
        }
        syncs.push(json!({
            "from": span.from,
            "to": span.to,
            "ok": span.error.is_empty(),
            "compared": report.compared,
            "sent": report.sent,
            "received": report.received,
            "applied": report.applied,
            "peer_applied": report.peer_applied,
            "failed": report.failed,
            "peer_failed": report.peer_failed,
            "bytes_sent": report.bytes_sent,
            "bytes_received": report.bytes_received,
            "round_trips": report.round_trips,
            "error": span.error,
        }));
        lines.push(format!(
            "  sync {} -> {} {}ms compared={} sent={} peer_applied={} received={} applied={} failed={} bytes={}/{} round_trips={}{}",
            span.from,
            span.to,
            span.duration_ms,
            report.compared,
            report.sent,
            report.peer_applied,
            report.received,
            report.applied,
            report.failed,
            report.bytes_sent,
            report.bytes_received,
            report.round_trips,
            if span.error.is_empty() {
                String::new()
            } else {
                format!(" error: {}", span.error)
            }
        ));
    }
    let json = json!({"ok": ok, "message_id": message_id, "syncs": syncs, "skipped": skipped, "error": result.error});
    (json, lines.join("\n"))
}

/// Follows round `message_id` until its result: a progress bar on stderr when it is a terminal,
/// one line per step there otherwise.
async fn follow_round(
    client: &mut AdminServiceClient<Channel>,
    message_id: &str,
    label: &str,
) -> Result<v1::PropagationResult> {
    let request = v1::WatchRoundRequest {
        message_id: message_id.to_owned(),
    };
    let mut events = client
        .watch_round(request)
        .await
        .map_err(status_error)?
        .into_inner();
    let mut progress = RoundProgress::new(label, std::io::stderr().is_terminal());
    while let Some(event) = events.message().await.map_err(status_error)? {
        match event.event {
            Some(v1::round_event::Event::Step(step)) => progress.step(&step),
            Some(v1::round_event::Event::Result(result)) => {
                progress.finish();
                return Ok(result);
            }
            None => {}
        }
    }
    progress.finish();
    bail!("the node stopped reporting round {message_id} before it ended")
}

/// What `repair --wait` shows while a round runs: steps done of `max_count`, properties moved
/// and bytes.
struct RoundProgress {
    /// The bar, on a terminal; plain lines otherwise.
    bar: Option<ProgressBar>,
    properties: u64,
    bytes: u64,
}

impl RoundProgress {
    fn new(label: &str, terminal: bool) -> Self {
        let bar = terminal.then(|| {
            let style = ProgressStyle::with_template(
                "{spinner} {prefix} [{bar:30}] {pos}/{len} steps, {msg} ({elapsed})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            let bar = ProgressBar::new(0).with_style(style);
            bar.set_prefix(label.to_owned());
            bar.set_message("waiting for the first step");
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Self {
            bar,
            properties: 0,
            bytes: 0,
        }
    }

    fn step(&mut self, step: &v1::RoundStep) {
        let (properties, bytes) = step_traffic(step);
        self.properties += properties;
        self.bytes += bytes;
        match &self.bar {
            Some(bar) => {
                let span = step.span.clone().unwrap_or_default();
                bar.set_length(u64::from(step.max_count));
                bar.set_position(u64::from(span.count));
                bar.set_message(format!(
                    "{} properties moved, {}",
                    self.properties,
                    HumanBytes(self.bytes)
                ));
            }
            None => {
                // Progress is a courtesy: a closed stderr must not end the command.
                let _ = writeln!(std::io::stderr(), "{}", step_line(step));
            }
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Properties moved (either way) and bytes of one step.
fn step_traffic(step: &v1::RoundStep) -> (u64, u64) {
    let report = step
        .span
        .as_ref()
        .and_then(|span| span.report.clone())
        .unwrap_or_default();
    (
        report.sent + report.received,
        report.bytes_sent + report.bytes_received,
    )
}

/// One step as a plain line: `step 2/3: sync n2 -> n3, 4 properties moved, 1200 bytes`.
fn step_line(step: &v1::RoundStep) -> String {
    let span = step.span.clone().unwrap_or_default();
    let (properties, bytes) = step_traffic(step);
    let kind = if span.kind == v1::trace_span::Kind::Skip as i32 {
        "skip"
    } else {
        "sync"
    };
    let mut line = format!(
        "step {}/{}: {kind} {} -> {}",
        span.count, step.max_count, span.from, span.to
    );
    if kind == "sync" {
        line.push_str(&format!(", {properties} properties moved, {bytes} bytes"));
    }
    if !span.error.is_empty() {
        line.push_str(&format!(": {}", span.error));
    }
    line
}

async fn tree(args: TreeArgs) -> Result<()> {
    let mut client = AdminServiceClient::new(channel(&args.client).await?);
    let request = v1::TreeRequest {
        group: args.group,
        shard: args.shard,
    };
    let tree = client
        .tree(request)
        .await
        .map_err(status_error)?
        .into_inner();
    let shape = tree.shape.unwrap_or_default();
    let algorithm = v1::HashAlgorithm::try_from(shape.algorithm).map_or("unknown", |a| match a {
        v1::HashAlgorithm::Sha512 => "sha512",
        v1::HashAlgorithm::Blake3 => "blake3",
        v1::HashAlgorithm::Unspecified => "unspecified",
    });
    let slots: Vec<Value> = tree
        .slots
        .iter()
        .map(|s| json!({"slot": s.slot, "digest": hex::encode(&s.digest), "leaves": s.leaves}))
        .collect();
    let json = json!({
        "group": tree.group,
        "shard": tree.shard,
        "root": hex::encode(&tree.root),
        "revision": tree.revision,
        "leaves": tree.leaves,
        "shape": {
            "algorithm": algorithm,
            "slot_count": shape.slot_count,
            "fanout": shape.fanout,
            "depth": shape.depth,
            "digest_width": shape.digest_width,
            "format_version": shape.format_version,
        },
        "slots": slots,
    });
    let mut lines = vec![format!(
        "{}/{} root={} revision={} leaves={} shape={algorithm}/{}x{}^{}/{}B",
        tree.group,
        tree.shard,
        hex::encode(&tree.root),
        tree.revision,
        tree.leaves,
        shape.slot_count,
        shape.fanout,
        shape.depth,
        shape.digest_width
    )];
    for slot in tree.slots.iter().filter(|s| s.leaves > 0) {
        lines.push(format!(
            "  slot {:>3} {} leaves={}",
            slot.slot,
            hex::encode(&slot.digest),
            slot.leaves
        ));
    }
    print(args.client.output, &json, &lines.join("\n"))?;
    Ok(())
}

async fn status(args: StatusArgs) -> Result<()> {
    let mut client = AdminServiceClient::new(channel(&args.client).await?);
    let status = client
        .status(v1::StatusRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    let members: Vec<Value> = status
        .members
        .iter()
        .map(|m| json!({"id": m.id, "addr": m.addr, "up": m.up}))
        .collect();
    let shards: Vec<Value> = status
        .shards
        .iter()
        .map(|s| {
            json!({
                "group": s.group,
                "shard": s.shard,
                "last_repair_age_s": (s.last_repair_age_s >= 0).then_some(s.last_repair_age_s),
                "pending": s.pending,
                "purge_cutoff_ns": (s.purge_cutoff_ns > 0).then_some(s.purge_cutoff_ns),
                "purged_below_ns": (s.purged_below_ns > 0).then_some(s.purged_below_ns),
                "purge_blocked": (!s.purge_blocked.is_empty()).then_some(&s.purge_blocked),
            })
        })
        .collect();
    let json = json!({"node": status.node, "members": members, "shards": shards, "repair_paused": status.repair_paused, "store_health": status.store_health, "quarantined": status.quarantined, "membership": status.membership});
    let mut lines = vec![
        format!(
            "node {} (background repair {})",
            status.node,
            if status.repair_paused {
                "paused"
            } else {
                "running"
            }
        ),
        format!(
            "  store {}, {} quarantined rows",
            status.store_health, status.quarantined
        ),
    ];
    if !status.membership.is_empty() {
        lines.push(format!("  {}", status.membership));
    }
    for m in &status.members {
        lines.push(format!(
            "  member {} {} {}",
            m.id,
            m.addr,
            if m.up { "up" } else { "DOWN" }
        ));
    }
    for s in &status.shards {
        let age = if s.last_repair_age_s >= 0 {
            format!("{}s ago", s.last_repair_age_s)
        } else {
            "never".to_owned()
        };
        lines.push(format!(
            "  shard {}/{} last repair {age}, pending {}, purge cutoff {}, purged below {}",
            s.group,
            s.shard,
            s.pending,
            if s.purge_cutoff_ns > 0 {
                s.purge_cutoff_ns.to_string()
            } else {
                "none".to_owned()
            },
            if s.purged_below_ns > 0 {
                s.purged_below_ns.to_string()
            } else {
                "none".to_owned()
            },
        ));
        if !s.purge_blocked.is_empty() {
            lines.push(format!("    purging blocked: {}", s.purge_blocked));
        }
    }
    print(args.client.output, &json, &lines.join("\n"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command of a command line (words split at spaces); panics when it does not parse.
    pub(super) fn parse(line: &str) -> Command {
        Cli::try_parse_from(line.split(' '))
            .unwrap_or_else(|e| panic!("{line}: {e}"))
            .command
    }

    #[test]
    fn the_documented_commands_parse() {
        for line in [
            "propd serve",
            "propd delete g/n/i --revision 9",
            "propd repair resume",
            "propd status --output json",
            "propd query --group g --limit 5 --page-token 1.67 --all --output json",
            "propd export --group g --shard 1 --file g.jsonl --page-size 500",
            "propd import - --batch 500 --dry-run --server 127.0.0.1:7002",
        ] {
            parse(line);
        }
    }

    #[test]
    fn flags_reach_the_values_they_name() {
        let Command::Serve(serve) =
            parse("propd serve --config c.toml --member n1=127.0.0.1:7001 --group g:4:2")
        else {
            panic!("serve");
        };
        assert_eq!(serve.config, Some(PathBuf::from("c.toml")));
        assert_eq!(
            serve.members,
            [Member {
                id: "n1".into(),
                addr: "127.0.0.1:7001".parse().unwrap(),
            }]
        );
        assert_eq!(serve.groups, [GroupDef::new("g", 4, 2)]);

        let Command::Put(put) =
            parse("propd put g/n/i --tag a=b --tag c=d --revision 5 --local --output json")
        else {
            panic!("put");
        };
        assert_eq!(put.entity, "g/n/i");
        assert_eq!(put.tags, ["a=b", "c=d"]);
        assert_eq!(put.revision, Some(5));
        assert!(put.local);
        assert_eq!(put.client.output, Output::Json);
        assert_eq!(put.client.server, DEFAULT_LISTEN);

        let Command::Get(get) =
            parse("propd get --server 127.0.0.1:7002 g/n/i/with/slashes --local")
        else {
            panic!("get");
        };
        assert_eq!(get.entity, "g/n/i/with/slashes");
        assert_eq!(get.client.server, "127.0.0.1:7002");
        assert_eq!(get.client.output, Output::Text);
        assert!(get.local);

        let Command::Query(query) =
            parse("propd query --group g --name n --id a --id b --tag k=v --local --output json")
        else {
            panic!("query");
        };
        assert_eq!(
            (query.group.as_str(), query.name.as_deref()),
            ("g", Some("n"))
        );
        assert_eq!(query.ids, ["a", "b"]);
        assert_eq!(query.tags, ["k=v"]);
        assert_eq!(query.limit, 0);
        assert!(query.local);

        let Command::Repair(repair) = parse("propd repair --group g --shard 3 --wait --preview")
        else {
            panic!("repair");
        };
        assert_eq!(repair.action, None);
        assert_eq!(
            (repair.group.as_deref(), repair.shard),
            (Some("g"), Some(3))
        );
        assert!(repair.wait && repair.preview);

        let Command::Repair(pause) = parse("propd repair pause --server 127.0.0.1:7001") else {
            panic!("repair pause");
        };
        assert_eq!(pause.action, Some(RepairAction::Pause));
        assert_eq!((pause.group, pause.shard), (None, None));

        let Command::Tree(tree) = parse("propd tree --group g --shard 0 --output json") else {
            panic!("tree");
        };
        assert_eq!((tree.group.as_str(), tree.shard), ("g", 0));
    }

    #[test]
    fn repair_without_a_shard_or_action_is_refused() {
        let error = Cli::try_parse_from(["propd", "repair", "--group", "g"]).unwrap_err();
        assert_eq!(
            error.kind(),
            clap::error::ErrorKind::MissingRequiredArgument
        );
        assert!(error.to_string().contains("--shard"), "{error}");
    }

    #[test]
    fn groups_and_members_parse_from_flags() {
        assert_eq!(
            parse_group("g:4:2").unwrap(),
            GroupDef {
                name: "g".into(),
                shard_num: 4,
                replicas: 2
            }
        );
        assert!(
            parse_group("g:4")
                .unwrap_err()
                .contains("NAME:SHARD_NUM:REPLICAS")
        );
        assert!(parse_member("n1").unwrap_err().contains("ID=ADDR"));
    }
}
