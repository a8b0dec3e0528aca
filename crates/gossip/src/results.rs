//! The origin's bounded store of recent results, read by message id (the admin API's view).

use std::collections::VecDeque;

use crate::types::{MessageId, PropagationResult};

/// The most recent results of rounds this node started, oldest dropped first.
#[derive(Clone, Debug)]
pub struct RecentResults {
    capacity: usize,
    results: VecDeque<PropagationResult>,
}

impl RecentResults {
    /// A store keeping at most `capacity` results (at least one).
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        RecentResults {
            capacity,
            results: VecDeque::with_capacity(capacity),
        }
    }

    /// Keeps `result`, dropping the oldest when full. A result for a message id already kept
    /// replaces the old one.
    pub fn insert(&mut self, result: PropagationResult) {
        let id = &result.context.message_id;
        self.results.retain(|r| &r.context.message_id != id);
        if self.results.len() == self.capacity {
            self.results.pop_front();
        }
        self.results.push_back(result);
    }

    /// The result of round `message_id`, if it is still kept.
    #[must_use]
    pub fn get(&self, message_id: &MessageId) -> Option<&PropagationResult> {
        self.results
            .iter()
            .find(|r| &r.context.message_id == message_id)
    }

    /// The kept results, newest last.
    pub fn iter(&self) -> impl Iterator<Item = &PropagationResult> {
        self.results.iter()
    }

    /// How many results are kept.
    #[must_use]
    pub fn len(&self) -> usize {
        self.results.len()
    }

    /// Whether no result is kept.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.results.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Context, Millis, Outcome, ShardKey};

    fn result(id: &str) -> PropagationResult {
        PropagationResult {
            context: Context {
                nodes: vec!["a".into(), "b".into()],
                max_count: 1,
                count: 1,
                origin: "a".into(),
                message_id: MessageId(id.into()),
                key: ShardKey {
                    group: "g".into(),
                    shard: 0,
                },
                started_at: Millis(0),
                preview: false,
            },
            outcome: Outcome::Completed,
            error: None,
            trace: Vec::new(),
            reported_by: "b".into(),
        }
    }

    #[test]
    fn empty_until_a_result_is_kept() {
        let mut store = RecentResults::new(2);
        assert!(store.is_empty());
        store.insert(result("1"));
        assert!(!store.is_empty());
    }

    #[test]
    fn keeps_the_newest_up_to_capacity() {
        let mut store = RecentResults::new(2);
        for id in ["1", "2", "3"] {
            store.insert(result(id));
        }
        assert_eq!(store.len(), 2);
        assert!(store.get(&MessageId("1".into())).is_none());
        assert!(store.get(&MessageId("3".into())).is_some());
        store.insert(result("2"));
        let ids: Vec<&str> = store
            .iter()
            .map(|r| r.context.message_id.0.as_str())
            .collect();
        assert_eq!(ids, ["3", "2"]);
    }
}
