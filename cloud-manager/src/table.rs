//! `Table`: one kind of registry record (tokens, nodes or pools), keyed by
//! a string, that remembers which keys a change wrote.
//!
//! The rows sit in a persistent ordered map (`imbl::OrdMap`): a clone
//! shares every row and costs O(1), and changing a row copies only the
//! path to it (O(log n)). So a registry change can start from a clone of
//! the current registry, whatever the fleet's size, and leave the current
//! one untouched until the change is committed. Every write marks its key
//! as touched, so the store writes exactly those rows and never compares
//! the whole table (see `store::WriteSet`).

use std::collections::BTreeSet;
use std::ops::Bound;

use imbl::OrdMap;

#[derive(Clone, Debug)]
pub struct Table<V: Clone> {
    rows: OrdMap<String, V>,
    /// Keys inserted, changed or removed since `clear_touched`.
    touched: BTreeSet<String>,
}

impl<V: Clone> Default for Table<V> {
    fn default() -> Self {
        Table {
            rows: OrdMap::new(),
            touched: BTreeSet::new(),
        }
    }
}

/// Two tables are equal when their rows are (what was touched is not state).
impl<V: Clone + PartialEq> PartialEq for Table<V> {
    fn eq(&self, other: &Self) -> bool {
        self.rows == other.rows
    }
}

impl<V: Clone> FromIterator<(String, V)> for Table<V> {
    /// Rows loaded from the store: nothing is touched.
    fn from_iter<I: IntoIterator<Item = (String, V)>>(iter: I) -> Self {
        Table {
            rows: iter.into_iter().collect(),
            touched: BTreeSet::new(),
        }
    }
}

impl<V: Clone> Table<V> {
    pub fn get(&self, key: &str) -> Option<&V> {
        self.rows.get(key)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.rows.contains_key(key)
    }

    /// The row, to change it: its key counts as touched (written back).
    pub fn get_mut(&mut self, key: &str) -> Option<&mut V> {
        let row = self.rows.get_mut(key)?;
        if !self.touched.contains(key) {
            self.touched.insert(key.to_string());
        }
        Some(row)
    }

    pub fn insert(&mut self, key: String, value: V) -> Option<V> {
        self.touched.insert(key.clone());
        self.rows.insert(key, value)
    }

    pub fn remove(&mut self, key: &str) -> Option<V> {
        let old = self.rows.remove(key);
        if old.is_some() {
            self.touched.insert(key.to_string());
        }
        old
    }

    /// Keeps the rows `keep` accepts; removed ones count as touched.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &V) -> bool) {
        let gone: Vec<String> = self
            .rows
            .iter()
            .filter(|(k, v)| !keep(k, v))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            self.remove(&k);
        }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &V)> {
        self.rows.iter()
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.rows.values()
    }

    /// The rows after `after` (all of them for `None`), in key order.
    pub fn after(&self, after: Option<&str>) -> impl Iterator<Item = &V> {
        let start = match after {
            Some(k) => Bound::Excluded(k),
            None => Bound::Unbounded,
        };
        self.rows
            .range::<_, str>((start, Bound::Unbounded))
            .map(|(_, v)| v)
    }

    /// The rows after key `after` (an owned key: the iterator does not
    /// borrow it), in key order.
    pub fn after_key(&self, after: String) -> impl Iterator<Item = &V> + '_ {
        self.rows
            .range((Bound::Excluded(after), Bound::Unbounded))
            .map(|(_, v)| v)
    }

    /// The keys written since `clear_touched`.
    pub fn touched(&self) -> impl Iterator<Item = &String> {
        self.touched.iter()
    }

    pub fn clear_touched(&mut self) {
        self.touched.clear();
    }
}

impl<V: Clone> std::ops::Index<&str> for Table<V> {
    type Output = V;

    fn index(&self, key: &str) -> &V {
        &self.rows[key]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(n: usize) -> Table<u32> {
        (0..n).map(|i| (format!("k{i:05}"), i as u32)).collect()
    }

    #[test]
    fn a_clone_is_independent_and_only_writes_are_touched() {
        let base = table(1000);
        let mut next = base.clone();
        assert_eq!(next.touched().count(), 0);
        let _ = next.get("k00001");
        *next.get_mut("k00002").unwrap() = 99;
        next.insert("new".into(), 7);
        next.remove("k00003");
        next.remove("missing");
        assert!(next.get_mut("missing").is_none());
        let touched: Vec<&str> = next.touched().map(String::as_str).collect();
        assert_eq!(touched, ["k00002", "k00003", "new"]);
        // The base is unchanged.
        assert_eq!(base["k00002"], 2);
        assert!(base.contains_key("k00003") && !base.contains_key("new"));
        next.clear_touched();
        assert_eq!(next.touched().count(), 0);
    }

    #[test]
    fn retain_touches_what_it_removes() {
        let mut t = table(10);
        t.retain(|_, v| v % 2 == 0);
        assert_eq!(t.len(), 5);
        assert_eq!(t.touched().count(), 5);
    }

    #[test]
    fn after_starts_past_the_cursor() {
        let t = table(5);
        let rest: Vec<u32> = t.after(Some("k00002")).copied().collect();
        assert_eq!(rest, [3, 4]);
        assert_eq!(t.after(None).count(), 5);
    }
}
