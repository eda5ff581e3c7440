//! The SQLite store's replay cache: the nonces of the signed requests seen within the
//! replay window, held in memory by the writer and rebuilt from the event log at start.
//!
//! A nonce is a hash of a verified MAC: a table keyed by it gets one insert on a random
//! page per webhook, which was half of every group commit's pages. Here the durable record
//! is the event row itself (`events.replay_nonce`, no index), and the lookup structure is
//! this in-memory index, which follows the writer's transaction: claims of a group that
//! rolls back (or of a job whose savepoint does) are undone, so only committed nonces stay.
//! On open, [`ReplayIndex::load`] reads the nonces of the events received within the
//! window back from the tail of the log.
//!
//! Memory: 70–90 bytes per webhook received within the window (twice the longest provider
//! tolerance, at least 10 minutes, plus the one-minute bucket being filled; 89 bytes
//! measured for 2 million claims at 20,000/s from empty): ~1 MB at a million webhooks a
//! day, ~1 GB under a sustained 20,000 webhooks/s.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use rusqlite::{params, Connection};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::StoreError;

/// The index's key for (provider, nonce): 128 bits of SHA-256 over both.
type Key = u128;

/// Keys are uniformly random already: their low 64 bits are the hash.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*byte);
        }
    }

    fn write_u128(&mut self, key: u128) {
        self.0 = key as u64;
    }
}

type Holders = HashMap<Key, Holder, BuildHasherDefault<KeyHasher>>;

/// Nonces are kept in buckets of this much arrival time: pruning drops whole buckets.
const BUCKET_MS: i64 = 60_000;

/// A bucket never grows (growing a table of a million entries rehashes it while every
/// caller waits: a 50–100 ms stall under wrk): a full one is followed by a new one of
/// twice its capacity. A new minute's bucket starts with the capacity the last one
/// needed, at least this.
const MIN_BUCKET_CAPACITY: usize = 16_384;

/// Reading the log back at open stops after this many events in a row received before the
/// window.
const LOAD_STOP_AFTER: usize = 4096;

/// The event that claimed a nonce: our event ids are UUIDs (kept in 16 bytes); any other
/// text is kept as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Holder {
    Uuid(Uuid),
    Text(Box<str>),
}

impl Holder {
    fn new(event_id: &str) -> Holder {
        let mut text = Uuid::encode_buffer();
        match Uuid::parse_str(event_id) {
            Ok(uuid) if *uuid.hyphenated().encode_lower(&mut text) == *event_id => {
                Holder::Uuid(uuid)
            }
            _ => Holder::Text(event_id.into()),
        }
    }

    fn event_id(&self) -> String {
        match self {
            Holder::Uuid(uuid) => uuid.hyphenated().to_string(),
            Holder::Text(text) => text.to_string(),
        }
    }
}

/// Nonces first seen within one [`BUCKET_MS`] of arrival time (a busy minute has several).
#[derive(Debug)]
struct Bucket {
    /// Identifies the bucket for undoing a claim.
    id: u64,
    /// Arrival times in this bucket are at or after this (unix ms, a multiple of
    /// [`BUCKET_MS`]).
    start: i64,
    holders: Holders,
}

impl Bucket {
    fn new(id: u64, start: i64, capacity: usize) -> Bucket {
        Bucket {
            id,
            start,
            holders: Holders::with_capacity_and_hasher(capacity, Default::default()),
        }
    }
}

/// Committed nonces with their holders in arrival-time buckets, plus the claims of the
/// open transaction (already in their buckets, undone on rollback).
#[derive(Debug)]
pub struct ReplayIndex {
    /// Buckets no longer claimed into, oldest first.
    older: VecDeque<Bucket>,
    /// The bucket claims go into.
    current: Bucket,
    /// Claims of the open transaction, in claim order: (bucket id, key).
    pending: Vec<(u64, Key)>,
}

impl Default for ReplayIndex {
    fn default() -> Self {
        ReplayIndex {
            older: VecDeque::new(),
            current: Bucket::new(0, i64::MIN, 0),
            pending: Vec::new(),
        }
    }
}

/// Where the open transaction's claims stood (a job's savepoint).
#[derive(Clone, Copy, Debug)]
pub struct ClaimMark(usize);

impl ReplayIndex {
    fn key(provider: &str, nonce: &str) -> Key {
        let digest = Sha256::new()
            .chain_update(provider.as_bytes())
            .chain_update([0u8])
            .chain_update(nonce.as_bytes())
            .finalize();
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        u128::from_be_bytes(bytes)
    }

    /// Every bucket, oldest first.
    fn buckets(&self) -> impl DoubleEndedIterator<Item = &Bucket> {
        self.older.iter().chain(std::iter::once(&self.current))
    }

    fn holder(&self, key: Key) -> Option<&Holder> {
        self.buckets()
            .rev()
            .find_map(|bucket| bucket.holders.get(&key))
    }

    /// The bucket for an arrival at `seen_at`: the current one, or a new one after it (an
    /// arrival older than the current bucket joins it, so it is kept longer, never less).
    fn bucket_for(&mut self, seen_at: i64) -> &mut Bucket {
        let start = seen_at.div_euclid(BUCKET_MS) * BUCKET_MS;
        let current = &self.current;
        let next = if start > current.start {
            Some((start, current.holders.len()))
        } else if current.holders.len() >= current.holders.capacity() {
            Some((current.start, current.holders.capacity().saturating_mul(2)))
        } else {
            None
        };
        if let Some((start, capacity)) = next {
            let next = Bucket::new(current.id + 1, start, capacity.max(MIN_BUCKET_CAPACITY));
            let filled = std::mem::replace(&mut self.current, next);
            if !filled.holders.is_empty() {
                self.older.push_back(filled);
            }
        }
        &mut self.current
    }

    /// Claims (provider, nonce) for `event_id`: `None` when it was free (now claimed in
    /// the open transaction), else the event id of its holder.
    pub fn claim(
        &mut self,
        provider: &str,
        nonce: &str,
        event_id: &str,
        seen_at: i64,
    ) -> Option<String> {
        let key = ReplayIndex::key(provider, nonce);
        if let Some(holder) = self.holder(key) {
            return Some(holder.event_id());
        }
        let bucket = self.bucket_for(seen_at);
        bucket.holders.insert(key, Holder::new(event_id));
        let id = bucket.id;
        self.pending.push((id, key));
        None
    }

    /// The open transaction's claims so far.
    pub fn mark(&self) -> ClaimMark {
        ClaimMark(self.pending.len())
    }

    /// Undoes the claims made after `mark` (a job rolled back to its savepoint).
    pub fn undo_to(&mut self, mark: ClaimMark) {
        let from = mark.0.min(self.pending.len());
        for (id, key) in self.pending.drain(from..) {
            let bucket = std::iter::once(&mut self.current)
                .chain(self.older.iter_mut().rev())
                .find(|b| b.id == id);
            if let Some(bucket) = bucket {
                bucket.holders.remove(&key);
            }
        }
    }

    /// Undoes every claim of the open transaction (it rolled back or failed to commit).
    pub fn roll_back(&mut self) {
        self.undo_to(ClaimMark(0));
    }

    /// Keeps the open transaction's claims (it committed).
    pub fn commit(&mut self) {
        self.pending.clear();
    }

    /// Forgets the nonces of the buckets that ended at or before `before` (unix ms);
    /// returns how many. A nonce is forgotten up to one bucket later than asked, never
    /// earlier.
    pub fn prune(&mut self, before: i64) -> usize {
        let ended = |bucket: &Bucket| bucket.start.saturating_add(BUCKET_MS) <= before;
        let mut pruned = 0;
        while let Some(bucket) = self.older.pop_front() {
            if !ended(&bucket) {
                self.older.push_front(bucket);
                return pruned;
            }
            pruned += bucket.holders.len();
        }
        if ended(&self.current) {
            pruned += self.current.holders.len();
            self.current.holders = Holders::default();
        }
        pruned
    }

    /// Nonces held (committed and claimed in the open transaction).
    pub fn len(&self) -> usize {
        self.buckets().map(|bucket| bucket.holders.len()).sum()
    }

    /// Rebuilds the index from the events received at or after `since` (unix ms): the
    /// log is read backwards from its end until [`LOAD_STOP_AFTER`] events in a row were
    /// received before it (arrival order and log order differ slightly, and a clock step
    /// can reorder them more).
    pub fn load(connection: &Connection, since: i64) -> Result<ReplayIndex, StoreError> {
        let mut statement = connection.prepare(
            "SELECT provider, replay_nonce, event_id, received_at FROM events ORDER BY seq DESC",
        )?;
        let mut rows = statement.query(params![])?;
        let mut found = Vec::new();
        let mut older_in_a_row = 0;
        while let Some(row) = rows.next()? {
            let received_at: i64 = row.get(3)?;
            if received_at < since {
                older_in_a_row += 1;
                if older_in_a_row >= LOAD_STOP_AFTER {
                    break;
                }
                continue;
            }
            older_in_a_row = 0;
            let nonce: Option<String> = row.get(1)?;
            if let Some(nonce) = nonce {
                let provider: String = row.get(0)?;
                let event_id: String = row.get(2)?;
                found.push((received_at, provider, nonce, event_id));
            }
        }
        // Oldest first, so that the buckets follow arrival time.
        found.sort_by_key(|(received_at, ..)| *received_at);
        let mut index = ReplayIndex::default();
        for (received_at, provider, nonce, event_id) in found {
            index.claim(&provider, &nonce, &event_id, received_at);
        }
        index.commit();
        Ok(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "0190d9a4-5b7e-7c3a-9f10-2b3c4d5e6f70";

    #[test]
    fn a_nonce_is_held_once_per_provider_and_answers_its_holder() {
        let mut index = ReplayIndex::default();
        assert_eq!(index.claim("fiserv", "n1", UUID, 1_000), None);
        assert_eq!(
            index.claim("fiserv", "n1", "ev-2", 1_001),
            Some(UUID.to_string())
        );
        assert_eq!(index.claim("tupay", "n1", "ev-3", 1_002), None);
        assert_eq!(index.claim("fiserv", "n2", "ev-4", 1_003), None);
        assert_eq!(
            index.claim("fiserv", "n2", "ev-5", 1_004),
            Some("ev-4".to_string())
        );
    }

    #[test]
    fn claims_follow_the_transaction() {
        let mut index = ReplayIndex::default();
        index.claim("p", "kept", "ev-1", 1);
        let mark = index.mark();
        index.claim("p", "undone", "ev-2", 2);
        index.undo_to(mark);
        assert_eq!(index.claim("p", "undone", "ev-3", 3), None);
        index.commit();
        assert_eq!(index.len(), 2);

        index.claim("p", "rolled-back", "ev-4", 4);
        index.roll_back();
        assert_eq!(index.len(), 2);
        assert_eq!(index.claim("p", "rolled-back", "ev-5", 5), None);
        assert_eq!(
            index.claim("p", "kept", "ev-6", 6),
            Some("ev-1".to_string())
        );
        assert_eq!(
            index.claim("p", "undone", "ev-7", 7),
            Some("ev-3".to_string())
        );
    }

    #[test]
    fn pruning_forgets_what_was_seen_before_the_cutoff() {
        let mut index = ReplayIndex::default();
        for (n, seen_at) in [10, 20, 30].into_iter().enumerate() {
            index.claim("p", &format!("n{n}"), "ev", seen_at);
        }
        index.commit();
        assert_eq!(index.prune(25), 0, "the first bucket ends at {BUCKET_MS}");
        let later = BUCKET_MS * 3;
        index.claim("p", "late", "ev-late", later);
        index.commit();
        assert_eq!(index.prune(BUCKET_MS), 3);
        assert_eq!(index.len(), 1);
        assert_eq!(index.claim("p", "n0", "ev-new", later), None);
        assert_eq!(
            index.claim("p", "late", "ev-new", later),
            Some("ev-late".to_string())
        );
        index.commit();
        assert_eq!(index.prune(later * 10), 2);
        assert_eq!(index.len(), 0);
    }

    #[test]
    fn a_full_bucket_is_followed_by_a_bigger_one_never_grown() {
        let mut index = ReplayIndex::default();
        let claims = MIN_BUCKET_CAPACITY * 4;
        for n in 0..claims {
            assert_eq!(index.claim("p", &format!("n{n}"), "ev", 5), None);
        }
        index.commit();
        assert!(
            index.buckets().count() >= 2,
            "{} buckets",
            index.buckets().count()
        );
        for bucket in index.buckets() {
            assert!(bucket.holders.len() <= bucket.holders.capacity());
        }
        assert_eq!(index.len(), claims);
        for n in [0, claims / 2, claims - 1] {
            assert_eq!(
                index.claim("p", &format!("n{n}"), "x", 6),
                Some("ev".to_string())
            );
        }
        // A claim undone in an older bucket of the same minute is found and removed.
        let mark = index.mark();
        index.claim("p", "late", "ev-late", 7);
        index.undo_to(mark);
        assert_eq!(index.len(), claims);
        assert_eq!(index.claim("p", "late", "ev-again", 7), None);
    }

    #[test]
    fn a_books_replay_cache_table_moves_onto_its_events_and_is_read_back_at_open() {
        let mut connection = Connection::open_in_memory().expect("db");
        let migrations = crate::store::schema::migrations();
        migrations
            .to_version(&mut connection, 7)
            .expect("the book before");
        let now = chrono::Utc::now().timestamp_millis();
        connection
            .execute_batch(&format!(
                "INSERT INTO events (event_id, provider, source, body_sha256, outcome, received_at)
                 VALUES ('{UUID}', 'fiserv', 'webhook', 'sha', 'applied', {now}),
                        ('ev-old', 'fiserv', 'webhook', 'sha', 'applied', {old}),
                        ('ev-poll', 'fiserv', 'poll', NULL, 'applied', {now});
                 INSERT INTO replay_cache VALUES ('fiserv', 'n-1', 'sha', '{UUID}', {now}),
                                                 ('fiserv', 'n-old', 'sha', 'ev-old', {old});",
                old = now - 3_600_000
            ))
            .expect("rows");
        migrations.to_latest(&mut connection).expect("migrated");

        let mut index = ReplayIndex::load(&connection, now - 600_000).expect("loaded");

        assert_eq!(index.len(), 1, "only the nonces of the window");
        assert_eq!(
            index.claim("fiserv", "n-1", "ev-new", now),
            Some(UUID.to_string())
        );
        assert_eq!(index.claim("fiserv", "n-old", "ev-new", now), None);
    }

    #[test]
    fn holders_keep_their_event_ids_exactly() {
        for event_id in [UUID, "ev-1", "0190D9A4-5B7E-7C3A-9F10-2B3C4D5E6F70", ""] {
            assert_eq!(Holder::new(event_id).event_id(), event_id);
        }
        assert!(matches!(Holder::new(UUID), Holder::Uuid(_)));
    }
}
