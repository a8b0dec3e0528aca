//! The crate boundaries `cargo xtask ci` proves from `cargo tree`: the protocol cores link neither
//! the async runtime nor the database, and the dependency table of `docs/ARCHITECTURE.md` is the
//! workspace's real graph, edge for edge.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Crates whose protocol cores must stay pure: with their default features, their normal
/// dependency tree holds none of [`FORBIDDEN_IN_PURE`].
const PURE_CRATES: &[&str] = &["propd-merkle", "propd-gossip", "propd-repair"];

/// What a pure crate must not link: the async runtime and the database.
const FORBIDDEN_IN_PURE: &[&str] = &["tokio", "redb"];

/// Where the dependency table lives, relative to the workspace root.
const ARCHITECTURE: &str = "docs/ARCHITECTURE.md";

/// Prefix of the workspace's own library crates, the ones the table lists.
const OWN_PREFIX: &str = "propd-";

/// Runs every boundary check.
pub(crate) fn check_all(root: &Path) -> Result<()> {
    for krate in PURE_CRATES {
        check_pure(krate)?;
    }
    check_architecture_table(root)
}

/// The package names `cargo tree` lists for `krate` with `args` (the crate itself included).
/// Fails when `cargo tree` fails or does not list the crate itself.
fn tree_names(krate: &str, args: &[&str]) -> Result<BTreeSet<String>> {
    let output = Command::new("cargo")
        .args(["tree", "--locked", "-p", krate, "-e", "normal"])
        .args(["--prefix", "none", "--format", "{p}"])
        .args(args)
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
    let names: BTreeSet<String> = stdout
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    if !names.contains(krate) {
        bail!("cargo tree -p {krate} did not list {krate} itself:\n{stdout}");
    }
    Ok(names)
}

/// Proves a crate's boundary: no crate of [`FORBIDDEN_IN_PURE`] anywhere in its normal
/// dependency tree with default features.
fn check_pure(krate: &str) -> Result<()> {
    let names = tree_names(krate, &[])?;
    let found: Vec<&str> = FORBIDDEN_IN_PURE
        .iter()
        .copied()
        .filter(|forbidden| names.contains(*forbidden))
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

/// Proves that the table of `docs/ARCHITECTURE.md` lists every edge between the workspace's
/// crates (normal dependencies, every feature on) and no other.
fn check_architecture_table(root: &Path) -> Result<()> {
    let path = root.join(ARCHITECTURE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let table = parse_table(&text);
    if table.is_empty() {
        bail!("{ARCHITECTURE} has no dependency table (rows `| `propd-x` | `propd-y`, ... |`)");
    }
    let mut wrong = Vec::new();
    for (krate, documented) in &table {
        let actual: BTreeSet<String> = tree_names(krate, &["--depth", "1", "--all-features"])?
            .into_iter()
            .filter(|name| name.starts_with(OWN_PREFIX) && name != krate)
            .collect();
        if &actual != documented {
            wrong.push(format!(
                "{krate}: the table says {documented:?}, cargo tree says {actual:?}"
            ));
        }
    }
    if !wrong.is_empty() {
        bail!(
            "{ARCHITECTURE}'s dependency table differs from cargo tree:\n{}",
            wrong.join("\n")
        );
    }
    eprintln!(
        "xtask ci: {ARCHITECTURE} lists the {} crates' dependency edges as cargo tree does",
        table.len()
    );
    Ok(())
}

/// The rows `| `propd-a` | `propd-b`, `propd-c` |` (or `—` for none) of the dependency table.
fn parse_table(text: &str) -> Vec<(String, BTreeSet<String>)> {
    let own = |cell: &str| -> Vec<String> {
        cell.split(',')
            .map(|item| item.trim().trim_matches('`'))
            .filter(|item| item.starts_with(OWN_PREFIX))
            .map(str::to_owned)
            .collect()
    };
    text.lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line
                .trim()
                .strip_prefix('|')?
                .strip_suffix('|')?
                .split('|')
                .collect();
            let [krate, deps] = cells.as_slice() else {
                return None;
            };
            let [krate] = own(krate).try_into().ok()?;
            Some((krate, own(deps).into_iter().collect()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_parser_reads_crates_and_their_edges() {
        let text = "| crate | depends on |\n| --- | --- |\n| `propd-a` | — |\n\
                    | `propd-b` | `propd-a`, `propd-c` |\nprose | not a row\n";
        let table = parse_table(text);
        assert_eq!(
            table,
            vec![
                ("propd-a".to_owned(), BTreeSet::new()),
                (
                    "propd-b".to_owned(),
                    ["propd-a".to_owned(), "propd-c".to_owned()].into()
                ),
            ]
        );
    }
}
