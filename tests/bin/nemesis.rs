//! `nemesis`: one run of the nemesis suite against a `propd` binary. `cargo xtask nemesis`
//! builds everything and calls it; `docs/reliability.md` describes it.
//!
//! Exit code: 0 when every promise held, 1 on an anomaly or problem, 2 when the harness failed.

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a command-line tool"
)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use propd_tests::nemesis::run::{Settings, run};
use propd_tests::nemesis::schedule::FaultKind;

const USAGE: &str = "\
nemesis --propd PATH --out DIR [--nodes N] [--seconds S] [--seed X] [--faults LIST]
        [--clients C] [--entities E] [--rss-limit-mib M]

  --faults   `all` or a comma-separated list of: kill, pause, partition, cut, delay,
             bandwidth, refuse, skew, corrupt, disk-full (default: all)
  --seed     default: drawn from the clock, and printed
";

fn parse(args: &[String]) -> Result<Settings> {
    let mut settings = Settings {
        binary: PathBuf::new(),
        out: PathBuf::new(),
        nodes: 3,
        seconds: 60,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs()),
        faults: FaultKind::ALL.to_vec(),
        clients: 8,
        entities: 300,
        rss_limit_mib: 512,
    };
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .cloned()
                .with_context(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--propd" => settings.binary = PathBuf::from(value()?),
            "--out" => settings.out = PathBuf::from(value()?),
            "--nodes" => settings.nodes = value()?.parse().context("--nodes")?,
            "--seconds" => settings.seconds = value()?.parse().context("--seconds")?,
            "--seed" => settings.seed = value()?.parse().context("--seed")?,
            "--faults" => {
                settings.faults = FaultKind::parse_list(&value()?).map_err(anyhow::Error::msg)?;
            }
            "--clients" => settings.clients = value()?.parse().context("--clients")?,
            "--entities" => settings.entities = value()?.parse().context("--entities")?,
            "--rss-limit-mib" => {
                settings.rss_limit_mib = value()?.parse().context("--rss-limit-mib")?;
            }
            other => bail!("unknown argument `{other}`\n\n{USAGE}"),
        }
    }
    if settings.binary.as_os_str().is_empty() || settings.out.as_os_str().is_empty() {
        bail!("--propd and --out are required\n\n{USAGE}");
    }
    if settings.nodes == 0 || settings.clients == 0 || settings.entities == 0 {
        bail!("--nodes, --clients and --entities must be at least 1");
    }
    Ok(settings)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let settings = match parse(&args) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("nemesis: {error:#}");
            return ExitCode::from(2);
        }
    };
    eprintln!(
        "nemesis: seed {}, {} nodes, {} s, output in {}",
        settings.seed,
        settings.nodes,
        settings.seconds,
        settings.out.display()
    );
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("nemesis: starting the runtime: {error}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(&settings)) {
        Ok(summary) => {
            print!("{}", summary.report);
            let _ = std::fs::write(settings.out.join("summary.txt"), &summary.report);
            if summary.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(error) => {
            eprintln!("nemesis: the harness failed: {error:#}");
            ExitCode::from(2)
        }
    }
}
