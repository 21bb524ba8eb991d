//! Which nodes hold an object that goes along with others (a ConfigMap or Secret pods use, the
//! DeviceModel of devices), and for how many of them. The first use on a node means the object
//! must be sent there; the last release, that it must be deleted there.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

#[derive(Debug)]
pub struct NodeRefs<K> {
    counts: HashMap<K, BTreeMap<String, usize>>,
}

impl<K> Default for NodeRefs<K> {
    fn default() -> Self {
        NodeRefs {
            counts: HashMap::new(),
        }
    }
}

impl<K: Eq + Hash + Clone> NodeRefs<K> {
    /// One more use of `key` on `node`; `true` if it is the first (send it there).
    pub fn hold(&mut self, key: &K, node: &str) -> bool {
        let count = self
            .counts
            .entry(key.clone())
            .or_default()
            .entry(node.to_owned())
            .or_insert(0);
        *count += 1;
        *count == 1
    }

    /// One use fewer; `true` if it was the last on `node` (delete it there). Releasing what is
    /// not held does nothing.
    pub fn release(&mut self, key: &K, node: &str) -> bool {
        let Some(nodes) = self.counts.get_mut(key) else {
            return false;
        };
        let Some(count) = nodes.get_mut(node) else {
            return false;
        };
        *count = count.saturating_sub(1);
        if *count > 0 {
            return false;
        }
        nodes.remove(node);
        if nodes.is_empty() {
            self.counts.remove(key);
        }
        true
    }

    pub fn holds(&self, key: &K, node: &str) -> bool {
        self.counts.get(key).is_some_and(|n| n.contains_key(node))
    }

    /// The nodes holding `key`.
    pub fn nodes(&self, key: &K) -> Vec<String> {
        self.counts
            .get(key)
            .map(|n| n.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The keys `node` holds.
    pub fn held_by<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a K> + 'a {
        self.counts
            .iter()
            .filter(move |(_, nodes)| nodes.contains_key(node))
            .map(|(k, _)| k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_hold_and_last_release_per_node() {
        let mut r = NodeRefs::default();
        assert!(r.hold(&"cm", "a"));
        assert!(!r.hold(&"cm", "a"));
        assert!(r.hold(&"cm", "b"));
        assert_eq!(r.nodes(&"cm"), ["a", "b"]);
        assert!(!r.release(&"cm", "a"));
        assert!(r.release(&"cm", "a"));
        assert!(!r.release(&"cm", "a"), "not held any more");
        assert!(!r.holds(&"cm", "a") && r.holds(&"cm", "b"));
        assert_eq!(r.held_by("b").collect::<Vec<_>>(), [&"cm"]);
        assert!(r.release(&"cm", "b"));
        assert!(r.counts.is_empty());
    }
}
