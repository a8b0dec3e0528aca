//! The paging commands: `propd query` (one page, or every page with `--all`), `propd export` and
//! `propd import` (JSON lines, docs/formats.md "Export lines").

use std::fs::File;
use std::io::{BufRead as _, BufReader, BufWriter, IsTerminal as _, Seek as _, Write as _};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};
use clap::Args;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use propd_proto::v1;
use propd_proto::v1::property_service_client::PropertyServiceClient;
use serde_json::{Map, Value, json};
use tonic::transport::Channel;

use super::{
    Client, Output, channel, parse_tags, print, property_json, property_text, status_error,
};
use crate::import::MAX_IMPORT_BATCH;
use crate::pages::MAX_QUERY_LIMIT;

/// `propd query`.
#[derive(Debug, Args)]
pub(super) struct QueryArgs {
    #[command(flatten)]
    pub(super) client: Client,
    #[arg(long)]
    pub(super) group: String,
    #[arg(long)]
    pub(super) name: Option<String>,
    /// Match these ids (repeat).
    #[arg(long = "id")]
    pub(super) ids: Vec<String>,
    /// Tag equality filter KEY=VALUE (repeat; all must match).
    #[arg(long = "tag")]
    pub(super) tags: Vec<String>,
    /// At most this many properties per page (0: the server's default, 1000).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_QUERY_LIMIT)))]
    pub(super) limit: u32,
    /// Start after the page that answered with this `next_page_token`.
    #[arg(long, default_value = "")]
    pub(super) page_token: String,
    /// Every page, one property per line (JSON lines with `--output json`).
    #[arg(long)]
    pub(super) all: bool,
    #[arg(long)]
    pub(super) local: bool,
}

/// `propd export`.
#[derive(Debug, Args)]
pub(super) struct ExportArgs {
    /// The node, and TLS (`--output` does not apply: the lines are JSON).
    #[command(flatten)]
    client: Client,
    #[arg(long)]
    group: String,
    /// Only this shard of the group.
    #[arg(long)]
    shard: Option<u32>,
    /// Write here instead of stdout.
    #[arg(long, short = 'o')]
    file: Option<PathBuf>,
    /// Properties per page asked of the node.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_QUERY_LIMIT)))]
    page_size: u32,
}

/// `propd import`.
#[derive(Debug, Args)]
pub(super) struct ImportArgs {
    /// The node, and TLS.
    #[command(flatten)]
    client: Client,
    /// The export to read (JSON lines); `-` for stdin.
    file: PathBuf,
    /// Properties per import request.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=MAX_IMPORT_BATCH as i64))]
    batch: u32,
    /// Check every line (here and on the node) and write nothing.
    #[arg(long)]
    dry_run: bool,
}

async fn property_client(client: &Client) -> Result<PropertyServiceClient<Channel>> {
    Ok(PropertyServiceClient::new(channel(client).await?)
        .max_decoding_message_size(propd_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(propd_proto::MAX_MESSAGE_BYTES))
}

pub(super) async fn query(args: QueryArgs) -> Result<()> {
    let filters = parse_tags(&args.tags)?
        .into_iter()
        .map(|tag| v1::TagFilter {
            key: tag.key,
            value: tag.value,
        })
        .collect();
    let mut client = property_client(&args.client).await?;
    let mut request = v1::QueryRequest {
        group: args.group,
        name: args.name.unwrap_or_default(),
        ids: args.ids,
        tags: filters,
        limit: args.limit,
        local: args.local,
        include_deleted: false,
        page_token: args.page_token,
        shard: None,
    };
    if !args.all {
        let response = client
            .query(request)
            .await
            .map_err(status_error)?
            .into_inner();
        let token = (!response.next_page_token.is_empty()).then_some(&response.next_page_token);
        let json = json!({
            "properties": response.properties.iter().map(property_json).collect::<Vec<_>>(),
            "next_page_token": token,
        });
        let mut text: Vec<String> = response.properties.iter().map(property_text).collect();
        if let Some(token) = token {
            text.push(format!("next page: --page-token {token}"));
        }
        print(args.client.output, &json, &text.join("\n"))?;
        return Ok(());
    }
    let mut stdout = std::io::stdout().lock();
    loop {
        let response = client
            .query(request.clone())
            .await
            .map_err(status_error)?
            .into_inner();
        for property in &response.properties {
            match args.client.output {
                Output::Json => writeln!(stdout, "{}", property_json(property))?,
                Output::Text => writeln!(stdout, "{}", property_text(property))?,
            }
        }
        stdout.flush()?;
        if response.next_page_token.is_empty() {
            return Ok(());
        }
        request.page_token = response.next_page_token;
    }
}

/// A progress display on stderr when it is a terminal; nothing otherwise.
fn progress(template: &str, length: Option<u64>) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let style = ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let bar = match length {
        Some(length) => ProgressBar::new(length),
        None => ProgressBar::new_spinner(),
    }
    .with_style(style);
    bar.enable_steady_tick(Duration::from_millis(120));
    Some(bar)
}

/// One property as an export line (docs/formats.md, "Export lines"): lossless, tags typed.
pub(crate) fn export_line(property: &v1::Property) -> Value {
    let tags: Map<String, Value> = property
        .tags
        .iter()
        .map(|tag| {
            let value = match tag.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(v1::tag_value::Value::Str(s)) => json!(s),
                Some(v1::tag_value::Value::Int(i)) => json!(i),
                Some(v1::tag_value::Value::Binary(b)) => json!({"binary": hex::encode(b)}),
                None => Value::Null,
            };
            (tag.key.clone(), value)
        })
        .collect();
    json!({
        "group": property.group,
        "name": property.name,
        "id": property.id,
        "mod_revision": property.mod_revision,
        "delete_time": property.delete_time,
        "tags": tags,
    })
}

/// A refused export line: the field and why.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct LineError {
    pub(crate) field: String,
    pub(crate) message: String,
}

fn line_error(field: &str, message: impl Into<String>) -> LineError {
    LineError {
        field: field.to_owned(),
        message: message.into(),
    }
}

/// Parses one export line back into a property (the inverse of [`export_line`]).
pub(crate) fn parse_line(line: &str) -> Result<v1::Property, LineError> {
    let value: Value = serde_json::from_str(line)
        .map_err(|error| line_error("line", format!("not JSON: {error}")))?;
    let Value::Object(object) = value else {
        return Err(line_error("line", "expected a JSON object"));
    };
    const FIELDS: [&str; 6] = ["group", "name", "id", "mod_revision", "delete_time", "tags"];
    if let Some(unknown) = object.keys().find(|key| !FIELDS.contains(&key.as_str())) {
        return Err(line_error(unknown, "unknown field"));
    }
    let text = |field: &str| -> Result<String, LineError> {
        match object.get(field) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(Value::String(_)) => Err(line_error(field, "must not be empty")),
            Some(_) => Err(line_error(field, "expected a string")),
            None => Err(line_error(field, "missing")),
        }
    };
    let integer = |field: &str, required: bool| -> Result<i64, LineError> {
        match object.get(field) {
            Some(value) => value
                .as_i64()
                .ok_or_else(|| line_error(field, format!("expected an integer, found {value}"))),
            None if required => Err(line_error(field, "missing")),
            None => Ok(0),
        }
    };
    let (group, name, id) = (text("group")?, text("name")?, text("id")?);
    let mod_revision = integer("mod_revision", true)?;
    if mod_revision <= 0 {
        return Err(line_error(
            "mod_revision",
            format!("{mod_revision} must be > 0"),
        ));
    }
    let delete_time = integer("delete_time", false)?;
    if delete_time < 0 {
        return Err(line_error(
            "delete_time",
            format!("{delete_time} must be >= 0"),
        ));
    }
    let mut tags = Vec::new();
    match object.get("tags") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (key, value) in map {
                let field = format!("tags.{key}");
                let value = match value {
                    Value::String(s) => v1::tag_value::Value::Str(s.clone()),
                    Value::Number(n) => v1::tag_value::Value::Int(n.as_i64().ok_or_else(|| {
                        line_error(&field, format!("{n} is not a 64-bit integer"))
                    })?),
                    Value::Object(binary) if binary.len() == 1 => {
                        let hex_text = binary
                            .get("binary")
                            .and_then(Value::as_str)
                            .ok_or_else(|| line_error(&field, "expected {\"binary\": HEX}"))?;
                        v1::tag_value::Value::Binary(
                            hex::decode(hex_text)
                                .map_err(|error| line_error(&field, format!("bad hex: {error}")))?,
                        )
                    }
                    other => {
                        return Err(line_error(
                            &field,
                            format!(
                                "expected a string, an integer or {{\"binary\": HEX}}, found {other}"
                            ),
                        ));
                    }
                };
                tags.push(v1::Tag {
                    key: key.clone(),
                    value: Some(v1::TagValue { value: Some(value) }),
                });
            }
        }
        Some(_) => return Err(line_error("tags", "expected an object")),
    }
    Ok(v1::Property {
        group,
        name,
        id,
        tags,
        mod_revision,
        delete_time,
    })
}

pub(super) async fn export(args: ExportArgs) -> Result<()> {
    let mut client = property_client(&args.client).await?;
    let mut out: Box<dyn std::io::Write> = match &args.file {
        Some(path) => Box::new(BufWriter::new(
            File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => Box::new(BufWriter::new(std::io::stdout().lock())),
    };
    let what = match args.shard {
        Some(shard) => format!("{}/{shard}", args.group),
        None => args.group.clone(),
    };
    let bar = progress(
        &format!("{{spinner}} exporting {what}: {{pos}} properties, {{msg}} ({{elapsed}})"),
        None,
    );
    let mut request = v1::QueryRequest {
        group: args.group,
        limit: args.page_size,
        include_deleted: true,
        shard: args.shard,
        ..Default::default()
    };
    let (mut count, mut bytes) = (0u64, 0u64);
    loop {
        let response = client
            .query(request.clone())
            .await
            .map_err(status_error)?
            .into_inner();
        for property in &response.properties {
            let line = export_line(property).to_string();
            writeln!(out, "{line}")?;
            count += 1;
            bytes += line.len() as u64 + 1;
        }
        if let Some(bar) = &bar {
            bar.set_position(count);
            bar.set_message(HumanBytes(bytes).to_string());
        }
        if response.next_page_token.is_empty() {
            break;
        }
        request.page_token = response.next_page_token;
    }
    out.flush()?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if args.file.is_some() {
        print_line(&format!(
            "exported {count} properties of {what} ({})",
            HumanBytes(bytes)
        ))?;
    }
    Ok(())
}

/// The input of an import, readable twice: the file, or stdin copied to an anonymous file.
fn open_input(path: &PathBuf) -> Result<File> {
    if path.as_os_str() == "-" {
        let mut spool = tempfile::tempfile().context("creating a file to hold stdin")?;
        std::io::copy(&mut std::io::stdin().lock(), &mut spool).context("reading stdin")?;
        spool.rewind()?;
        return Ok(spool);
    }
    File::open(path).with_context(|| format!("opening {}", path.display()))
}

/// The input's lines in batches of properties, each with its line numbers; a bad line ends the
/// reading with `line N: FIELD: why`.
struct Batches<'a> {
    reader: BufReader<File>,
    number: usize,
    batch: usize,
    bar: Option<&'a ProgressBar>,
}

impl<'a> Batches<'a> {
    fn new(input: &File, batch: usize, bar: Option<&'a ProgressBar>) -> Result<Self> {
        let mut file = input.try_clone()?;
        file.rewind()?;
        Ok(Batches {
            reader: BufReader::new(file),
            number: 0,
            batch,
            bar,
        })
    }

    /// The next batch, `None` at the end.
    fn next_batch(&mut self) -> Result<Option<(Vec<usize>, Vec<v1::Property>)>> {
        let (mut lines, mut properties) = (Vec::new(), Vec::new());
        let mut line = String::new();
        while properties.len() < self.batch {
            line.clear();
            let read = self.reader.read_line(&mut line)?;
            if read == 0 {
                break;
            }
            self.number += 1;
            if let Some(bar) = self.bar {
                bar.inc(read as u64);
            }
            if line.trim().is_empty() {
                continue;
            }
            let property = parse_line(line.trim_end()).map_err(|error| {
                anyhow!("line {}: {}: {}", self.number, error.field, error.message)
            })?;
            lines.push(self.number);
            properties.push(property);
        }
        Ok((!properties.is_empty()).then_some((lines, properties)))
    }
}

/// A node's refusal of item `properties[i]...` of a batch, as the line it came from.
fn refused_line(status: &tonic::Status, lines: &[usize]) -> anyhow::Error {
    let message = status.message();
    if let Some(rest) = message.strip_prefix("properties[")
        && let Some((index, rest)) = rest.split_once(']')
        && let Ok(index) = index.parse::<usize>()
        && let Some(line) = lines.get(index)
    {
        let rest = rest.trim_start_matches('.');
        let rest = rest.strip_prefix(": ").unwrap_or(rest);
        return anyhow!("line {line}: {rest}");
    }
    status_error(status.clone())
}

pub(super) async fn import(args: ImportArgs) -> Result<()> {
    let mut client = property_client(&args.client).await?;
    let input = open_input(&args.file)?;
    let size = input.metadata().map(|m| m.len()).unwrap_or(0);
    let batch = args.batch as usize;
    // First pass: every line parsed here and checked by the node, nothing written; a bad line
    // refuses the whole import.
    let bar = progress(
        "{spinner} checking [{bar:30}] {bytes}/{total_bytes} ({elapsed})",
        Some(size),
    );
    let mut batches = Batches::new(&input, batch, bar.as_ref())?;
    let mut checked = 0u64;
    while let Some((lines, properties)) = batches.next_batch()? {
        checked += properties.len() as u64;
        client
            .import(v1::ImportRequest {
                properties,
                local: false,
                dry_run: true,
            })
            .await
            .map_err(|status| refused_line(&status, &lines))?;
    }
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    if args.dry_run {
        return print_line(&format!(
            "{checked} properties checked, nothing written (--dry-run)"
        ));
    }
    let bar = progress(
        "{spinner} importing [{bar:30}] {bytes}/{total_bytes} ({elapsed}) {msg}",
        Some(size),
    );
    let mut batches = Batches::new(&input, batch, bar.as_ref())?;
    let (mut applied, mut unchanged, mut done) = (0u64, 0u64, 0u64);
    while let Some((lines, properties)) = batches.next_batch()? {
        let count = properties.len() as u64;
        let response = client
            .import(v1::ImportRequest {
                properties,
                local: false,
                dry_run: false,
            })
            .await
            .map_err(|status| {
                anyhow!(
                    "lines {}-{}: {}; {done} properties were imported before them (importing \
                     the same file again is harmless: newer versions win)",
                    lines.first().copied().unwrap_or(0),
                    lines.last().copied().unwrap_or(0),
                    status_error(status)
                )
            })?
            .into_inner();
        applied += response.applied;
        unchanged += response.unchanged;
        done += count;
        if let Some(bar) = &bar {
            bar.set_message(format!("{applied} stored, {unchanged} unchanged"));
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    print_line(&format!(
        "imported {done} properties: {applied} stored, {unchanged} unchanged (the cluster held \
         the same or a newer version)"
    ))
}

/// A summary line on stdout.
fn print_line(text: &str) -> Result<()> {
    print(Output::Text, &Value::Null, text)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_export_line_parses_back_to_the_same_property() {
        let property = v1::Property {
            group: "g".into(),
            name: "n".into(),
            id: "a/b".into(),
            tags: vec![
                v1::Tag {
                    key: "b".into(),
                    value: Some(v1::TagValue {
                        value: Some(v1::tag_value::Value::Binary(vec![0, 255])),
                    }),
                },
                v1::Tag {
                    key: "i".into(),
                    value: Some(v1::TagValue {
                        value: Some(v1::tag_value::Value::Int(-3)),
                    }),
                },
                v1::Tag {
                    key: "s".into(),
                    value: Some(v1::TagValue {
                        value: Some(v1::tag_value::Value::Str("x".into())),
                    }),
                },
            ],
            mod_revision: 7,
            delete_time: 0,
        };
        let line = export_line(&property).to_string();
        assert_eq!(parse_line(&line).unwrap(), property);
    }

    #[test]
    fn bad_lines_name_the_field() {
        let cases = [
            ("not json", "line"),
            ("[1]", "line"),
            (r#"{"group":"g","name":"n","id":"i"}"#, "mod_revision"),
            (
                r#"{"group":"g","name":"n","id":"i","mod_revision":"5"}"#,
                "mod_revision",
            ),
            (
                r#"{"group":"g","name":"n","id":"i","mod_revision":0}"#,
                "mod_revision",
            ),
            (
                r#"{"group":"","name":"n","id":"i","mod_revision":1}"#,
                "group",
            ),
            (r#"{"name":"n","id":"i","mod_revision":1}"#, "group"),
            (
                r#"{"group":"g","name":"n","id":"i","mod_revision":1,"delete_time":-1}"#,
                "delete_time",
            ),
            (
                r#"{"group":"g","name":"n","id":"i","mod_revision":1,"tags":{"k":[1]}}"#,
                "tags.k",
            ),
            (
                r#"{"group":"g","name":"n","id":"i","mod_revision":1,"tags":{"k":{"binary":"zz"}}}"#,
                "tags.k",
            ),
            (
                r#"{"group":"g","name":"n","id":"i","mod_revision":1,"extra":1}"#,
                "extra",
            ),
        ];
        for (line, field) in cases {
            let error = parse_line(line).unwrap_err();
            assert_eq!(error.field, field, "{line}: {error:?}");
        }
    }

    #[test]
    fn a_refusal_of_an_item_names_its_line() {
        let status = tonic::Status::invalid_argument("properties[1].mod_revision: 9 is ahead");
        let error = refused_line(&status, &[4, 7]);
        assert_eq!(error.to_string(), "line 7: mod_revision: 9 is ahead");
        let status = tonic::Status::invalid_argument("properties[0]: too large");
        assert_eq!(refused_line(&status, &[4]).to_string(), "line 4: too large");
    }
}
