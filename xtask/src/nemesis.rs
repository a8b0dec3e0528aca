//! `cargo xtask nemesis`: build propd and the nemesis harness, then run one seeded nemesis run
//! (docs/reliability.md).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

const USAGE: &str = "\
cargo xtask nemesis [--nodes N] [--seconds S] [--seed X] [--faults LIST] [--debug]
                    [--no-build] [--clients C] [--entities E] [--rss-limit-mib M] [--out DIR]

  --faults  `all` (default) or a list of:
            kill,pause,partition,cut,delay,bandwidth,refuse,skew,corrupt,disk-full
  --debug   use a debug build instead of the release build (faster to build, slower to run)
  --no-build  run the binaries already built (`cargo xtask ci` runs the ones its test suite built)
  --out     where the logs, configs, data and history go (default target/nemesis/seed-X-TIME)
";

/// Where Debian's `faketime` package puts the library.
const LIBFAKETIME: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
];

pub(crate) fn run(root: &Path, args: &[String]) -> Result<()> {
    let mut debug = false;
    let mut build_first = true;
    let mut seed = None;
    let mut out = None;
    let mut faults = "all".to_owned();
    let mut pass = Vec::new();
    let mut args = args.iter();
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--debug" => debug = true,
            "--no-build" => build_first = false,
            "--help" | "-h" => {
                print!("{USAGE}");
                return Ok(());
            }
            "--seed" | "--out" | "--faults" | "--nodes" | "--seconds" | "--clients"
            | "--entities" | "--rss-limit-mib" => {
                let value = args
                    .next()
                    .with_context(|| format!("{flag} needs a value\n\n{USAGE}"))?
                    .clone();
                match flag.as_str() {
                    "--seed" => {
                        seed = Some(value.parse::<u64>().context("--seed takes a number")?);
                    }
                    "--out" => out = Some(PathBuf::from(value)),
                    "--faults" => faults = value,
                    _ => pass.extend([flag.clone(), value]),
                }
            }
            other => bail!("unknown argument `{other}`\n\n{USAGE}"),
        }
    }
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs())
    });
    if faults == "all" || faults.split(',').any(|f| f.trim() == "skew") {
        ensure_faketime();
    }

    let mut build = crate::cargo(&[
        "build",
        "--locked",
        "-p",
        "propd-node",
        "--bin",
        "propd",
        "-p",
        "propd-tests",
        "--bin",
        "nemesis",
    ]);
    if !debug {
        build.arg("--release");
    }
    if build_first {
        crate::status(build)?;
    }

    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map_or_else(|| root.join("target"), |dir| root.join(dir));
    let bin = target.join(if debug { "debug" } else { "release" });
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let out = out.unwrap_or_else(|| target.join("nemesis").join(format!("seed-{seed}-{stamp}")));
    if !build_first {
        for name in ["propd", "nemesis"] {
            if !bin.join(name).exists() {
                bail!(
                    "--no-build: {} is not built (build it, or leave --no-build out)",
                    bin.join(name).display()
                );
            }
        }
    }
    let mut nemesis = Command::new(bin.join("nemesis"));
    nemesis
        .arg("--propd")
        .arg(bin.join("propd"))
        .arg("--out")
        .arg(&out)
        .args(["--seed", &seed.to_string(), "--faults", &faults])
        .args(&pass);
    eprintln!("xtask: {nemesis:?}");
    let status = nemesis
        .status()
        .with_context(|| format!("spawning {}", bin.join("nemesis").display()))?;
    if !status.success() {
        bail!(
            "the nemesis run with seed {seed} failed ({status}); logs in {}",
            out.display()
        );
    }
    Ok(())
}

/// Installs Debian's `faketime` when the library is missing and this is a Debian-like system
/// where we may (root, apt-get present); otherwise says why clock skew will be skipped.
fn ensure_faketime() {
    if LIBFAKETIME.iter().any(|p| Path::new(p).exists())
        || std::env::var_os("PROPD_LIBFAKETIME").is_some()
    {
        return;
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let apt = Path::new("/usr/bin/apt-get").exists();
    if !root || !apt {
        eprintln!(
            "xtask nemesis: libfaketime is missing and cannot be installed here (needs root and apt-get); clock skew will be skipped"
        );
        return;
    }
    eprintln!(
        "xtask nemesis: installing Debian's faketime for clock skew (apt-get install -y faketime)"
    );
    let installed = Command::new("apt-get")
        .args(["install", "-y", "-q", "faketime"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        eprintln!("xtask nemesis: installing faketime failed; clock skew will be skipped");
    }
}
