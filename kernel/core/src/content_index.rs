//! The dedupe scanner's hash index (KSM's stable and unstable trees):
//! content key -> value, open addressing with linear probing.
//!
//! Why not a general hash map (hashbrown, used before): the keys are
//! already page-content hashes, and the scanner wants to know *where* a
//! key's slot is before it looks, so it can prefetch that cache line a few
//! pages ahead ([`ContentIndex::prefetch`]) and the lookup itself then
//! hits the cache; hashbrown keeps no address to prefetch and reads a
//! control byte and an entry in two places. A key's home
//! slot is its top bits; a lookup reads on from there to the first empty
//! slot, usually within that line. Deletion shifts later entries back
//! (no tombstones), so a table that lives for the whole run (the stable
//! index) never degrades.
//!
//! Key 0 marks an empty slot: callers use keys with bit 0 set
//! (`dedupe::key_of` does). Values are u64 (a merged frame's id in the
//! stable index, a page ref in the unstable one).

use alloc::vec::Vec;

/// A slot: [key, value]. All-zero is empty, so a new table is one zeroed
/// allocation (calloc on the host, which skips fresh pages; the kernel's
/// allocator writes the zeros).
type Slot = [u64; 2];

const EMPTY: u64 = 0;
/// Smallest table, in slots.
const MIN_SLOTS: usize = 16;

pub(crate) struct ContentIndex {
    slots: Vec<Slot>,
    len: usize,
}

impl ContentIndex {
    pub fn new() -> Self {
        ContentIndex {
            slots: Vec::new(),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// The key's top bits scaled to the table (Lemire's multiply-shift
    /// "fastrange"): monotone in the key like `key >> shift` for a power
    /// of two, but for any table size, so the table can be sized to what
    /// it holds instead of to the next power of two.
    fn home(&self, key: u64) -> usize {
        ((key as u128 * self.slots.len() as u128) >> 64) as usize
    }

    fn next(&self, i: usize) -> usize {
        if i + 1 == self.slots.len() { 0 } else { i + 1 }
    }

    /// At most 3/4 full (3/8 just after growing): an unsuccessful lookup,
    /// the common case (most pages have no twin), then reads about 8.5
    /// slots, two or three lines, on average at the fullest (Knuth's
    /// linear-probing estimate, (1 + 1/(1-a)^2)/2), far fewer below it.
    fn fits(slots: usize, len: usize) -> bool {
        len.saturating_mul(4) <= slots.saturating_mul(3)
    }

    /// Starts loading the line of `key`'s home slot into the cache.
    #[inline]
    pub fn prefetch(&self, key: u64) {
        if !self.slots.is_empty() {
            crate::prefetch::prefetch(&self.slots[self.home(key)]);
        }
    }

    /// The slot holding `key`, or the empty slot where it would go.
    #[inline]
    fn probe(&self, key: u64) -> (usize, bool) {
        debug_assert_ne!(key, EMPTY, "key 0 marks empty slots");
        let mut i = self.home(key);
        loop {
            match self.slots[i][0] {
                k if k == key => return (i, true),
                EMPTY => return (i, false),
                _ => i = self.next(i),
            }
        }
    }

    #[inline]
    pub fn get(&self, key: u64) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        match self.probe(key) {
            (i, true) => Some(self.slots[i][1]),
            _ => None,
        }
    }

    /// Sets `key`'s value; returns the one it replaced.
    pub fn insert(&mut self, key: u64, val: u64) -> Option<u64> {
        if self.slots.is_empty() {
            self.reserve(1); // the smallest table, MIN_SLOTS
        }
        let (mut i, found) = self.probe(key);
        if found {
            return Some(core::mem::replace(&mut self.slots[i][1], val));
        }
        // Grow only for a new key (a replacement at the limit must not).
        if !Self::fits(self.slots.len(), self.len + 1) {
            self.reserve(self.len + 1 + self.len / 4);
            i = self.probe(key).0;
        }
        self.slots[i] = [key, val];
        self.len += 1;
        None
    }

    pub fn remove(&mut self, key: u64) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        let (mut hole, found) = self.probe(key);
        if !found {
            return None;
        }
        let val = self.slots[hole][1];
        self.len -= 1;
        // Backward shift: move each later entry of the run into the hole
        // unless its home lies cyclically after the hole (then it must
        // stay where a lookup from its home still reaches it).
        let mut j = hole;
        loop {
            j = self.next(j);
            let k = self.slots[j][0];
            if k == EMPTY {
                break;
            }
            let home = self.home(k);
            let stays = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !stays {
                self.slots[hole] = self.slots[j];
                hole = j;
            }
        }
        self.slots[hole] = [EMPTY, 0];
        Some(val)
    }

    /// Whether `total` entries fit without growing.
    pub fn fits_total(&self, total: usize) -> bool {
        !self.slots.is_empty() && Self::fits(self.slots.len(), total)
    }

    /// Whether one more new key would make the index grow.
    pub fn full(&self) -> bool {
        self.slots.is_empty() || !Self::fits(self.slots.len(), self.len + 1)
    }

    /// Empties the index and gives its slots back (a caller that can list
    /// the entries again rebuilds a larger index without holding the old
    /// and the new table at once).
    pub fn release(&mut self) {
        self.slots = Vec::new();
        self.len = 0;
    }

    /// Empties the index, keeping its slots.
    pub fn clear(&mut self) {
        if self.len > 0 {
            self.slots.fill([EMPTY, 0]);
            self.len = 0;
        }
    }

    /// Makes room for `total` entries without growing again: a table at
    /// most 3/4 full with them (a quarter more for an insert that grows,
    /// so growing stays amortized O(1) at a quarter of unused slots on
    /// average, not the half a power-of-two table leaves).
    pub fn reserve(&mut self, total: usize) {
        if !self.slots.is_empty() && Self::fits(self.slots.len(), total) {
            return;
        }
        let n = total.checked_mul(4).expect("content index capacity overflow").div_ceil(3).max(MIN_SLOTS);
        debug_assert!(Self::fits(n, total));
        // vec![[0u64; 2]; n] is one zeroed allocation (no stores).
        let old = core::mem::replace(&mut self.slots, alloc::vec![[EMPTY, 0]; n]);
        // With the home slot in the key's top bits, the old table's entries
        // come out nearly in home order (but for a run that wrapped past
        // its end) and land in the new table in that order: both tables
        // are walked front to back.
        for s in old.into_iter().filter(|s| s[0] != EMPTY) {
            let (i, _) = self.probe(s[0]);
            self.slots[i] = s;
        }
    }

    /// Heap bytes of the slots.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.slots.len() * core::mem::size_of::<Slot>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[test]
    fn insert_get_replace_remove() {
        let mut t = ContentIndex::new();
        assert_eq!(t.get(3), None);
        assert_eq!(t.remove(3), None);
        assert_eq!(t.insert(3, 30), None);
        assert_eq!(t.insert(5, 50), None);
        assert_eq!(t.insert(3, 31), Some(30));
        assert_eq!(
            (t.get(3), t.get(5), t.get(7), t.len()),
            (Some(31), Some(50), None, 2)
        );
        assert_eq!(t.remove(3), Some(31));
        assert_eq!((t.get(3), t.get(5), t.len()), (None, Some(50), 1));
        t.clear();
        assert_eq!((t.get(5), t.len()), (None, 0));
        assert!(!t.full());
        t.release();
        assert_eq!((t.get(5), t.len(), t.bytes()), (None, 0, 0));
        assert!(t.full(), "no slots: the next key needs room");
        assert_eq!(t.insert(5, 51), None);
        assert_eq!(t.get(5), Some(51));
    }

    /// A key's home slot is its top bits scaled to the table, so keys that
    /// differ there start their probes apart and a lookup reads one line,
    /// not a run through the whole table (a constant home would still
    /// find every key, only slowly: this is what tells the two apart).
    #[test]
    fn home_is_the_keys_top_bits_scaled_to_the_table() {
        let mut t = ContentIndex::new();
        t.reserve(12); // 16 slots
        assert_eq!(t.slots.len(), 16);
        for h in 0..16u64 {
            assert_eq!(t.home((h << 60) | 1), h as usize);
            assert_eq!(t.home((h << 60) | (1 << 59) | 1), h as usize, "the bits below decide nothing");
        }
        t.reserve(30); // 40 slots: not a power of two
        assert_eq!(t.slots.len(), 40);
        assert_eq!((t.home(1), t.home(u64::MAX / 2), t.home(u64::MAX)), (0, 19, 39));
        // Keys with distinct homes sit in them: one slot read per lookup.
        for h in 0..16u64 {
            t.insert((h << 60) | 1, h);
        }
        for h in 0..16u64 {
            let k = (h << 60) | 1;
            assert_eq!(t.probe(k), (t.home(k), true));
        }
    }

    #[test]
    fn grows_only_for_new_keys() {
        let mut t = ContentIndex::new();
        let key = |k: u64| (k << 58) | 1;
        for k in 0..12 {
            assert!(!t.full() || k == 0);
            t.insert(key(k), k); // 12 of 16 slots: the 3/4 limit
        }
        assert!(t.full());
        assert_eq!(t.bytes(), 16 * 16);
        assert_eq!(t.insert(key(3), 99), Some(3));
        assert_eq!(t.bytes(), 16 * 16, "a replacement at the limit grew the table");
        assert_eq!(t.insert(key(12), 12), None);
        // 13 entries and a quarter more (16), at most 3/4 full: 22 slots.
        assert_eq!(t.bytes(), 22 * 16);
        assert_eq!((0..13).map(|k| t.get(key(k)).unwrap()).sum::<u64>(), (0..13).sum::<u64>() - 3 + 99);
    }

    #[test]
    fn grows_and_keeps_every_entry() {
        let mut t = ContentIndex::new();
        for i in 0..10_000u64 {
            t.insert(i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1, i);
        }
        assert_eq!(t.len(), 10_000);
        assert!(t.bytes() <= 10_000 * 16 * 2 * 4 / 3 + 16 * 16);
        for i in 0..10_000u64 {
            assert_eq!(t.get(i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1), Some(i));
        }
    }

    /// Keys crowded into a few home slots, so runs wrap around the end of
    /// the table and removal has to shift entries across it.
    #[test]
    fn removal_keeps_wrapped_runs_reachable() {
        let mut t = ContentIndex::new();
        t.reserve(8); // 16 slots: home = top 4 bits
        let top = |h: u64, n: u64| (h << 60) | (n << 1) | 1;
        let keys = [
            top(15, 1),
            top(15, 2),
            top(15, 3),
            top(0, 1),
            top(14, 1),
            top(15, 4),
        ];
        for (i, &k) in keys.iter().enumerate() {
            t.insert(k, i as u64);
        }
        for (i, &k) in keys.iter().enumerate() {
            assert_eq!(t.remove(k), Some(i as u64));
            for (j, &rest) in keys.iter().enumerate().skip(i + 1) {
                assert_eq!(
                    t.get(rest),
                    Some(j as u64),
                    "lost key {j} after removing {i}"
                );
            }
        }
        assert_eq!(t.len(), 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u64),
        Remove(u64),
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        // Few distinct keys with few top bits, so collisions and wrapped
        // runs are common.
        let key = (0u64..16, 0u64..4).prop_map(|(h, n)| (h << 60) | (n << 1) | 1);
        prop_oneof![
            8 => (key.clone(), any::<u64>()).prop_map(|(k, v)| Op::Insert(k, v)),
            6 => key.prop_map(Op::Remove),
            1 => Just(Op::Clear),
        ]
    }

    proptest! {
        #[test]
        fn behaves_as_a_map(ops in proptest::collection::vec(op(), 1..300)) {
            let mut t = ContentIndex::new();
            let mut m = HashMap::new();
            for o in ops {
                match o {
                    Op::Insert(k, v) => prop_assert_eq!(t.insert(k, v), m.insert(k, v)),
                    Op::Remove(k) => prop_assert_eq!(t.remove(k), m.remove(&k)),
                    Op::Clear => { t.clear(); m.clear(); }
                }
                prop_assert_eq!(t.len(), m.len());
                for h in 0..16u64 {
                    for n in 0..4u64 {
                        let k = (h << 60) | (n << 1) | 1;
                        prop_assert_eq!(t.get(k), m.get(&k).copied());
                    }
                }
            }
        }
    }
}
