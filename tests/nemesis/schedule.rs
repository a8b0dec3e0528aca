//! The nemesis's schedule: which fault, where and when, drawn from the seed alone (the same
//! seed, node count, length and fault kinds give the same schedule). Pure.
//!
//! Process faults (kill, pause, skew, corrupt) never touch more than a minority of the nodes at
//! once, so that a majority can keep acknowledging writes; network faults never overlap each
//! other, so that healing one never undoes another.

use std::fmt;
use std::time::Duration;

use super::rng::Rng;

/// A kind of fault, as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// SIGKILL a node, restart it later.
    Kill,
    /// SIGSTOP a node, SIGCONT it later.
    Pause,
    /// Partition a side of the cluster from the rest, in one or both directions.
    Partition,
    /// Close every open connection to and from a node, mid-stream (syncs included).
    Cut,
    /// Delay (with jitter) the traffic to and from a node.
    Delay,
    /// Limit the rate of the traffic to and from a node.
    Bandwidth,
    /// Close new connections to a node as soon as they are accepted.
    Refuse,
    /// Restart a node with its wall clock skewed (libfaketime).
    Skew,
    /// Stop a node, flip bytes in its data file, restart it.
    Corrupt,
    /// Fill the small tmpfs holding a node's data directory, free it later.
    DiskFull,
}

impl FaultKind {
    /// Every kind.
    pub const ALL: [FaultKind; 10] = [
        FaultKind::Kill,
        FaultKind::Pause,
        FaultKind::Partition,
        FaultKind::Cut,
        FaultKind::Delay,
        FaultKind::Bandwidth,
        FaultKind::Refuse,
        FaultKind::Skew,
        FaultKind::Corrupt,
        FaultKind::DiskFull,
    ];

    /// Its command-line name.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Pause => "pause",
            FaultKind::Partition => "partition",
            FaultKind::Cut => "cut",
            FaultKind::Delay => "delay",
            FaultKind::Bandwidth => "bandwidth",
            FaultKind::Refuse => "refuse",
            FaultKind::Skew => "skew",
            FaultKind::Corrupt => "corrupt",
            FaultKind::DiskFull => "disk-full",
        }
    }

    /// Whether it acts on one node (its process or its disk) rather than on the network.
    pub fn is_process(self) -> bool {
        matches!(
            self,
            FaultKind::Kill
                | FaultKind::Pause
                | FaultKind::Skew
                | FaultKind::Corrupt
                | FaultKind::DiskFull
        )
    }

    /// Parses `all` or a comma-separated list of names.
    pub fn parse_list(text: &str) -> Result<Vec<FaultKind>, String> {
        if text.trim() == "all" {
            return Ok(Self::ALL.to_vec());
        }
        let mut kinds = Vec::new();
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let kind = Self::ALL
                .into_iter()
                .find(|k| k.name() == name)
                .ok_or_else(|| {
                    let known: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
                    format!("unknown fault `{name}` (known: all, {})", known.join(", "))
                })?;
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        if kinds.is_empty() {
            return Err("no fault kind given".to_owned());
        }
        Ok(kinds)
    }
}

/// Which way a partition blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Neither way.
    Both,
    /// The side cannot send to the rest (the rest can send to it).
    FromSide,
    /// The rest cannot send to the side.
    ToSide,
}

/// How a partition looks to a dialer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Bytes are held: calls hang until the heal (a black hole, like dropped packets).
    Blackhole,
    /// Open connections are cut and new ones closed at once (like a rejecting firewall).
    Reject,
}

/// One fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL `node`; restart it at the end.
    Kill {
        /// Node index.
        node: usize,
    },
    /// SIGSTOP `node`; SIGCONT it at the end.
    Pause {
        /// Node index.
        node: usize,
    },
    /// Cut `side` off from the other nodes (clients still reach every node).
    Partition {
        /// Node indexes of the side (a minority).
        side: Vec<usize>,
        /// Which way.
        direction: Direction,
        /// How.
        style: Style,
    },
    /// Close every open connection to and from `node` (an instant fault).
    Cut {
        /// Node index.
        node: usize,
    },
    /// Delay the traffic to and from `node`.
    Delay {
        /// Node index.
        node: usize,
        /// Fixed delay.
        delay: Duration,
        /// Extra random delay, at most this.
        jitter: Duration,
    },
    /// Limit the traffic to and from `node`.
    Bandwidth {
        /// Node index.
        node: usize,
        /// Bytes per second, each direction of each connection.
        bytes_per_second: u64,
    },
    /// Close new connections to `node` at once.
    Refuse {
        /// Node index.
        node: usize,
    },
    /// Restart `node` with its wall clock moved by `offset_s` seconds; restart it normally at
    /// the end.
    Skew {
        /// Node index.
        node: usize,
        /// Seconds (non-zero, either sign).
        offset_s: i64,
    },
    /// Stop `node` cleanly (SIGTERM), change `bytes` bytes of its data file, restart it at the
    /// end.
    Corrupt {
        /// Node index.
        node: usize,
        /// How many bytes.
        bytes: u32,
        /// Aim at stored values (else anywhere in the file).
        in_values: bool,
    },
    /// Fill the tmpfs of `node`'s data directory; free it at the end.
    DiskFull {
        /// Node index.
        node: usize,
    },
}

impl Fault {
    /// Its kind.
    pub fn kind(&self) -> FaultKind {
        match self {
            Fault::Kill { .. } => FaultKind::Kill,
            Fault::Pause { .. } => FaultKind::Pause,
            Fault::Partition { .. } => FaultKind::Partition,
            Fault::Cut { .. } => FaultKind::Cut,
            Fault::Delay { .. } => FaultKind::Delay,
            Fault::Bandwidth { .. } => FaultKind::Bandwidth,
            Fault::Refuse { .. } => FaultKind::Refuse,
            Fault::Skew { .. } => FaultKind::Skew,
            Fault::Corrupt { .. } => FaultKind::Corrupt,
            Fault::DiskFull { .. } => FaultKind::DiskFull,
        }
    }
}

fn names(nodes: &[usize]) -> String {
    let names: Vec<String> = nodes.iter().map(|n| format!("n{}", n + 1)).collect();
    names.join("+")
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Kill { node } => write!(f, "kill n{}", node + 1),
            Fault::Pause { node } => write!(f, "pause n{}", node + 1),
            Fault::Partition {
                side,
                direction,
                style,
            } => write!(f, "partition {} ({direction:?}, {style:?})", names(side)),
            Fault::Cut { node } => write!(f, "cut connections of n{}", node + 1),
            Fault::Delay {
                node,
                delay,
                jitter,
            } => write!(f, "delay n{} by {delay:?} + up to {jitter:?}", node + 1),
            Fault::Bandwidth {
                node,
                bytes_per_second,
            } => write!(f, "limit n{} to {bytes_per_second} B/s", node + 1),
            Fault::Refuse { node } => write!(f, "refuse new connections to n{}", node + 1),
            Fault::Skew { node, offset_s } => {
                write!(f, "skew the clock of n{} by {offset_s:+} s", node + 1)
            }
            Fault::Corrupt {
                node,
                bytes,
                in_values,
            } => {
                let place = if *in_values {
                    "stored values"
                } else {
                    "random places"
                };
                write!(
                    f,
                    "change {bytes} bytes ({place}) in the data file of n{}",
                    node + 1
                )
            }
            Fault::DiskFull { node } => write!(f, "fill the disk of n{}", node + 1),
        }
    }
}

/// One scheduled fault: it starts `at` after the run began and is healed `lasts` later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Start, from the run's start.
    pub at: Duration,
    /// How long until it is healed (zero for an instant fault).
    pub lasts: Duration,
    /// What.
    pub fault: Fault,
}

/// The schedule of a run of `length` over `nodes` nodes with these kinds (non-empty).
pub fn schedule(seed: u64, nodes: usize, length: Duration, kinds: &[FaultKind]) -> Vec<Step> {
    assert!(nodes >= 1 && !kinds.is_empty());
    let mut rng = Rng::stream(seed, 0x5C4E_D01E);
    let max_process = ((nodes - 1) / 2).max(1).min(nodes - 1);
    let network_kinds: Vec<FaultKind> = kinds.iter().copied().filter(|k| !k.is_process()).collect();
    let mut process_busy = vec![Duration::ZERO; nodes];
    let mut network_busy = Duration::ZERO;
    let mut steps = Vec::new();
    let mut t = Duration::from_secs(2);
    let end = length.saturating_sub(Duration::from_secs(1));
    while t < end {
        let mut kind = *rng.pick(kinds);
        let lasts = Duration::from_millis(rng.between(1_000, 6_000)).min(end - t);
        let free: Vec<usize> = (0..nodes).filter(|&n| process_busy[n] <= t).collect();
        let busy = nodes - free.len();
        if kind.is_process() && (busy >= max_process || nodes == 1) {
            match network_kinds.first() {
                Some(_) => kind = *rng.pick(&network_kinds),
                None => {
                    t += Duration::from_millis(rng.between(500, 3_000));
                    continue;
                }
            }
        }
        if !kind.is_process() && (network_busy > t || nodes == 1) {
            t += Duration::from_millis(rng.between(500, 3_000));
            continue;
        }
        let fault = if kind.is_process() {
            let node = *rng.pick(&free);
            process_busy[node] = t + lasts;
            match kind {
                FaultKind::Kill => Fault::Kill { node },
                FaultKind::Pause => Fault::Pause { node },
                FaultKind::Skew => {
                    let magnitude = rng.between(1, 3) as i64;
                    Fault::Skew {
                        node,
                        offset_s: if rng.chance(50) {
                            magnitude
                        } else {
                            -magnitude
                        },
                    }
                }
                FaultKind::Corrupt => Fault::Corrupt {
                    node,
                    bytes: rng.between(1, 8) as u32,
                    in_values: rng.chance(50),
                },
                _ => Fault::DiskFull { node },
            }
        } else {
            network_busy = t + lasts;
            let node = rng.below(nodes as u64) as usize;
            match kind {
                FaultKind::Partition => {
                    let size = rng.between(1, (nodes / 2).max(1) as u64) as usize;
                    let mut all: Vec<usize> = (0..nodes).collect();
                    let mut side = Vec::new();
                    for _ in 0..size {
                        side.push(all.remove(rng.below(all.len() as u64) as usize));
                    }
                    side.sort_unstable();
                    let direction =
                        *rng.pick(&[Direction::Both, Direction::FromSide, Direction::ToSide]);
                    let style = *rng.pick(&[Style::Blackhole, Style::Reject]);
                    Fault::Partition {
                        side,
                        direction,
                        style,
                    }
                }
                FaultKind::Cut => Fault::Cut { node },
                FaultKind::Delay => Fault::Delay {
                    node,
                    delay: Duration::from_millis(rng.between(5, 200)),
                    jitter: Duration::from_millis(rng.between(0, 100)),
                },
                FaultKind::Bandwidth => Fault::Bandwidth {
                    node,
                    bytes_per_second: rng.between(2_000, 200_000),
                },
                _ => Fault::Refuse { node },
            }
        };
        let lasts = if matches!(fault, Fault::Cut { .. }) {
            Duration::ZERO
        } else {
            lasts
        };
        steps.push(Step {
            at: t,
            lasts,
            fault,
        });
        t += Duration::from_millis(rng.between(500, 3_000));
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn the_same_inputs_give_the_same_schedule() {
        let a = schedule(7, 3, MINUTE, &FaultKind::ALL);
        let b = schedule(7, 3, MINUTE, &FaultKind::ALL);
        assert_eq!(a, b);
        assert!(a.len() >= 10, "a minute holds many faults: {}", a.len());
        assert_ne!(a, schedule(8, 3, MINUTE, &FaultKind::ALL));
    }

    #[test]
    fn only_the_chosen_kinds_are_drawn_and_each_of_them_is() {
        let kinds = [FaultKind::Kill, FaultKind::Cut];
        let steps = schedule(1, 3, 5 * MINUTE, &kinds);
        for kind in kinds {
            assert!(steps.iter().any(|s| s.fault.kind() == kind), "{kind:?}");
        }
        assert!(steps.iter().all(|s| kinds.contains(&s.fault.kind())));
        let all = schedule(2, 5, 10 * MINUTE, &FaultKind::ALL);
        for kind in FaultKind::ALL {
            assert!(all.iter().any(|s| s.fault.kind() == kind), "{kind:?}");
        }
    }

    fn process_node(fault: &Fault) -> Option<usize> {
        match fault {
            Fault::Kill { node }
            | Fault::Pause { node }
            | Fault::Skew { node, .. }
            | Fault::Corrupt { node, .. }
            | Fault::DiskFull { node } => Some(*node),
            _ => None,
        }
    }

    #[test]
    fn process_faults_hit_a_minority_and_network_faults_never_overlap() {
        for (seed, nodes) in [(3, 3), (4, 5), (5, 3)] {
            let steps = schedule(seed, nodes, 10 * MINUTE, &FaultKind::ALL);
            let minority = (nodes - 1) / 2;
            for step in &steps {
                assert!(step.at + step.lasts <= 10 * MINUTE);
                let at = step.at;
                let down: Vec<usize> = steps
                    .iter()
                    .filter(|s| s.at <= at && at < s.at + s.lasts)
                    .filter_map(|s| process_node(&s.fault))
                    .collect();
                let mut distinct = down.clone();
                distinct.sort_unstable();
                distinct.dedup();
                assert_eq!(distinct.len(), down.len(), "a node hit twice at {at:?}");
                assert!(down.len() <= minority, "{down:?} at {at:?}");
                let network = steps
                    .iter()
                    .filter(|s| !s.fault.kind().is_process())
                    .filter(|s| s.at <= at && at < s.at + s.lasts)
                    .count();
                assert!(network <= 1, "{network} network faults at {at:?}");
                if let Fault::Partition { side, .. } = &step.fault {
                    assert!(!side.is_empty() && side.len() <= nodes / 2);
                }
            }
        }
    }

    #[test]
    fn fault_lists_parse_and_unknown_names_are_named() {
        assert_eq!(
            FaultKind::parse_list("kill, cut,kill").unwrap(),
            [FaultKind::Kill, FaultKind::Cut]
        );
        assert_eq!(FaultKind::parse_list("all").unwrap(), FaultKind::ALL);
        let error = FaultKind::parse_list("kill,flood").unwrap_err();
        assert!(error.contains("`flood`"), "{error}");
        assert!(FaultKind::parse_list("").is_err());
    }
}
