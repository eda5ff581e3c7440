//! A provider's `max_rps` across instances: every instance reserves the provider's next
//! request slot in one row (`provider_request_slots`), one atomic `UPDATE` per request,
//! and sleeps until its slot. Slots are at least one interval apart whichever instance
//! reserved them; idle time is not banked (a slot is never earlier than the server's now).

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{from_postgres, PgStore};
use crate::store::StoreError;

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1_000.0
}

impl PgStore {
    /// Reserves `provider`'s next request slot, `interval` after the one reserved before
    /// it (by any instance), and returns how long the caller waits for it (zero when the
    /// provider was idle).
    pub async fn reserve_request_slot(
        &self,
        provider: &str,
        interval: Duration,
    ) -> Result<Duration, StoreError> {
        let (slot, now) = self.reserve_slot(provider, interval).await?;
        Ok((slot - now).to_std().unwrap_or(Duration::ZERO))
    }

    /// The slot reserved and the server's time when it was: one statement.
    async fn reserve_slot(
        &self,
        provider: &str,
        interval: Duration,
    ) -> Result<(DateTime<Utc>, DateTime<Utc>), StoreError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "WITH clock AS (SELECT clock_timestamp() AS now)
                 INSERT INTO provider_request_slots AS s (provider, next_slot_at)
                 SELECT $1, clock.now + $2 * interval '1 millisecond' FROM clock
                 ON CONFLICT (provider) DO UPDATE
                    SET next_slot_at = GREATEST(s.next_slot_at, clock_timestamp())
                                       + $2 * interval '1 millisecond'
                 RETURNING next_slot_at - $2 * interval '1 millisecond', clock_timestamp()",
                &[&provider, &millis(interval)],
            )
            .await
            .map_err(|e| from_postgres(&e))?;
        let slot = row.try_get(0).map_err(|e| from_postgres(&e))?;
        let now = row.try_get(1).map_err(|e| from_postgres(&e))?;
        Ok((slot, now))
    }

    /// Pushes every later slot of `provider` to `wait` from now at the earliest (the
    /// provider answered 429 with `Retry-After`), for every instance.
    pub async fn defer_request_slots(
        &self,
        provider: &str,
        wait: Duration,
    ) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO provider_request_slots AS s (provider, next_slot_at)
                 VALUES ($1, clock_timestamp() + $2 * interval '1 millisecond')
                 ON CONFLICT (provider) DO UPDATE
                    SET next_slot_at = GREATEST(s.next_slot_at, EXCLUDED.next_slot_at)",
                &[&provider, &millis(wait)],
            )
            .await
            .map_err(|e| from_postgres(&e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::testing::TestDatabase;
    use super::PgStore;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_pools_reserving_at_once_never_get_slots_closer_than_the_interval() {
        let db = TestDatabase::create().await;
        let (a, b) = (db.migrated(4).await, db.store(4));
        let interval = Duration::from_millis(20);
        let reserve = |store: PgStore| async move {
            let mut slots = Vec::new();
            for _ in 0..40 {
                let (slot, _) = store.reserve_slot("fiserv", interval).await.expect("slot");
                slots.push(slot);
            }
            slots
        };
        let (from_a, from_b) = tokio::join!(
            tokio::spawn(reserve(a.clone())),
            tokio::spawn(reserve(b.clone())),
        );
        let mut slots = from_a.expect("a");
        slots.extend(from_b.expect("b"));
        slots.sort();
        let gap = chrono::Duration::from_std(interval).expect("gap");
        for pair in slots.windows(2) {
            assert!(pair[1] - pair[0] >= gap, "slots too close: {pair:?}");
        }
        assert_eq!(slots.len(), 80);

        // A wait is the slot's distance from now; a 429's deferral moves every later slot.
        b.defer_request_slots("fiserv", Duration::from_secs(30))
            .await
            .expect("defer");
        let wait = a
            .reserve_request_slot("fiserv", interval)
            .await
            .expect("reserve");
        assert!(wait > Duration::from_secs(25), "deferred: {wait:?}");
        let idle = a
            .reserve_request_slot("mannco", interval)
            .await
            .expect("reserve");
        assert_eq!(idle, Duration::ZERO, "an idle provider's slot is now");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_instances_pacers_share_max_rps() {
        use crate::providers::outbound::Pacer;

        let db = TestDatabase::create().await;
        let (a, b) = (db.migrated(4).await, db.store(4));
        let first = Pacer::new(50).across_instances(a, "fiserv");
        let second = Pacer::new(50).across_instances(b, "fiserv");
        async fn requests(pacer: &Pacer) {
            for _ in 0..10 {
                pacer.wait().await;
            }
        }
        let started = tokio::time::Instant::now();
        tokio::join!(requests(&first), requests(&second));
        // 20 requests at 50 per second between them: 19 intervals at least (each pacer
        // alone would have taken 9).
        assert!(
            started.elapsed() >= first.interval() * 19,
            "{:?} for 20 requests",
            started.elapsed()
        );
    }
}
