//! The grain-table cache of a sparse image: decoded tables keyed by table
//! number, least recently used evicted first, at most `max` of them.

use std::collections::{BTreeMap, HashMap};

/// Least-recently-used cache of decoded grain tables.
pub(super) struct GtCache {
    /// Most tables held.
    pub(super) max: usize,
    tables: HashMap<u64, (Vec<u32>, u64)>,
    order: BTreeMap<u64, u64>,
    tick: u64,
}

impl GtCache {
    pub(super) fn new(max: usize) -> Self {
        GtCache {
            max: max.max(1),
            tables: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
        }
    }

    /// Entry `e` of table `gt` if the table is cached (and mark it used).
    pub(super) fn get(&mut self, gt: u64, e: usize) -> Option<u32> {
        let (table, used) = self.tables.get_mut(&gt)?;
        self.order.remove(used);
        self.tick += 1;
        *used = self.tick;
        self.order.insert(self.tick, gt);
        table.get(e).copied()
    }

    /// Table `gt` if cached (and mark it used).
    pub(super) fn table(&mut self, gt: u64) -> Option<&[u32]> {
        let (table, used) = self.tables.get_mut(&gt)?;
        self.order.remove(used);
        self.tick += 1;
        *used = self.tick;
        self.order.insert(self.tick, gt);
        Some(table)
    }

    pub(super) fn insert(&mut self, gt: u64, table: Vec<u32>) {
        self.remove(gt);
        while self.tables.len() >= self.max {
            let Some((_, old)) = self.order.pop_first() else {
                break;
            };
            self.tables.remove(&old);
        }
        self.tick += 1;
        self.order.insert(self.tick, gt);
        self.tables.insert(gt, (table, self.tick));
    }

    /// Set entry `e` of table `gt`, if cached.
    pub(super) fn set(&mut self, gt: u64, e: usize, v: u32) {
        if let Some((table, _)) = self.tables.get_mut(&gt)
            && let Some(slot) = table.get_mut(e)
        {
            *slot = v;
        }
    }

    pub(super) fn remove(&mut self, gt: u64) {
        if let Some((_, used)) = self.tables.remove(&gt) {
            self.order.remove(&used);
        }
    }

    pub(super) fn len(&self) -> usize {
        self.tables.len()
    }
}

#[cfg(test)]
mod tests {
    use super::GtCache;

    #[test]
    fn evicts_the_least_recently_used_table() {
        let mut c = GtCache::new(2);
        c.insert(1, vec![10, 11]);
        c.insert(2, vec![20, 21]);
        assert_eq!(c.get(1, 1), Some(11)); // 1 is now the most recent
        c.insert(3, vec![30]);
        assert_eq!(
            (c.len(), c.get(2, 0), c.get(1, 0), c.get(3, 0)),
            (2, None, Some(10), Some(30))
        );
        assert_eq!(c.table(3), Some(&[30][..]));
        c.set(3, 0, 33);
        c.set(3, 5, 1); // out of the table: ignored
        c.set(9, 0, 1); // not cached: ignored
        assert_eq!(c.get(3, 0), Some(33));
        c.remove(3);
        assert_eq!((c.len(), c.get(3, 0)), (1, None));
        c.insert(1, vec![12]); // replacing keeps one copy
        assert_eq!((c.len(), c.get(1, 0)), (1, Some(12)));
    }
}
