//! Project automation, one binary with subcommands (`cargo xtask help`).
//!
//! `ci` is the one command that CI and every developer runs before a commit.

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "xtask is a command-line tool"
)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

mod demo;

const HELP: &str = "\
cargo xtask <command>

commands:
  ci       format check, clippy (warnings denied), purity checks, every test
  demo     start a local three-node cluster, make it diverge, repair it, show convergence
  bench    run the criterion benches (release build); extra args go to `cargo bench`
  mutants  mutation testing with cargo-mutants (installed when missing):
             cargo xtask mutants [--crate CRATE]... [--file GLOB]... [ARGS for cargo mutants]
           (default --output target/mutants, --timeout 300)
           e.g. `cargo xtask mutants --crate propd-repair --file crates/repair/src/server.rs`;
           results under target/mutants/mutants.out (see docs/testing.md)
  help     this text
";

/// Crates whose protocol cores must stay pure: with their default features, their normal
/// dependency tree holds none of [`FORBIDDEN_IN_PURE`].
const PURE_CRATES: &[&str] = &["propd-merkle", "propd-gossip", "propd-repair"];

/// What a pure crate must not link: the async runtime and the database.
const FORBIDDEN_IN_PURE: &[&str] = &["tokio", "redb"];

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let command = args.next().unwrap_or_else(|| "help".to_owned());
    let rest: Vec<String> = args.collect();
    let root = workspace_root();
    std::env::set_current_dir(&root).with_context(|| format!("entering {}", root.display()))?;
    match command.as_str() {
        "ci" => ci(),
        "bench" => bench(&rest),
        "demo" => demo::run(),
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
    for krate in PURE_CRATES {
        check_pure(krate)?;
    }
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
    if has_nextest() {
        // nextest does not run doctests.
        run(
            "cargo",
            &["test", "--workspace", "--all-features", "--locked", "--doc"],
        )?;
    }
    eprintln!("xtask ci: all checks passed");
    Ok(())
}

/// Proves a crate's boundary: no crate of [`FORBIDDEN_IN_PURE`] anywhere in its normal
/// dependency tree with default features. Fails when `cargo tree` fails, or lists nothing.
fn check_pure(krate: &str) -> Result<()> {
    let output = Command::new("cargo")
        .args([
            "tree", "--locked", "-p", krate, "-e", "normal", "--prefix", "none", "--format", "{p}",
        ])
        .output()
        .context("running cargo tree")?;
    if !output.status.success() {
        bail!(
            "cargo tree -p {krate} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // Each line is `name vX.Y.Z [(path)] [(*)]`.
    let stdout = String::from_utf8_lossy(&output.stdout);
    let names: BTreeSet<&str> = stdout
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    if !names.contains(krate) {
        bail!("cargo tree -p {krate} did not list {krate} itself:\n{stdout}");
    }
    let found: Vec<&str> = FORBIDDEN_IN_PURE
        .iter()
        .copied()
        .filter(|forbidden| names.contains(forbidden))
        .collect();
    if !found.is_empty() {
        bail!(
            "{krate} must not depend on {}, but its normal dependency tree has {}; \
             `cargo tree -p {krate} -e normal -i <crate>` shows the path",
            FORBIDDEN_IN_PURE.join(" or "),
            found.join(", ")
        );
    }
    eprintln!(
        "xtask ci: {krate} is free of {}",
        FORBIDDEN_IN_PURE.join(" and ")
    );
    Ok(())
}

fn bench(extra: &[String]) -> Result<()> {
    let mut command = cargo(&["bench", "--package", "propd-benches", "--locked"]);
    command.args(extra);
    status(command)
}

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
        eprintln!("xtask mutants: cargo-mutants is missing; installing it");
        run("cargo", &["install", "--locked", "cargo-mutants"])?;
    }
    let mut command = cargo(&["mutants", "--in-place"]);
    let mut rest = args.iter();
    let mut timeout_given = false;
    let mut output_given = false;
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--crate" => {
                let krate = rest.next().context("--crate needs a package name")?;
                command.args(["--package", krate]);
            }
            "--file" => {
                let file = rest.next().context("--file needs a path or glob")?;
                command.args(["--file", file]);
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
    status(command)
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
