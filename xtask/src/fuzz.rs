//! `cargo xtask fuzz`: run the cargo-fuzz targets of `tests/fuzz` for a few seconds each
//! (docs/reliability.md, "Fuzzing"). Needs the nightly toolchain; installs cargo-fuzz when it is
//! missing; skips with a printed reason where either cannot be had.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Every target, in the order they run.
pub(crate) const TARGETS: &[&str] = &[
    "snapshot_decode",
    "property_decode",
    "repair_server",
    "repair_client",
    "bulk_sync",
    "gossip_admission",
];

const USAGE: &str = "\
cargo xtask fuzz [--seconds S] [TARGET...]

  Runs each fuzz target (all of them by default) for S seconds (default 30), one after the
  other, starting from the committed corpus (tests/fuzz/corpus/TARGET). New inputs go to
  tests/fuzz/target/corpus/TARGET, crashes to tests/fuzz/artifacts/TARGET.
  Needs the nightly toolchain (skipped with a message without it); installs cargo-fuzz when
  it is missing (skipped with a message if that fails or takes too long).

targets: snapshot_decode property_decode repair_server repair_client bulk_sync gossip_admission
";

/// How long installing cargo-fuzz may take before the run is skipped.
const INSTALL_LIMIT: Duration = Duration::from_secs(15 * 60);

const FUZZ_DIR: &str = "tests/fuzz";
const FUZZ_TARGET_DIR: &str = "tests/fuzz/target";

pub(crate) fn run(root: &Path, args: &[String]) -> Result<()> {
    let mut seconds: u64 = 30;
    let mut targets: Vec<String> = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--help" | "-h" => {
                print!("{USAGE}");
                return Ok(());
            }
            "--seconds" => {
                seconds = args
                    .next()
                    .with_context(|| format!("--seconds needs a value\n\n{USAGE}"))?
                    .parse()
                    .context("--seconds takes a whole number of seconds")?;
                if seconds == 0 {
                    bail!("--seconds must be at least 1");
                }
            }
            flag if flag.starts_with('-') => bail!("unknown argument `{flag}`\n\n{USAGE}"),
            target if TARGETS.contains(&target) => targets.push(target.to_owned()),
            other => bail!("unknown fuzz target `{other}`\n\n{USAGE}"),
        }
    }
    if targets.is_empty() {
        targets = TARGETS.iter().map(|t| (*t).to_owned()).collect();
    }

    if !succeeds(Command::new("cargo").args(["+nightly", "--version"])) {
        println!("xtask fuzz: skipped: the nightly toolchain is not installed");
        return Ok(());
    }
    if !has_cargo_fuzz() {
        eprintln!("xtask fuzz: cargo-fuzz is missing; installing it (at most {INSTALL_LIMIT:?})");
        if let Err(error) = install_cargo_fuzz() {
            println!("xtask fuzz: skipped: cargo-fuzz could not be installed: {error:#}");
            return Ok(());
        }
    }

    let started = Instant::now();
    let mut build = fuzz_command(root, "build");
    if let [only] = targets.as_slice() {
        build.arg(only);
    }
    crate::status(build)?;
    for target in &targets {
        let work = root.join(FUZZ_TARGET_DIR).join("corpus").join(target);
        std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        let committed = root.join(FUZZ_DIR).join("corpus").join(target);
        let mut command = fuzz_command(root, "run");
        command.arg(target).arg(&work);
        if committed.is_dir() {
            command.arg(&committed);
        }
        command.args([
            "--",
            &format!("-max_total_time={seconds}"),
            "-rss_limit_mb=2048",
            "-timeout=30",
            "-print_final_stats=1",
        ]);
        crate::status(command).with_context(|| format!("fuzz target {target} failed"))?;
    }
    println!(
        "xtask fuzz: {} target(s), {seconds} s each, no crash ({:.0} s in all)",
        targets.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `cargo +nightly fuzz SUBCOMMAND --fuzz-dir tests/fuzz`, building into the fuzz crate's own
/// target dir whatever `CARGO_TARGET_DIR` says (its builds are nightly and instrumented).
fn fuzz_command(root: &Path, subcommand: &str) -> Command {
    let mut command = Command::new("cargo");
    command
        .current_dir(root)
        .env_remove("CARGO_TARGET_DIR")
        .args(["+nightly", "fuzz", subcommand, "--fuzz-dir", FUZZ_DIR]);
    command
}

fn has_cargo_fuzz() -> bool {
    succeeds(Command::new("cargo").args(["+nightly", "fuzz", "--version"]))
}

fn succeeds(command: &mut Command) -> bool {
    command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// `cargo install cargo-fuzz --locked`, killed after [`INSTALL_LIMIT`].
fn install_cargo_fuzz() -> Result<()> {
    let mut child = Command::new("cargo")
        .args(["install", "cargo-fuzz", "--locked"])
        .spawn()
        .context("spawning cargo install")?;
    let deadline = Instant::now() + INSTALL_LIMIT;
    loop {
        if let Some(status) = child.try_wait().context("waiting for cargo install")? {
            if !status.success() {
                bail!("cargo install cargo-fuzz failed with {status}");
            }
            if !has_cargo_fuzz() {
                bail!("cargo-fuzz was installed but `cargo fuzz` does not run");
            }
            return Ok(());
        }
        if Instant::now() >= deadline {
            // The child is ours; a failed kill means it has just ended.
            let _ = child.kill();
            let _ = child.wait();
            bail!("cargo install cargo-fuzz took longer than {INSTALL_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
