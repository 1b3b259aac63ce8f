//! A service's history, made cheap to copy and to save.
//!
//! Every accepted change copies the service's state (the pure `apply` works
//! on a copy) and saves the whole state file, and a service keeps
//! [`HISTORY_LIMIT`] entries. Held as plain values, the entries were
//! copied twice and written out as JSON again on every change: ~0.9 ms of
//! CPU per change once the history was full, most of it on these 500
//! entries that did not change. So an entry is shared (`Arc`: copying a
//! history copies pointers), and its JSON is made the first time it is
//! saved and reused by every later save. The file's content is the same
//! as before, except that each entry is on one line.

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};

use serde::de::Deserializer;
use serde::ser::{Error as _, SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{HistoryEntry, HISTORY_LIMIT};

/// The last [`HISTORY_LIMIT`] changes of a service, oldest first.
#[derive(Debug, Clone, Default)]
pub(crate) struct History {
    entries: VecDeque<Arc<Recorded>>,
}

/// One entry and, once it was saved, its JSON.
#[derive(Debug)]
struct Recorded {
    entry: HistoryEntry,
    json: OnceLock<Box<RawValue>>,
}

impl History {
    /// Appends `entry`, dropping the oldest beyond [`HISTORY_LIMIT`].
    pub(crate) fn push(&mut self, entry: HistoryEntry) {
        self.entries.push_back(Arc::new(Recorded {
            entry,
            json: OnceLock::new(),
        }));
        while self.entries.len() > HISTORY_LIMIT {
            self.entries.pop_front();
        }
    }

    /// Oldest first.
    pub(crate) fn iter(&self) -> impl DoubleEndedIterator<Item = &HistoryEntry> + '_ {
        self.entries.iter().map(|r| &r.entry)
    }

    /// The newest entry.
    pub(crate) fn back(&self) -> Option<&HistoryEntry> {
        self.entries.back().map(|r| &r.entry)
    }

    /// The oldest entry.
    pub(crate) fn front(&self) -> Option<&HistoryEntry> {
        self.entries.front().map(|r| &r.entry)
    }

    /// How many entries.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// No entries?
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl PartialEq for History {
    fn eq(&self, other: &History) -> bool {
        self.entries.len() == other.entries.len()
            && self
                .entries
                .iter()
                .zip(&other.entries)
                .all(|(a, b)| Arc::ptr_eq(a, b) || a.entry == b.entry)
    }
}

impl FromIterator<HistoryEntry> for History {
    fn from_iter<I: IntoIterator<Item = HistoryEntry>>(iter: I) -> History {
        let mut h = History::default();
        for e in iter {
            h.push(e);
        }
        h
    }
}

impl Serialize for History {
    /// A JSON array of the entries, each entry's text made once and reused.
    /// JSON only (state files, etcd values, API bodies: every serializer
    /// switchyard uses); `serde_json::to_value` works too.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.entries.len()))?;
        for r in &self.entries {
            let json = match r.json.get() {
                Some(j) => j,
                None => {
                    let made =
                        serde_json::value::to_raw_value(&r.entry).map_err(S::Error::custom)?;
                    r.json.get_or_init(|| made)
                }
            };
            seq.serialize_element(&**json)?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for History {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<History, D::Error> {
        let entries = Vec::<HistoryEntry>::deserialize(deserializer)?;
        Ok(entries.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control_plane::state::Action;
    use crate::weights::Weights;

    fn entry(generation: u64, reason: &str) -> HistoryEntry {
        HistoryEntry {
            generation,
            at: "2026-12-02T12:00:00Z".into(),
            action: Action::Split,
            from: Weights::full(crate::color::Color::Blue),
            to: Weights::full(crate::color::Color::Green),
            reason: Some(reason.into()),
            actor: "ci".into(),
            pool: None,
            rules: None,
            mirror: None,
        }
    }

    /// The saved text is what serialising the entries one by one gives,
    /// before and after the cache is filled, and it reads back equal.
    #[test]
    fn saved_text_is_the_entries_and_reads_back() {
        let h: History = (1..=3).map(|g| entry(g, "a \"quoted\" reason\n")).collect();
        let plain: Vec<&HistoryEntry> = h.iter().collect();
        let expected = serde_json::to_string(&plain).expect("plain");
        assert_eq!(serde_json::to_string(&h).expect("first"), expected);
        assert_eq!(serde_json::to_string(&h).expect("cached"), expected);
        let pretty = serde_json::to_string_pretty(&h).expect("pretty");
        let back: History = serde_json::from_str(&pretty).expect("read back");
        assert_eq!(back, h);
        assert_eq!(
            serde_json::to_value(&h).expect("value"),
            serde_json::to_value(&plain).expect("value")
        );
    }

    /// A copy shares the entries; pushing past the limit drops the oldest.
    #[test]
    fn copies_share_entries_and_the_limit_holds() {
        let mut h = History::default();
        for g in 1..=(HISTORY_LIMIT as u64 + 2) {
            h.push(entry(g, "r"));
        }
        assert_eq!(h.len(), HISTORY_LIMIT);
        assert_eq!(h.front().map(|e| e.generation), Some(3));
        let mut copy = h.clone();
        assert!(Arc::ptr_eq(&h.entries[0], &copy.entries[0]));
        assert_eq!(copy, h);
        copy.push(entry(HISTORY_LIMIT as u64 + 3, "r"));
        assert_ne!(copy, h);
        assert_eq!(
            copy.back().map(|e| e.generation),
            Some(HISTORY_LIMIT as u64 + 3)
        );
    }
}
