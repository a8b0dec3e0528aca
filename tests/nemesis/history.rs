//! The history of a run: every client operation with its outcome, as the clients saw it.

use std::fmt;
use std::sync::Mutex;

/// Unix nanoseconds.
pub type Nanos = i64;

/// A version of an entity as a copy stores it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    /// Its revision.
    pub revision: i64,
    /// The written value; `None` for a tombstone.
    pub value: Option<String>,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(value) => write!(f, "{value}@{}", self.revision),
            None => write!(f, "tombstone@{}", self.revision),
        }
    }
}

/// What a client asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Write this value (unique in the run).
    Put {
        /// The value.
        value: String,
    },
    /// Delete the entity.
    Delete,
    /// Read the entity (coordinated, without tombstones).
    Get,
}

/// How an operation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A put or delete acknowledged, written with this revision.
    Written {
        /// The revision the coordinator answered.
        revision: i64,
    },
    /// A get answered: the live version found, or none.
    Read {
        /// What it returned.
        found: Option<Version>,
    },
    /// Refused before anything was written (an invalid request): it took no effect.
    Failed {
        /// The error.
        error: String,
    },
    /// No answer, or an error after which a write may or may not have taken effect.
    Indeterminate {
        /// The error.
        error: String,
    },
}

/// One client operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// The client that made it.
    pub client: usize,
    /// The node it was sent to (index).
    pub coordinator: usize,
    /// `group/name/id`.
    pub entity: String,
    /// What was asked.
    pub request: Request,
    /// How it ended.
    pub outcome: Outcome,
    /// When it was sent.
    pub start: Nanos,
    /// When its outcome was known.
    pub end: Nanos,
}

impl Op {
    /// Whether this is a put or a delete.
    pub fn is_write(&self) -> bool {
        !matches!(self.request, Request::Get)
    }

    /// One line, times relative to `t0`.
    pub fn describe(&self, t0: Nanos) -> String {
        let secs = |t: Nanos| (t - t0) as f64 / 1e9;
        let request = match &self.request {
            Request::Put { value } => format!("put {value}"),
            Request::Delete => "delete".to_owned(),
            Request::Get => "get".to_owned(),
        };
        let outcome = match &self.outcome {
            Outcome::Written { revision } => format!("ok revision {revision}"),
            Outcome::Read { found: Some(v) } => format!("read {v}"),
            Outcome::Read { found: None } => "read not found".to_owned(),
            Outcome::Failed { error } => format!("FAILED {error}"),
            Outcome::Indeterminate { error } => format!("INDETERMINATE {error}"),
        };
        format!(
            "[{:>9.3}s .. {:>9.3}s] client {} via n{}: {request} -> {outcome}",
            secs(self.start),
            secs(self.end),
            self.client,
            self.coordinator + 1,
        )
    }
}

/// The history of a run, shared by the clients.
#[derive(Debug, Default)]
pub struct History {
    ops: Mutex<Vec<Op>>,
}

impl History {
    /// Records a finished operation.
    pub fn record(&self, op: Op) {
        self.ops.lock().expect("history lock poisoned").push(op);
    }

    /// Every operation, ordered by start time.
    pub fn ops(&self) -> Vec<Op> {
        let mut ops = self.ops.lock().expect("history lock poisoned").clone();
        ops.sort_by_key(|op| (op.start, op.client));
        ops
    }
}

/// Unix nanoseconds now.
pub fn now_nanos() -> Nanos {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as Nanos)
}
