//! System tools the build and the tests need, installed when missing by the project's own
//! scripts (`.ci/install-*`, Debian packages), as `.ci/run` does on a fresh machine.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The protobuf include every `protoc` install brings along (etcd's `.proto` files import it).
const PROTOBUF_INCLUDE: &str = "/usr/include/google/protobuf/descriptor.proto";

/// Whether `program` is on the PATH.
fn on_path(program: &str) -> bool {
    Command::new("which")
        .arg(program)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether `protoc` and the protobuf includes are present. `PROTOC` (the variable prost-build
/// reads) counts when it names a file.
pub(crate) fn has_protoc() -> bool {
    let named = std::env::var_os("PROTOC").is_some_and(|p| Path::new(&p).is_file());
    (named || on_path("protoc")) && Path::new(PROTOBUF_INCLUDE).is_file()
}

/// Makes sure `protoc` is there before anything is built: the etcd-client crate compiles etcd's
/// `.proto` files with it in its build script, so no crate of the node builds without it. Runs
/// `.ci/install-protoc` (Debian's protobuf-compiler and libprotobuf-dev) when it is missing;
/// a failure names what to install.
pub(crate) fn ensure_protoc() -> Result<()> {
    if has_protoc() {
        return Ok(());
    }
    eprintln!(
        "xtask: protoc is missing (the etcd client's build needs it); running .ci/install-protoc"
    );
    let status = Command::new("bash")
        .arg(".ci/install-protoc")
        .status()
        .context("running .ci/install-protoc")?;
    if !status.success() || !has_protoc() {
        bail!(
            ".ci/install-protoc failed ({status}): install protoc and the protobuf includes by hand (Debian: protobuf-compiler libprotobuf-dev)"
        );
    }
    Ok(())
}

/// Makes sure an `etcd` is on the PATH (`.ci/install-etcd`, Debian's etcd-server). With
/// `required` false a failure is reported and the caller goes on (the membership tests then
/// say SKIPPED).
pub(crate) fn ensure_etcd(required: bool) -> Result<()> {
    if on_path("etcd") {
        return Ok(());
    }
    eprintln!("xtask: etcd is missing; running .ci/install-etcd");
    let status = Command::new("bash")
        .arg(".ci/install-etcd")
        .status()
        .context("running .ci/install-etcd")?;
    if status.success() && on_path("etcd") {
        return Ok(());
    }
    if required {
        bail!(".ci/install-etcd failed ({status}): install etcd by hand (Debian: etcd-server)");
    }
    eprintln!("xtask: etcd could not be installed ({status}): the membership tests will skip");
    Ok(())
}
