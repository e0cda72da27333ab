//! The dedupe scanner's hash index (KSM's stable and unstable trees):
//! content key -> value, a multimap kept as an *ordered* linear-probing
//! table (Amble & Knuth's ordered hash table; with a monotone home slot
//! this is the same order Robin Hood hashing keeps).
//!
//! Why not a general hash map (hashbrown, used before): the keys are
//! already page-content hashes, and the scanner wants to know *where* a
//! key's slot is before it looks, so it can prefetch that cache line a few
//! pages ahead ([`ContentIndex::prefetch`]) and the lookup itself then
//! hits the cache; hashbrown keeps no address to prefetch and reads a
//! control byte and an entry in two places.
//!
//! A key's home slot is its top bits scaled to the home range, so homes
//! rise with the keys, and the entries are kept sorted by key front to
//! back, each at or after its home with no empty slot in between. Then:
//! - a lookup stops at the first larger key, so a miss (the common case:
//!   most pages have no twin) costs what a hit costs, about
//!   (1 + 1/(1-a))/2 slots at fill a (4.5 at the 7/8 limit), instead of
//!   the (1 + 1/(1-a)^2)/2 (32.5) of plain linear probing: the table can
//!   run fuller;
//! - there is no wrap-around: runs past the last home spill into a small
//!   tail, and the table grows *in place* (one `realloc`, then the entries
//!   are moved within it), so the old and the new table are never held at
//!   once: the heap's peak is the table, not one and a quarter tables;
//! - deletion shifts later entries back (no tombstones), so a table that
//!   lives for the whole run (the stable index) never degrades.
//!
//! Key 0 marks an empty slot: callers use keys with bit 0 set
//! (`dedupe::key_of` does). Values are any u64 (a merged frame's record in the
//! stable index, a page ref in the unstable one). A key may have several
//! entries ([`ContentIndex::insert_dup`]); they sit together, newest first.

use alloc::vec::Vec;

/// A slot: [key, value]. All-zero is empty, so a new table is one zeroed
/// allocation (calloc on the host, which skips fresh pages; the kernel's
/// allocator writes the zeros).
type Slot = [u64; 2];

const EMPTY: u64 = 0;
const EMPTY_SLOT: Slot = [EMPTY, 0];

/// Smallest table, in home slots.
const MIN_SLOTS: usize = 16;

/// At most 7/8 of the home slots hold entries. With the ordered layout a
/// lookup, hit or miss, reads about 4.5 slots at that fill, usually one or
/// two lines; an insert moves the run after its position, about 32 slots
/// (512 bytes, one `memmove`) at the fullest, far fewer below it.
const FILL_NUM: usize = 7;
const FILL_DEN: usize = 8;

/// An insert that grows makes the home range 5/4 of what the new length
/// needs at the fill limit: the fill then runs from 0.7 to 0.875, about
/// 0.79 on average, and each entry is re-placed about 1/(1 - 4/5) = 5
/// times over the table's life (amortized O(1)). Larger steps would save
/// moves but lower the average fill; the step costs no second table, so
/// it need not be large.
const GROW_NUM: usize = 5;
const GROW_DEN: usize = 4;

/// A removal that leaves fewer than 5/8 of the home slots filled shrinks
/// the table (in place) back to the 0.7 a growth leaves: the unstable
/// index peaks in the middle of a pass (pages wait there for their twin
/// and leave it when it comes), and without shrinking it would keep that
/// peak's size next to the stable index's growth. Between 5/8 and 7/8
/// nothing resizes, so each resize is paid by inserts or removals of at
/// least a tenth of the entries. (With 3/8 the heap's peak, at the end of
/// the first pass of 90% pairs, was 2.5 B per page higher: the unstable
/// index still had its mid-pass size. 5/8 measured no slower.)
const SHRINK_NUM: usize = 5;
const SHRINK_DEN: usize = 8;

/// The tail past the last home is `max(MIN_TAIL, home_slots / TAIL_DIV)`
/// slots. What spills into it is the run that straddles the last home:
/// with well-spread keys its length has the same distribution at any
/// table size (linear probing's "carry", falling off about as
/// e^(-0.26 x) at fill 7/8, e^(-0.44 x) at 0.8), so 16 slots overflow
/// only a few times in a hundred tables even at the limit, and 64 (from
/// 16384 homes on) practically never. When the tail does run out (or
/// many duplicates of a top key fill it), it is extended on demand by a
/// plain resize: no entry moves, so the tail can stay small. The
/// `home_slots / 256` share (0.4% of the table) makes that rare where a
/// resize is a large copy on an allocator without mremap.
const MIN_TAIL: usize = 16;
const TAIL_DIV: usize = 256;

pub(crate) struct ContentIndex {
    /// `home_slots` home slots, then the tail; no entry wraps around.
    slots: Vec<Slot>,
    /// The range of home positions (0 while there are no slots).
    home_slots: usize,
    len: usize,
}

impl ContentIndex {
    pub fn new() -> Self {
        ContentIndex { slots: Vec::new(), home_slots: 0, len: 0 }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// The key's top bits scaled to `home_slots` (Lemire's multiply-shift
    /// "fastrange"): monotone in the key like `key >> shift` for a power
    /// of two, but for any table size, so the table can be sized to what
    /// it holds instead of to the next power of two. Monotone is what the
    /// ordered layout needs: sorted by key is then sorted by home.
    fn home_in(key: u64, home_slots: usize) -> usize {
        ((key as u128 * home_slots as u128) >> 64) as usize
    }

    fn home(&self, key: u64) -> usize {
        Self::home_in(key, self.home_slots)
    }

    fn fits(home_slots: usize, len: usize) -> bool {
        len.saturating_mul(FILL_DEN) <= home_slots.saturating_mul(FILL_NUM)
    }

    /// The fewest home slots that hold `total` entries under the limit.
    fn homes_for(total: usize) -> usize {
        total.checked_mul(FILL_DEN).expect("content index capacity overflow").div_ceil(FILL_NUM).max(MIN_SLOTS)
    }

    fn tail_for(home_slots: usize) -> usize {
        MIN_TAIL.max(home_slots / TAIL_DIV)
    }

    /// Starts loading the line of `key`'s home slot into the cache.
    #[inline]
    pub fn prefetch(&self, key: u64) {
        if !self.slots.is_empty() {
            crate::prefetch::prefetch(&self.slots[self.home(key)]);
        }
    }

    /// The first slot at or after `key`'s home that is empty or holds a
    /// key >= `key` (`slots.len()` if the run reaches the end): where
    /// `key`'s entries start, or where a new one goes. Everything before
    /// it from the home on is smaller, and nothing after it can be `key`.
    #[inline]
    fn seek(&self, key: u64) -> usize {
        debug_assert_ne!(key, EMPTY, "key 0 marks empty slots");
        let h = self.home(key);
        h + self.slots[h..].iter().take_while(|s| s[0] != EMPTY && s[0] < key).count()
    }

    /// The value of `key`'s first (newest) entry.
    #[inline]
    pub fn get(&self, key: u64) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        self.slots.get(self.seek(key)).filter(|s| s[0] == key).map(|s| s[1])
    }

    /// The position of `key`'s `n`-th entry (0: the newest), if it has
    /// that many: a key's entries sit together. Any insert, remove or
    /// growth invalidates it.
    #[inline]
    pub fn nth(&self, key: u64, n: usize) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        let i = self.seek(key) + n;
        self.slots.get(i).filter(|s| s[0] == key).map(|_| i)
    }

    /// The position of the first entry (newest first) with `key` whose
    /// value satisfies `pred`. Any insert, remove or growth invalidates
    /// it.
    pub fn find(&self, key: u64, mut pred: impl FnMut(u64) -> bool) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        let i = self.seek(key);
        self.slots[i..].iter().take_while(|s| s[0] == key).position(|s| pred(s[1])).map(|p| i + p)
    }

    /// The key of the entry at `pos` (from [`Self::find`]).
    #[cfg(test)]
    pub fn key_at(&self, pos: usize) -> u64 {
        debug_assert_ne!(self.slots[pos][0], EMPTY, "no entry at {pos}");
        self.slots[pos][0]
    }

    /// The value of the entry at `pos` (from [`Self::find`]).
    pub fn value_at(&self, pos: usize) -> u64 {
        debug_assert_ne!(self.slots[pos][0], EMPTY, "no entry at {pos}");
        self.slots[pos][1]
    }

    /// Sets the value of the entry at `pos` (from [`Self::find`]); the
    /// position stays valid (nothing moves).
    pub fn set_value_at(&mut self, pos: usize, val: u64) {
        debug_assert_ne!(self.slots[pos][0], EMPTY, "no entry at {pos}");
        self.slots[pos][1] = val;
    }

    /// Sets the value of `key`'s first entry and returns the one it
    /// replaced, or adds an entry if there is none.
    #[cfg(test)]
    pub fn insert(&mut self, key: u64, val: u64) -> Option<u64> {
        let i = self.seek(key);
        // A replacement never grows, even at the limit.
        if let Some(s) = self.slots.get_mut(i).filter(|s| s[0] == key) {
            return Some(core::mem::replace(&mut s[1], val));
        }
        self.add(key, val);
        None
    }

    /// Adds an entry even if `key` has some; it comes first among them
    /// (found first by [`Self::get`] and [`Self::find`]). Returns its
    /// position (valid until the next insert, remove or growth).
    pub fn insert_dup(&mut self, key: u64, val: u64) -> usize {
        self.add(key, val)
    }

    /// Adds the entry; returns its position.
    fn add(&mut self, key: u64, val: u64) -> usize {
        debug_assert_ne!(key, EMPTY, "key 0 marks empty slots");
        if self.slots.is_empty() {
            self.reserve(1); // the smallest table, MIN_SLOTS
        } else if !Self::fits(self.home_slots, self.len + 1) {
            let homes = Self::homes_for(self.len + 1);
            self.grow_in_place(homes.saturating_mul(GROW_NUM) / GROW_DEN);
        }
        loop {
            // In front of the first entry >= key: before any entries with
            // this key, so the newest comes first. The run from there to
            // the next empty slot moves right by one; each of its entries
            // stays after its home and the gap it leaves is filled.
            let i = self.seek(key);
            if let Some(run) = self.slots[i..].iter().position(|s| s[0] == EMPTY) {
                self.slots.copy_within(i..i + run, i + 1);
                self.slots[i] = [key, val];
                self.len += 1;
                return i;
            }
            // The run reaches the physical end: lengthen the tail. The
            // homes stay, so nothing moves (the new slots are empty).
            let add = MIN_TAIL.max((self.slots.len() - self.home_slots) / 2);
            self.resize_slots(self.slots.len() + add);
        }
    }

    /// Removes `key`'s first entry and returns its value.
    #[cfg(test)]
    pub fn remove(&mut self, key: u64) -> Option<u64> {
        let pos = self.find(key, |_| true)?;
        Some(self.remove_at(pos).1)
    }

    /// Removes the entry at `pos` (from [`Self::find`]) and returns its
    /// (key, value). Invalidates every position.
    pub fn remove_at(&mut self, pos: usize) -> (u64, u64) {
        let [key, val] = self.slots[pos];
        debug_assert_ne!(key, EMPTY, "no entry at {pos}");
        // Backward shift: the entries after it that sit past their homes
        // move back one (order kept, still at or after their homes); the
        // first empty slot or entry at its home ends that, and no later
        // entry's home..position range can span the slot freed before it.
        let next = pos + 1;
        let moved =
            self.slots[next..].iter().enumerate().take_while(|&(d, s)| s[0] != EMPTY && self.home(s[0]) < next + d).count();
        self.slots.copy_within(next..next + moved, pos);
        self.slots[pos + moved] = EMPTY_SLOT;
        self.len -= 1;
        // (A table of the smallest size is never cut: `shrink_to` keeps
        // at least a growth's size for MIN_SLOTS homes.)
        if self.len * SHRINK_DEN < self.home_slots * SHRINK_NUM {
            self.shrink_to(self.len);
        }
        (key, val)
    }

    /// Gives back slots beyond what `total` entries need (the size a
    /// growth to that many would leave), in place.
    pub fn shrink_to(&mut self, total: usize) {
        let homes = Self::homes_for(total.max(self.len)).saturating_mul(GROW_NUM) / GROW_DEN;
        if homes < self.home_slots {
            self.shrink_in_place(homes);
        }
    }

    /// Re-places the entries for fewer homes, front to back within the
    /// vector, then cuts it. Entry j goes to t_j = max(home(key_j),
    /// t_{j-1} + 1) as in [`Self::grow_in_place`]; here t_j <= q_j, its
    /// present position: the new home is no later than the old one, which
    /// is <= q_j, and t_{j-1} + 1 <= q_{j-1} + 1 <= q_j. So each entry
    /// moves left or stays, onto a slot the entries before it have left.
    fn shrink_in_place(&mut self, home_slots: usize) {
        debug_assert!(home_slots < self.home_slots);
        self.home_slots = home_slots;
        let mut next = 0;
        for q in 0..self.slots.len() {
            if self.slots[q][0] == EMPTY {
                continue;
            }
            let t = self.home(self.slots[q][0]).max(next);
            debug_assert!(t <= q, "re-placing would overwrite an entry");
            if t != q {
                self.slots[t] = core::mem::replace(&mut self.slots[q], EMPTY_SLOT);
            }
            next = t + 1;
        }
        self.slots.truncate((home_slots + Self::tail_for(home_slots)).max(next));
        self.slots.shrink_to_fit();
    }

    /// Every entry, as (key, value), in key order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.slots.iter().filter(|s| s[0] != EMPTY).map(|s| (s[0], s[1]))
    }

    /// Whether `total` entries fit without growing.
    pub fn fits_total(&self, total: usize) -> bool {
        !self.slots.is_empty() && Self::fits(self.home_slots, total)
    }

    /// Whether one more new key would make the index grow (in place, but
    /// it is still a resize and a pass over the entries).
    #[cfg(test)]
    pub fn full(&self) -> bool {
        self.slots.is_empty() || !Self::fits(self.home_slots, self.len + 1)
    }

    /// Empties the index and gives its slots back.
    #[cfg(test)]
    pub fn release(&mut self) {
        self.slots = Vec::new();
        self.home_slots = 0;
        self.len = 0;
    }

    /// Empties the index, keeping its slots.
    pub fn clear(&mut self) {
        if self.len > 0 {
            self.slots.fill(EMPTY_SLOT);
            self.len = 0;
        }
    }

    /// Makes room for `total` entries under the fill limit, so that many
    /// insert without growing the home range (many duplicates of a key at
    /// the very top may still lengthen the tail). Grows in place.
    pub fn reserve(&mut self, total: usize) {
        if !self.fits_total(total) {
            self.grow_in_place(Self::homes_for(total));
        }
    }

    /// Resizes the slots to exactly `n` (no spare capacity: the table is
    /// sized by the fill policy, not by Vec's doubling). On the host a
    /// large block is moved by mremap, never copied while held twice.
    fn resize_slots(&mut self, n: usize) {
        self.slots.reserve_exact(n.saturating_sub(self.slots.len()));
        self.slots.resize(n, EMPTY_SLOT);
    }

    /// Re-places the entries for `home_slots` homes within the one
    /// (resized) vector, without a second buffer.
    ///
    /// Entry j (in key order, j = 0..n) goes to t_j = max(home(key_j),
    /// t_{j-1} + 1): as early as the order and its home allow, which is the
    /// ordered layout for the new homes (sorted, each at or after its
    /// home, and t_j > home only when t_{j-1} = t_j - 1 is filled, so no
    /// gap). The t_j depend only on the keys' order, so a dry run over the
    /// entries as they are gives the end t_{n-1} + 1, and the table is
    /// sized to hold it: then it fits the first time, no retry.
    ///
    /// Phase 1 packs the entries against the new end: entry j to
    /// p_j = len - n + j. Its old position q_j <= p_j (the q are rising and
    /// below the old length <= len), so walking back to front each entry
    /// moves right or stays, onto a slot that is free: the later ones are
    /// already at p_k > p_j, the earlier ones at q_k < q_j.
    ///
    /// Phase 2 walks front to back and moves entry j from p_j to t_j.
    /// t_j <= p_j: the t rise by at least one per entry and the p by
    /// exactly one, and t_{n-1} < len = p_{n-1} + 1. So the slot written
    /// is free: the earlier entries are at t_k < t_j, the later ones still
    /// at p_k > p_j >= t_j.
    fn grow_in_place(&mut self, home_slots: usize) {
        debug_assert!(home_slots >= self.home_slots);
        let want = home_slots + Self::tail_for(home_slots);
        if self.len == 0 {
            self.home_slots = home_slots;
            if self.slots.is_empty() {
                // vec![[0u64; 2]; n] is one zeroed allocation (no stores).
                self.slots = alloc::vec![EMPTY_SLOT; want];
            } else {
                self.resize_slots(want.max(self.slots.len()));
            }
            return;
        }
        let mut end = 0; // t_{j-1} + 1
        for s in self.slots.iter().filter(|s| s[0] != EMPTY) {
            end = Self::home_in(s[0], home_slots).max(end) + 1;
        }
        let old_len = self.slots.len();
        let len = want.max(end).max(old_len);
        self.resize_slots(len);

        let mut first = len; // ends as p_0
        for q in (0..old_len).rev() {
            if self.slots[q][0] != EMPTY {
                first -= 1;
                if first != q {
                    self.slots[first] = core::mem::replace(&mut self.slots[q], EMPTY_SLOT);
                }
            }
        }
        debug_assert_eq!(len - first, self.len);

        self.home_slots = home_slots;
        let mut next = 0;
        for p in first..len {
            let t = self.home(self.slots[p][0]).max(next);
            debug_assert!(t <= p, "re-placing would overwrite an entry");
            if t != p {
                self.slots[t] = core::mem::replace(&mut self.slots[p], EMPTY_SLOT);
            }
            next = t + 1;
        }
        // A tail lengthened for the old homes may be more than now needed.
        self.slots.truncate(want.max(next));
        self.slots.shrink_to_fit();
    }

    /// Heap bytes of the slots.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.slots.capacity() * core::mem::size_of::<Slot>()
    }

    /// Panics unless the layout is ordered: sorted by key, every entry at
    /// or after its home with no empty slot in between, `len` entries.
    #[cfg(test)]
    fn check_invariant(&self) {
        let mut last_empty: Option<usize> = None;
        let mut prev = 0;
        let mut n = 0;
        for (i, s) in self.slots.iter().enumerate() {
            if s[0] == EMPTY {
                assert_eq!(s[1], 0, "empty slot {i} with a value");
                last_empty = Some(i);
                continue;
            }
            n += 1;
            let h = self.home(s[0]);
            assert!(h < self.home_slots, "home {h} out of range");
            assert!(h <= i, "entry at {i} before its home {h}");
            assert!(last_empty.is_none_or(|e| e < h), "empty slot between home {h} and entry at {i}");
            assert!(prev <= s[0], "entry at {i} out of order");
            prev = s[0];
        }
        assert_eq!(n, self.len);
        assert!(self.slots.is_empty() || self.slots.len() >= self.home_slots + Self::tail_for(self.home_slots));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn insert_get_replace_remove() {
        let mut t = ContentIndex::new();
        assert_eq!(t.get(3), None);
        assert_eq!(t.remove(3), None);
        assert_eq!(t.insert(3, 30), None);
        assert_eq!(t.insert(5, 50), None);
        assert_eq!(t.insert(3, 31), Some(30));
        assert_eq!((t.get(3), t.get(5), t.get(7), t.len()), (Some(31), Some(50), None, 2));
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
        assert_eq!(t.insert(7, 0), None, "a value may be 0");
        assert_eq!(t.get(7), Some(0));
        t.check_invariant();
    }

    /// A key's home slot is its top bits scaled to the home range, so keys
    /// that differ there start their probes apart and a lookup reads one
    /// line, not a run through the whole table (a constant home would
    /// still find every key, only slowly: this is what tells the two
    /// apart).
    #[test]
    fn home_is_the_keys_top_bits_scaled_to_the_table() {
        let mut t = ContentIndex::new();
        t.reserve(14); // 16 homes: 14 at 7/8
        assert_eq!((t.home_slots, t.slots.len()), (16, 16 + MIN_TAIL));
        for h in 0..16u64 {
            assert_eq!(t.home((h << 60) | 1), h as usize);
            assert_eq!(t.home((h << 60) | (1 << 59) | 1), h as usize, "the bits below decide nothing");
        }
        t.reserve(35); // 40 homes: not a power of two
        assert_eq!(t.home_slots, 40);
        assert_eq!((t.home(1), t.home(u64::MAX / 2), t.home(u64::MAX)), (0, 19, 39));
        // Keys with distinct homes sit in them: one slot read per lookup.
        for h in 0..16u64 {
            t.insert((h << 60) | 1, h);
        }
        for h in 0..16u64 {
            let k = (h << 60) | 1;
            assert_eq!((t.seek(k), t.key_at(t.seek(k))), (t.home(k), k));
        }
        t.check_invariant();
    }

    #[test]
    fn grows_only_for_new_keys() {
        let mut t = ContentIndex::new();
        let key = |k: u64| (k << 58) | 1;
        for k in 0..14 {
            assert!(!t.full() || k == 0);
            t.insert(key(k), k); // 14 of 16 homes: the 7/8 limit
        }
        assert!(t.full());
        assert_eq!(t.bytes(), (16 + MIN_TAIL) * 16);
        assert_eq!(t.insert(key(3), 99), Some(3));
        assert_eq!(t.bytes(), (16 + MIN_TAIL) * 16, "a replacement at the limit grew the table");
        assert_eq!(t.insert(key(14), 14), None);
        // 15 entries need 18 homes at 7/8, and a quarter more: 22.
        assert_eq!((t.home_slots, t.bytes()), (22, (22 + MIN_TAIL) * 16));
        assert_eq!((0..15).map(|k| t.get(key(k)).unwrap()).sum::<u64>(), (0..15).sum::<u64>() - 3 + 99);
        t.check_invariant();
    }

    fn spread(i: u64) -> u64 {
        i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
    }

    #[test]
    fn grows_in_place_and_keeps_every_entry() {
        let mut t = ContentIndex::new();
        let mut homes = 0;
        for i in 0..10_000u64 {
            t.insert(spread(i), i);
            if t.home_slots != homes {
                homes = t.home_slots;
                t.check_invariant();
                assert!((0..=i).all(|j| t.get(spread(j)) == Some(j)), "lost an entry growing to {homes}");
            }
        }
        assert_eq!(t.len(), 10_000);
        assert!(t.bytes() <= 10_000 * 16 * 8 / 7 * 5 / 4 + 100 * 16, "{} bytes", t.bytes());
        for i in 0..10_000u64 {
            assert_eq!(t.get(spread(i)), Some(i));
        }
    }

    /// The heap's peak while growing is the new table, not old + new: the
    /// slots are resized (a realloc) and re-placed within themselves.
    #[test]
    fn growth_never_holds_two_tables() {
        let mut t = ContentIndex::new();
        for i in 0..2_000u64 {
            let before = t.bytes();
            let (peak, ()) = counting::peak_during(|| {
                t.insert(spread(i), i);
            });
            if t.bytes() != before {
                assert!(t.bytes() > before, "the slots shrank");
                assert!(peak <= t.bytes() - before, "growing {before} to {} bytes held {peak} more", t.bytes());
                assert_eq!(t.slots.capacity(), t.slots.len(), "spare capacity");
                t.check_invariant();
            } else {
                assert_eq!(peak, 0, "an insert that did not grow allocated");
            }
        }
        assert!((0..2_000).all(|i| t.get(spread(i)) == Some(i)));
        // reserve grows in place too.
        let before = t.bytes();
        let (peak, ()) = counting::peak_during(|| t.reserve(10_000));
        assert!(t.bytes() > before && peak <= t.bytes() - before);
        t.check_invariant();
        assert!((0..2_000).all(|i| t.get(spread(i)) == Some(i)));
    }

    /// Between growths the fill (of the home range) runs from about 0.7
    /// just after one to 7/8 just before the next.
    #[test]
    fn fill_stays_within_the_policy() {
        let mut t = ContentIndex::new();
        let (mut lo, mut hi) = (1.0f64, 0.0f64);
        for i in 0..200_000u64 {
            t.insert(spread(i), i);
            if i >= 1_000 {
                let fill = t.len() as f64 / t.home_slots as f64;
                (lo, hi) = (lo.min(fill), hi.max(fill));
            }
        }
        assert!(lo >= 0.69 && hi <= 0.875, "fill from {lo} to {hi}");
        // A reserved total inserts without growing the home range.
        let mut t = ContentIndex::new();
        t.reserve(5_000);
        let homes = t.home_slots;
        for i in 0..5_000 {
            t.insert(spread(i), i);
        }
        assert_eq!(t.home_slots, homes);
        assert!(t.full());
    }

    /// Removals shrink the table in place once under 5/8 full, back to the
    /// 0.7 a growth leaves, keeping every entry reachable; `shrink_to`
    /// cuts a cleared table to what is wanted next.
    #[test]
    fn removals_shrink_in_place() {
        let mut t = ContentIndex::new();
        for i in 0..20_000u64 {
            t.insert(spread(i), i);
        }
        let big = t.bytes();
        let (mut lo, mut shrinks, mut homes) = (1.0f64, 0, t.home_slots);
        for i in 0..19_990u64 {
            assert_eq!(t.remove(spread(i)), Some(i));
            if t.home_slots != homes {
                assert!(t.home_slots < homes, "a removal grew the table");
                shrinks += 1;
                homes = t.home_slots;
                let fill = t.len() as f64 / t.home_slots as f64;
                assert!((0.6..0.72).contains(&fill) || t.home_slots == MIN_SLOTS, "fill {fill} after a shrink");
                t.check_invariant();
            }
            // (A table near the smallest size may be emptier: it does
            // not shrink below a growth's size for MIN_SLOTS homes.)
            if t.len() > 2 * MIN_SLOTS {
                lo = lo.min(t.len() as f64 / t.home_slots as f64);
            }
        }
        // From 0.7 to 5/8 is a tenth of the entries: about 70 shrinks for
        // 20000 -> 10, not one per removal.
        assert!((5..=100).contains(&shrinks) && lo >= 0.62, "{shrinks} shrinks, fill down to {lo}");
        assert!(t.bytes() < big / 100, "{} of {big} bytes kept", t.bytes());
        assert!((19_990..20_000).all(|i| t.get(spread(i)) == Some(i)));
        t.check_invariant();
        // A cleared table keeps its slots until shrink_to.
        let mut t = ContentIndex::new();
        for i in 0..10_000u64 {
            t.insert(spread(i), i);
        }
        t.clear();
        let cleared = t.bytes();
        t.shrink_to(100);
        assert!(t.bytes() < cleared / 50 && t.fits_total(100), "{} bytes", t.bytes());
        t.check_invariant();
    }

    /// The shrink limit is exact: a removal that leaves 5/8 of the homes
    /// filled keeps the table, the next one shrinks it.
    #[test]
    fn shrinks_just_below_five_eighths() {
        let mut t = ContentIndex::new();
        t.reserve(140); // 160 homes: 100 entries are 5/8 of them
        assert_eq!(t.home_slots, 160);
        for i in 0..102u64 {
            t.insert(spread(i), i);
        }
        t.remove(spread(0));
        t.remove(spread(1));
        assert_eq!((t.len(), t.home_slots), (100, 160), "shrank at 5/8");
        t.remove(spread(2));
        assert!(t.home_slots < 160, "99 of 160 did not shrink");
        assert_eq!(t.home_slots, ContentIndex::homes_for(99) * GROW_NUM / GROW_DEN);
        assert!((3..102).all(|i| t.get(spread(i)) == Some(i)));
        t.check_invariant();
    }

    /// A run past the last home lengthens the tail by half of it (at least
    /// MIN_TAIL) each time: a few resizes for many entries, and the tail
    /// stays within twice what it holds. A growth later drops a lengthened
    /// tail that is no longer needed.
    #[test]
    fn the_tail_lengthens_geometrically_and_growth_cuts_it() {
        let mut t = ContentIndex::new();
        t.reserve(1200); // 900 + 300 fit, and 900 are over 5/8 full
        let homes = t.home_slots;
        assert_eq!(t.slots.len(), homes + MIN_TAIL);
        for i in 0..900u64 {
            t.insert(spread(i), i);
        }
        let (mut resizes, mut len) = (0, t.slots.len());
        for v in 0..300 {
            t.insert_dup(u64::MAX, v);
            if t.slots.len() != len {
                (resizes, len) = (resizes + 1, t.slots.len());
            }
        }
        assert_eq!(t.home_slots, homes, "duplicates at the top grew the homes");
        let tail = t.slots.len() - homes;
        assert!((300..=600 + MIN_TAIL).contains(&tail), "a tail of {tail} for 300 duplicates");
        assert!((4..=8).contains(&resizes), "{resizes} tail resizes for 300 duplicates");
        t.check_invariant();
        // Without the duplicates (still over 5/8 full, so no shrink) a
        // growth leaves the ordinary tail.
        for v in (0..300).rev() {
            assert_eq!(t.remove(u64::MAX), Some(v));
        }
        assert_eq!((t.home_slots, t.slots.len()), (homes, homes + tail));
        let mut i = 900;
        while t.home_slots == homes {
            t.insert(spread(i), i);
            i += 1;
        }
        assert_eq!(t.slots.len(), t.home_slots + ContentIndex::tail_for(t.home_slots));
        assert!((0..i).all(|j| t.get(spread(j)) == Some(j)));
        t.check_invariant();
    }

    /// Prints the fill and size over a million inserts (for the record):
    /// `cargo test -p hvcore --release fill_over_a_million -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn fill_over_a_million_inserts() {
        let mut t = ContentIndex::new();
        let (mut lo, mut hi, mut sum, mut n, mut tails) = (1.0f64, 0.0f64, 0.0, 0, 0);
        let (mut homes, mut phys) = (0, 0);
        // splitmix64: random-looking keys, not the evenly spaced spread().
        let mut x = 0u64;
        let mut random = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let z = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) | 1
        };
        for i in 0..1_000_000u64 {
            t.insert(random(), i);
            if t.home_slots == homes && t.slots.len() != phys {
                tails += 1;
            }
            (homes, phys) = (t.home_slots, t.slots.len());
            if i >= 1_000 {
                let fill = t.len() as f64 / t.slots.len() as f64;
                (lo, hi, sum, n) = (lo.min(fill), hi.max(fill), sum + fill, n + 1);
            }
        }
        std::println!(
            "fill of all slots after 1000 inserts: min {lo:.3} max {hi:.3} avg {:.3}; at the end {} homes, {} slots, {:.2} bytes per entry; {tails} tail extensions",
            sum / n as f64,
            t.home_slots,
            t.slots.len(),
            t.bytes() as f64 / t.len() as f64
        );
    }

    /// Keys crowded into a few home slots, so runs spill into the tail and
    /// removal has to shift entries back from it.
    #[test]
    fn removal_keeps_crowded_runs_reachable() {
        let mut t = ContentIndex::new();
        t.reserve(8); // 16 homes: home = top 4 bits
        let top = |h: u64, n: u64| (h << 60) | (n << 1) | 1;
        let keys = [top(15, 1), top(15, 2), top(15, 3), top(0, 1), top(14, 1), top(15, 4)];
        for (i, &k) in keys.iter().enumerate() {
            t.insert(k, i as u64);
        }
        t.check_invariant();
        for (i, &k) in keys.iter().enumerate() {
            assert_eq!(t.remove(k), Some(i as u64));
            t.check_invariant();
            for (j, &rest) in keys.iter().enumerate().skip(i + 1) {
                assert_eq!(t.get(rest), Some(j as u64), "lost key {j} after removing {i}");
            }
        }
        assert_eq!(t.len(), 0);
    }

    /// A miss ends at the first larger key, not at the end of the run.
    #[test]
    fn a_miss_stops_at_the_first_larger_key() {
        let mut t = ContentIndex::new();
        t.reserve(14); // 16 homes
        // One run of 14 entries, all homed at slot 5.
        let key = |n: u64| (5 << 60) | (n << 2) | 1;
        for n in 0..14 {
            t.insert(key(n), n);
        }
        assert_eq!((t.seek(key(0)), t.seek(key(13))), (5, 18));
        let miss = key(3) + 2; // between key(3) and key(4)
        let at = t.seek(miss);
        assert_eq!((at, t.key_at(at)), (9, key(4)), "read 5 slots of the run, not 14");
        assert_eq!(t.get(miss), None);
        assert_eq!(t.find(miss, |_| true), None);
        // Beyond the run's largest key: the empty slot after it.
        assert_eq!((t.seek(key(13) + 2), t.get(key(13) + 2)), (19, None));
    }

    #[test]
    fn duplicates_are_found_newest_first() {
        let mut t = ContentIndex::new();
        let (k, other) = ((7 << 60) | 1, (7 << 60) | 3);
        t.insert(other, 100);
        for v in 1..=3 {
            t.insert_dup(k, v);
        }
        assert_eq!((t.get(k), t.len()), (Some(3), 4));
        let nth = |t: &ContentIndex, k, n| t.nth(k, n).map(|p| t.value_at(p));
        assert_eq!([0, 1, 2, 3].map(|n| nth(&t, k, n)), [Some(3), Some(2), Some(1), None], "k's entries only, newest first");
        assert_eq!([0, 1].map(|n| nth(&t, other, n)), [Some(100), None]);
        assert_eq!((t.nth(k - 2, 0), t.nth(other + 2, 0), ContentIndex::new().nth(k, 0)), (None, None, None));
        let (p1, p3) = (t.find(k, |v| v == 1).unwrap(), t.find(k, |v| v == 3).unwrap());
        assert!(p3 < p1);
        assert_eq!((t.key_at(p1), t.value_at(p1)), (k, 1));
        assert_eq!(t.find(k, |v| v > 10), None, "the other key's value is not k's");
        t.set_value_at(p1, 11);
        assert_eq!(t.find(k, |v| v > 10).map(|p| t.value_at(p)), Some(11));
        assert_eq!(t.remove(k), Some(3));
        assert_eq!(t.insert(k, 9), Some(2), "insert replaces the first");
        let mut all: Vec<_> = t.iter().collect();
        all.sort();
        assert_eq!(all, [(k, 9), (k, 11), (other, 100)]);
        let p = t.find(k, |v| v == 11).unwrap();
        assert_eq!(t.remove_at(p), (k, 11));
        assert_eq!((t.get(k), t.get(other), t.len()), (Some(9), Some(100), 2));
        t.check_invariant();
    }

    /// Removing from the middle of long runs (several of them merged)
    /// keeps the order and every other entry.
    #[test]
    fn remove_at_in_long_runs_keeps_the_layout() {
        let mut t = ContentIndex::new();
        t.reserve(200);
        let mut model = Vec::new();
        // 8 homes far apart get 20 keys each, some twice: runs merge.
        for h in 0..8u64 {
            for n in 0..20u64 {
                let k = (h << 61) | ((n % 15) << 2) | 1;
                t.insert_dup(k, h * 100 + n);
                model.push((k, h * 100 + n));
            }
        }
        t.check_invariant();
        let mut step = 0;
        while t.len() > 0 {
            // Somewhere in the middle of what is left.
            let occupied: Vec<usize> = (0..t.slots.len()).filter(|&i| t.slots[i][0] != EMPTY).collect();
            let pos = occupied[(occupied.len() / 2 + step % 7) % occupied.len()];
            let e = t.remove_at(pos);
            model.swap_remove(model.iter().position(|&m| m == e).unwrap());
            t.check_invariant();
            let mut have: Vec<_> = t.iter().collect();
            have.sort();
            let mut want = model.clone();
            want.sort();
            assert_eq!(have, want);
            step += 1;
        }
    }

    /// Keys at the very top all have the last home: they spill into the
    /// tail, and past it the tail lengthens.
    #[test]
    fn top_keys_land_in_the_tail() {
        let mut t = ContentIndex::new();
        t.reserve(14);
        let top = |n: u64| u64::MAX - 2 * n;
        t.insert(top(0), 0);
        assert_eq!(t.seek(top(0)), 15);
        for n in 1..14 {
            t.insert(top(n), n);
        }
        assert_eq!((t.home_slots, t.slots.len()), (16, 16 + MIN_TAIL), "14 entries fit at 16 homes");
        assert!(t.iter().zip(15..).all(|((k, _), i)| t.seek(k) == i));
        // Duplicates of u64::MAX beyond the tail: it lengthens.
        for v in 0..40 {
            t.insert_dup(u64::MAX, 100 + v);
        }
        assert!(t.slots.len() > t.home_slots + MIN_TAIL);
        t.check_invariant();
        assert_eq!(t.get(u64::MAX), Some(139));
        assert!((1..14).all(|n| t.get(top(n)) == Some(n)));
        for v in (0..40).rev() {
            assert_eq!(t.remove(u64::MAX), Some(100 + v));
        }
        assert_eq!(t.remove(u64::MAX), Some(0));
        assert_eq!(t.get(u64::MAX), None);
        t.check_invariant();
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u64),
        InsertDup(u64, u64),
        Remove(u64),
        /// find(key, value % 3 == r) then remove_at
        RemoveWhere(u64, u64),
        /// find(key, value % 3 == r) then set_value_at
        SetWhere(u64, u64, u64),
        Clear,
        Release,
        Reserve(usize),
    }

    /// Few distinct keys crowded in the top bits, plus some at the very
    /// top (one home, the tail), so runs are long and spill over the end.
    fn keys() -> Vec<u64> {
        let mut k: Vec<u64> = (0..16u64).flat_map(|h| (0..4u64).map(move |n| (h << 60) | (n << 1) | 1)).collect();
        k.extend((0..8).map(|n| u64::MAX - 2 * n));
        k
    }

    fn op() -> impl Strategy<Value = Op> {
        let key = proptest::sample::select(keys());
        let val = 0u64..6;
        prop_oneof![
            6 => (key.clone(), val.clone()).prop_map(|(k, v)| Op::Insert(k, v)),
            6 => (key.clone(), val.clone()).prop_map(|(k, v)| Op::InsertDup(k, v)),
            4 => key.clone().prop_map(Op::Remove),
            3 => (key.clone(), 0u64..3).prop_map(|(k, r)| Op::RemoveWhere(k, r)),
            2 => (key, 0u64..3, val).prop_map(|(k, r, v)| Op::SetWhere(k, r, v)),
            1 => Just(Op::Clear),
            1 => Just(Op::Release),
            1 => (0usize..120).prop_map(Op::Reserve),
        ]
    }

    proptest! {
        #[test]
        fn behaves_as_a_multimap(ops in proptest::collection::vec(op(), 1..300)) {
            let mut t = ContentIndex::new();
            // Each key's values, newest first.
            let mut m: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
            for o in ops {
                match o {
                    Op::Insert(k, v) => {
                        let vs = m.entry(k).or_default();
                        let old = vs.first_mut().map(|f| core::mem::replace(f, v));
                        if old.is_none() {
                            vs.push(v);
                        }
                        prop_assert_eq!(t.insert(k, v), old);
                    }
                    Op::InsertDup(k, v) => {
                        m.entry(k).or_default().insert(0, v);
                        let pos = t.insert_dup(k, v);
                        prop_assert_eq!((t.key_at(pos), t.value_at(pos)), (k, v));
                        prop_assert_eq!(t.find(k, |_| true), Some(pos), "the newest entry is found first");
                    }
                    Op::Remove(k) => {
                        let vs = m.entry(k).or_default();
                        let old = (!vs.is_empty()).then(|| vs.remove(0));
                        prop_assert_eq!(t.remove(k), old);
                    }
                    Op::RemoveWhere(k, r) => {
                        let vs = m.entry(k).or_default();
                        let want = vs.iter().position(|v| v % 3 == r);
                        let pos = t.find(k, |v| v % 3 == r);
                        prop_assert_eq!(pos.is_some(), want.is_some());
                        if let (Some(p), Some(i)) = (pos, want) {
                            prop_assert_eq!(t.remove_at(p), (k, vs.remove(i)));
                        }
                    }
                    Op::SetWhere(k, r, v) => {
                        let vs = m.entry(k).or_default();
                        let want = vs.iter().position(|v| v % 3 == r);
                        let pos = t.find(k, |v| v % 3 == r);
                        prop_assert_eq!(pos.is_some(), want.is_some());
                        if let (Some(p), Some(i)) = (pos, want) {
                            prop_assert_eq!((t.key_at(p), t.value_at(p)), (k, vs[i]));
                            t.set_value_at(p, v);
                            vs[i] = v;
                        }
                    }
                    Op::Clear => { t.clear(); m.clear(); }
                    Op::Release => { t.release(); m.clear(); prop_assert_eq!(t.bytes(), 0); }
                    Op::Reserve(n) => {
                        t.reserve(n);
                        prop_assert!(t.fits_total(n));
                    }
                }
                t.check_invariant();
                prop_assert_eq!(t.len(), m.values().map(Vec::len).sum::<usize>());
                prop_assert_eq!(t.full(), !t.fits_total(t.len() + 1));
                for k in keys() {
                    prop_assert_eq!(t.get(k), m.get(&k).and_then(|vs| vs.first().copied()));
                }
                let mut have: Vec<_> = t.iter().collect();
                have.sort();
                let mut want: Vec<_> = m.iter().flat_map(|(&k, vs)| vs.iter().map(move |&v| (k, v))).collect();
                want.sort();
                prop_assert_eq!(have, want);
            }
        }
    }

    /// A test-only global allocator that counts, per thread, the bytes a
    /// closure's allocations add at their peak (tests run in parallel, so
    /// global counts would mix). A realloc counts its change of size.
    mod counting {
        use std::alloc::{GlobalAlloc, Layout, System};
        use std::cell::Cell;

        struct PerThread;

        std::thread_local! {
            // Const-initialized and without Drop: no allocation and no
            // destructor, so the allocator may touch them at any time.
            static IN_USE: Cell<isize> = const { Cell::new(0) };
            static PEAK: Cell<isize> = const { Cell::new(0) };
        }

        fn add(bytes: isize) {
            let now = IN_USE.get() + bytes;
            IN_USE.set(now);
            PEAK.set(PEAK.get().max(now));
        }

        // SAFETY: every call is passed on to System unchanged; the wrapper
        // only updates per-thread counters.
        unsafe impl GlobalAlloc for PerThread {
            unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
                // SAFETY: the caller's contract for `alloc`.
                let p = unsafe { System.alloc(layout) };
                if !p.is_null() {
                    add(layout.size() as isize);
                }
                p
            }

            unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
                // SAFETY: the caller's contract for `alloc_zeroed`.
                let p = unsafe { System.alloc_zeroed(layout) };
                if !p.is_null() {
                    add(layout.size() as isize);
                }
                p
            }

            unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
                // SAFETY: the caller's contract for `dealloc`.
                unsafe { System.dealloc(ptr, layout) };
                add(-(layout.size() as isize));
            }

            unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
                // SAFETY: the caller's contract for `realloc`.
                let p = unsafe { System.realloc(ptr, layout, new_size) };
                if !p.is_null() {
                    add(new_size as isize - layout.size() as isize);
                }
                p
            }
        }

        #[global_allocator]
        static ALLOC: PerThread = PerThread;

        /// Runs `f`; returns the most bytes its allocations held at once
        /// beyond what was in use when it started, and its result.
        pub fn peak_during<R>(f: impl FnOnce() -> R) -> (usize, R) {
            let start = IN_USE.get();
            PEAK.set(start);
            let r = f();
            ((PEAK.get() - start) as usize, r)
        }
    }
}
