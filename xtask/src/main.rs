//! Project automation, one binary with subcommands (`cargo xtask help`).
//!
//! `ci` is the one command that CI and every developer runs before a commit.

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "xtask is a command-line tool"
)]

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

mod bench_report;
mod boundaries;
mod demo;
mod demo_join;
mod fuzz;
mod nemesis;
mod tools;

const HELP: &str = "\
cargo xtask <command>

commands:
  ci       format check, clippy (warnings denied), crate boundaries, every test, two 60 s
           nemesis schedules, 30 s of each fuzz target (where the nightly toolchain is)
  demo     start a local three-node cluster, make it diverge, repair it, show convergence
           (--join: membership in etcd; a fourth node joins and its shards move to it)
  bench    run the criterion benches (release build); extra args go to `cargo bench`
  bench-report  SVG charts from the bench results under target/criterion into docs/benchmarks/
  nemesis  real nodes under injected faults, then check nothing acknowledged was lost
           ([--nodes N] [--seconds S] [--seed X] [--faults LIST] [--debug]; see --help)
  fuzz     run each cargo-fuzz target for a while (nightly toolchain; skipped without it)
           ([--seconds S] [TARGET...]; see --help)
  mutants  mutation testing with cargo-mutants (installed when missing):
             cargo xtask mutants [--crate CRATE]... [--file GLOB]... [ARGS for cargo mutants]
           (default --output target/mutants, --timeout 300); --copy DIR runs it in a copy of
           the working tree at DIR, every crate but the mutated one built optimised (faster)
           e.g. `cargo xtask mutants --crate propd-repair --file crates/repair/src/server.rs`;
           results under target/mutants/mutants.out (see docs/testing.md)
  help     this text
";

/// The nemesis schedules `ci` runs (60 s each, every fault kind).
const NEMESIS_CI_SEEDS: [&str; 2] = ["1", "2"];

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let command = args.next().unwrap_or_else(|| "help".to_owned());
    let rest: Vec<String> = args.collect();
    let root = workspace_root();
    std::env::set_current_dir(&root).with_context(|| format!("entering {}", root.display()))?;
    // Every command but `help` builds the node, which needs protoc (installed when missing).
    if !matches!(command.as_str(), "help" | "--help" | "-h") {
        tools::ensure_protoc()?;
    }
    match command.as_str() {
        "ci" => ci(),
        "bench" => bench(&rest),
        "bench-report" => bench_report::run(&root),
        "demo" if rest.iter().any(|a| a == "--join") => demo_join::run(),
        "demo" => demo::run(),
        "nemesis" => nemesis::run(&root, &rest),
        "fuzz" => fuzz::run(&root, &rest),
        "mutants" => mutants(&rest),
        "help" | "--help" | "-h" => {
            print!("{HELP}");
            Ok(())
        }
        other => bail!("unknown xtask command `{other}`\n\n{HELP}"),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

fn ci() -> Result<()> {
    // The membership tests start a real etcd; without one they say SKIPPED.
    tools::ensure_etcd(false)?;
    run("cargo", &["fmt", "--all", "--", "--check"])?;
    run(
        "cargo",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--all-features",
            "--locked",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    boundaries::check_all(&workspace_root())?;
    let test = if has_nextest() {
        cargo(&[
            "nextest",
            "run",
            "--workspace",
            "--all-features",
            "--locked",
            "--no-fail-fast",
        ])
    } else {
        cargo(&[
            "test",
            "--workspace",
            "--all-features",
            "--locked",
            "--no-fail-fast",
        ])
    };
    status(test)?;
    // The cluster suite once more with mutual TLS on every node and every client call
    // (`PROPD_TEST_TLS=1` makes the harness issue certificates with `propd cert`).
    let mut tls = if has_nextest() {
        // The same build as the run above (the whole workspace, all features), filtered to
        // the suite: nothing is compiled again.
        cargo(&[
            "nextest",
            "run",
            "--workspace",
            "--all-features",
            "--locked",
            "--no-fail-fast",
            "-E",
            "package(propd-tests)",
        ])
    } else {
        cargo(&[
            "test",
            "--package",
            "propd-tests",
            "--all-features",
            "--locked",
            "--no-fail-fast",
        ])
    };
    tls.env("PROPD_TEST_TLS", "1");
    let started = std::time::Instant::now();
    status(tls)?;
    eprintln!(
        "xtask ci: the cluster suite with mutual TLS took {:.0?}",
        started.elapsed()
    );
    if has_nextest() {
        // nextest does not run doctests.
        run(
            "cargo",
            &["test", "--workspace", "--all-features", "--locked", "--doc"],
        )?;
    }
    // Two seeded nemesis schedules with every fault kind, on the debug binaries the test suite
    // has just built (docs/reliability.md, "In CI").
    for seed in NEMESIS_CI_SEEDS {
        let args = ["--debug", "--no-build", "--seconds", "60", "--seed", seed];
        nemesis::run(&workspace_root(), &args.map(str::to_owned))?;
    }
    // Each fuzz target for 30 s where the nightly toolchain is present (it says why it skips).
    fuzz::run(
        &workspace_root(),
        &["--seconds".to_owned(), "30".to_owned()],
    )?;
    eprintln!("xtask ci: all checks passed");
    Ok(())
}

fn bench(extra: &[String]) -> Result<()> {
    let mut command = cargo(&["bench", "--package", "propd-benches", "--locked"]);
    command.args(extra);
    status(command)
}

/// The cargo-mutants release `cargo xtask mutants` installs when none is installed.
const CARGO_MUTANTS: &str = "27.1.0";

/// Runs cargo-mutants over the chosen crates and files, installing it first when missing.
/// `--crate X` and `--file F` narrow the run (both may repeat); every other argument goes to
/// `cargo mutants` as is (`--re`, `--timeout`, `--list`, ...). Mutants are built in place, in
/// this tree's own target directory, so the dependencies are not compiled again: do not edit
/// the sources while it runs (cargo-mutants restores each file after its mutant).
fn mutants(args: &[String]) -> Result<()> {
    let installed = Command::new("cargo")
        .args(["mutants", "--version"])
        .output()
        .is_ok_and(|output| output.status.success());
    if !installed {
        // The version docs/testing.md's figures were measured with.
        eprintln!("xtask mutants: cargo-mutants is missing; installing {CARGO_MUTANTS}");
        run(
            "cargo",
            &[
                "install",
                "--locked",
                "cargo-mutants",
                "--version",
                CARGO_MUTANTS,
            ],
        )?;
    }
    let mut command = cargo(&["mutants", "--in-place"]);
    let mut rest = args.iter();
    let mut timeout_given = false;
    let mut output_given = false;
    let mut copy = None;
    let mut crates = Vec::new();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--crate" => {
                let krate = rest.next().context("--crate needs a package name")?;
                command.args(["--package", krate]);
                crates.push(krate.clone());
            }
            "--file" => {
                let file = rest.next().context("--file needs a path or glob")?;
                command.args(["--file", file]);
            }
            "--copy" => {
                copy = Some(PathBuf::from(
                    rest.next().context("--copy needs a directory")?,
                ));
            }
            other => {
                timeout_given |= other.starts_with("--timeout");
                output_given |= other.starts_with("--output");
                command.arg(other);
            }
        }
    }
    if !output_given {
        command.args(["--output", "target/mutants"]);
    }
    if !timeout_given {
        // A mutant that makes a loop endless must not hold the machine: a mutant's tests may
        // take at most this long (the unmutated tests take seconds).
        command.args(["--timeout", "300"]);
    }
    if let Some(dir) = copy {
        let dir =
            std::path::absolute(&dir).with_context(|| format!("resolving {}", dir.display()))?;
        cheap_copy(&dir, &crates)?;
        command.current_dir(&dir);
        // The copy builds in its own target directory, whatever the caller's environment says.
        command.env_remove("CARGO_TARGET_DIR");
    }
    status(command)
}

/// Writes the working tree (tracked and untracked files, but not ignored ones) into `dir`,
/// with a cargo configuration that makes each mutant cheap: the dependencies and every
/// workspace crate but `mutated` are built optimised and without debug information, so that a
/// mutant rebuilds only the mutated crate, unoptimised, and its tests run against fast hashing
/// and storage. A crate's tests ran about ten times faster so (docs/testing.md).
fn cheap_copy(dir: &Path, mutated: &[String]) -> Result<()> {
    if mutated.is_empty() {
        bail!("--copy needs --crate: the copy builds every other workspace crate optimised");
    }
    let listed = Command::new("git")
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .output()
        .context("listing the working tree with git")?;
    if !listed.status.success() {
        bail!(
            "git ls-files failed: {}",
            String::from_utf8_lossy(&listed.stderr)
        );
    }
    let mut copied = 0usize;
    for path in listed.stdout.split(|&b| b == 0).filter(|p| !p.is_empty()) {
        let path = Path::new(std::str::from_utf8(path).context("a path that is not UTF-8")?);
        // Listed but deleted in the working tree: nothing to copy.
        if !path.is_file() {
            continue;
        }
        let target = dir.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        // Only files that changed are written, so the copy's build stays incremental.
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        if std::fs::read(&target).ok().as_deref() != Some(&bytes[..]) {
            std::fs::write(&target, &bytes)
                .with_context(|| format!("writing {}", target.display()))?;
            copied += 1;
        }
    }
    let mut config = String::from(
        "# Written by `cargo xtask mutants --copy`: a cheap build for mutation runs.\n\
         [profile.dev]\ndebug = false\n\n[profile.dev.package.\"*\"]\nopt-level = 2\n",
    );
    for krate in workspace_crates()? {
        if !mutated.contains(&krate) {
            config.push_str(&format!("\n[profile.dev.package.{krate}]\nopt-level = 2\n"));
        }
    }
    let cargo_dir = dir.join(".cargo");
    std::fs::create_dir_all(&cargo_dir)?;
    let alias = std::fs::read_to_string(".cargo/config.toml").unwrap_or_default();
    std::fs::write(cargo_dir.join("config.toml"), format!("{alias}\n{config}"))
        .context("writing the copy's cargo configuration")?;
    eprintln!(
        "xtask mutants: {copied} files updated in {}; building there",
        dir.display()
    );
    Ok(())
}

/// The package names of the workspace's library crates (`crates/*`).
fn workspace_crates() -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir("crates").context("reading crates/")? {
        let manifest = entry?.path().join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&manifest) else {
            continue;
        };
        if let Some(name) = text.lines().find_map(|line| {
            line.strip_prefix("name = \"")
                .and_then(|rest| rest.strip_suffix('"'))
        }) {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

fn has_nextest() -> bool {
    Command::new("cargo")
        .args(["nextest", "--version"])
        .output()
        .is_ok_and(|output| output.status.success())
}

fn cargo(args: &[&str]) -> Command {
    let mut command = Command::new("cargo");
    command.args(args);
    command
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    let mut command = Command::new(program);
    command.args(args);
    status(command)
}

fn status(mut command: Command) -> Result<()> {
    eprintln!("xtask: {command:?}");
    let status = command
        .status()
        .with_context(|| format!("spawning {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}
