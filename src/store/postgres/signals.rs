//! The alert signals each instance publishes for the others (see
//! [`crate::alert::shared`]): one upsert of every provider's row of this pool's instance,
//! and a read of every other instance's rows with their age by the server's clock.

use std::time::Duration;

use super::{from_postgres, PgStore};
use crate::alert::shared::PeerSignals;
use crate::alert::signals::SignalSnapshot;
use crate::store::StoreError;

fn count(value: u32) -> i64 {
    i64::from(value)
}

fn stored_count(value: i64) -> u32 {
    u32::try_from(value.max(0)).unwrap_or(u32::MAX)
}

impl PgStore {
    /// Publishes this instance's ([`PgStore::claimer`]) signals of every provider in
    /// `signals`: one statement, replacing what it published before.
    pub async fn publish_signals(
        &self,
        signals: Vec<(String, SignalSnapshot)>,
    ) -> Result<(), StoreError> {
        if signals.is_empty() {
            return Ok(());
        }
        let providers: Vec<&str> = signals.iter().map(|(p, _)| p.as_str()).collect();
        let column = |f: fn(&SignalSnapshot) -> Option<i64>| -> Vec<Option<i64>> {
            signals.iter().map(|(_, s)| f(s)).collect()
        };
        let last_webhook_at = column(|s| s.last_webhook_at);
        let last_poll_at = column(|s| s.last_poll_at);
        let last_poll_ok_at = column(|s| s.last_poll_ok_at);
        let failures = column(|s| s.consecutive_poll_failures.map(count));
        let last_minute = column(|s| s.rejections_last_minute.map(count));
        let last_hour: Vec<i64> = signals
            .iter()
            .map(|(_, s)| count(s.rejections_last_hour))
            .collect();
        let errors: Vec<Option<&str>> = signals
            .iter()
            .map(|(_, s)| s.last_poll_error.as_deref())
            .collect();
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO provider_signals AS s (instance, provider, last_webhook_at,
                    last_poll_at, last_poll_ok_at, consecutive_poll_failures, last_poll_error,
                    rejections_last_minute, rejections_last_hour, published_at)
                 SELECT $1, p.*, clock_timestamp()
                 FROM unnest($2::text[], $3::int8[], $4::int8[], $5::int8[], $6::int8[],
                             $7::text[], $8::int8[], $9::int8[])
                   AS p(provider, last_webhook_at, last_poll_at, last_poll_ok_at,
                        consecutive_poll_failures, last_poll_error, rejections_last_minute,
                        rejections_last_hour)
                 ON CONFLICT (instance, provider) DO UPDATE SET
                    last_webhook_at = EXCLUDED.last_webhook_at,
                    last_poll_at = EXCLUDED.last_poll_at,
                    last_poll_ok_at = EXCLUDED.last_poll_ok_at,
                    consecutive_poll_failures = EXCLUDED.consecutive_poll_failures,
                    last_poll_error = EXCLUDED.last_poll_error,
                    rejections_last_minute = EXCLUDED.rejections_last_minute,
                    rejections_last_hour = EXCLUDED.rejections_last_hour,
                    published_at = EXCLUDED.published_at",
                &[
                    &self.claimer(),
                    &providers,
                    &last_webhook_at,
                    &last_poll_at,
                    &last_poll_ok_at,
                    &failures,
                    &errors,
                    &last_minute,
                    &last_hour,
                ],
            )
            .await
            .map_err(|e| from_postgres(&e))?;
        Ok(())
    }

    /// Deletes the rows of `rows` (`(instance, provider)`) not published for longer than
    /// `silent_for` by the server's clock (a row published again meanwhile stays).
    pub async fn forget_peer_signals(
        &self,
        rows: &[(String, String)],
        silent_for: Duration,
    ) -> Result<u64, StoreError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let (instances, providers): (Vec<&str>, Vec<&str>) =
            rows.iter().map(|(i, p)| (i.as_str(), p.as_str())).unzip();
        let silent_ms = i64::try_from(silent_for.as_millis()).unwrap_or(i64::MAX);
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM provider_signals s
                 USING unnest($1::text[], $2::text[]) AS r(instance, provider)
                 WHERE s.instance = r.instance AND s.provider = r.provider
                   AND s.published_at < clock_timestamp() - $3::bigint * interval '1 millisecond'",
                &[&instances, &providers, &silent_ms],
            )
            .await
            .map_err(|e| from_postgres(&e))
    }

    /// What every other instance published (stopped ones included), with its age.
    pub async fn peer_signals(&self) -> Result<Vec<PeerSignals>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT instance, provider, last_webhook_at, last_poll_at, last_poll_ok_at,
                        consecutive_poll_failures, last_poll_error, rejections_last_minute,
                        rejections_last_hour,
                        GREATEST(0, (extract(epoch FROM clock_timestamp() - published_at)
                                     * 1000)::bigint)
                 FROM provider_signals WHERE instance <> $1",
                &[&self.claimer()],
            )
            .await
            .map_err(|e| from_postgres(&e))?;
        rows.iter()
            .map(|row| {
                let failures: Option<i64> = row.try_get(5)?;
                let last_minute: Option<i64> = row.try_get(7)?;
                let age_ms: i64 = row.try_get(9)?;
                Ok(PeerSignals {
                    instance: row.try_get(0)?,
                    provider: row.try_get(1)?,
                    signals: SignalSnapshot {
                        last_webhook_at: row.try_get(2)?,
                        last_poll_at: row.try_get(3)?,
                        last_poll_ok_at: row.try_get(4)?,
                        consecutive_poll_failures: failures.map(stored_count),
                        last_poll_error: row.try_get(6)?,
                        rejections_last_minute: last_minute.map(stored_count),
                        rejections_last_hour: stored_count(row.try_get(8)?),
                    },
                    age: Duration::from_millis(u64::try_from(age_ms).unwrap_or(0)),
                })
            })
            .collect::<Result<_, tokio_postgres::Error>>()
            .map_err(|e| from_postgres(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::TestDatabase;
    use super::PgStore;
    use crate::alert::shared::merge;
    use crate::alert::signals::SignalSnapshot;

    /// Dates `publisher`'s rows back by `interval` (a PostgreSQL interval), as if it had
    /// last published that long ago.
    async fn published_ago(publisher: &PgStore, interval: &str) {
        publisher
            .client()
            .await
            .expect("client")
            .execute(
                "UPDATE provider_signals SET published_at = now() - $2::text::interval
                 WHERE instance = $1",
                &[&publisher.claimer(), &interval],
            )
            .await
            .expect("rows dated back");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_instances_publish_and_each_reads_the_other_merged() {
        let db = TestDatabase::create().await;
        let (a, b) = (db.migrated(2).await, db.store(2));
        let webhooks_on_b = SignalSnapshot {
            rejections_last_minute: Some(4),
            rejections_last_hour: 9,
            last_webhook_at: Some(8_000),
            ..SignalSnapshot::default()
        };
        let polling_on_a = SignalSnapshot {
            consecutive_poll_failures: Some(3),
            last_poll_error: Some("503 from the provider".to_string()),
            last_poll_at: Some(7_000),
            last_poll_ok_at: Some(1_000),
            rejections_last_minute: Some(1),
            rejections_last_hour: 1,
            ..SignalSnapshot::default()
        };
        b.publish_signals(vec![
            ("fiserv".to_string(), webhooks_on_b.clone()),
            ("tupay".to_string(), SignalSnapshot::default()),
        ])
        .await
        .expect("b publishes");
        a.publish_signals(vec![("fiserv".to_string(), polling_on_a.clone())])
            .await
            .expect("a publishes");

        let seen_by_a = a.peer_signals().await.expect("a reads");
        assert_eq!(
            seen_by_a.len(),
            2,
            "b's two rows, not a's own: {seen_by_a:?}"
        );
        assert!(seen_by_a.iter().all(|p| p.instance == b.claimer()));
        let fiserv = seen_by_a
            .iter()
            .find(|p| p.provider == "fiserv")
            .expect("fiserv");
        assert_eq!(fiserv.signals, webhooks_on_b, "stored as published");
        let merged = merge(
            &polling_on_a,
            seen_by_a.iter().filter(|p| p.provider == "fiserv"),
        );
        assert_eq!(merged.last_webhook_at, Some(8_000));
        assert_eq!(merged.consecutive_poll_failures, Some(3));
        assert_eq!(merged.rejections_last_minute, Some(5));
        assert_eq!(merged.rejections_last_hour, 10);

        // Publishing again replaces the row; a stale instance's rates drop out, its last
        // webhook stays.
        b.publish_signals(vec![(
            "fiserv".to_string(),
            SignalSnapshot {
                last_webhook_at: Some(9_000),
                ..webhooks_on_b
            },
        )])
        .await
        .expect("b publishes again");
        published_ago(&b, "1 minute").await;
        let seen_by_a = a.peer_signals().await.expect("a reads");
        let merged = merge(
            &polling_on_a,
            seen_by_a.iter().filter(|p| p.provider == "fiserv"),
        );
        assert_eq!(
            merged.last_webhook_at,
            Some(9_000),
            "the stale row's fact stays"
        );
        assert_eq!(merged.rejections_last_minute, Some(1), "only a's own rate");
        assert_eq!(merged.rejections_last_hour, 1);
        let seen_by_b = b.peer_signals().await.expect("b reads");
        assert_eq!(seen_by_b.len(), 1, "{seen_by_b:?}");
        assert_eq!(seen_by_b[0].signals, polling_on_a);
        assert!(seen_by_b[0].age < std::time::Duration::from_secs(60));
    }

    #[tokio::test]
    async fn a_stopped_instance_s_rows_are_forgotten_once_they_add_nothing() {
        use crate::alert::shared::{retired, RETIRE_AFTER};
        let db = TestDatabase::create().await;
        let (a, stopped) = (db.migrated(2).await, db.store(2));
        let seen = |webhook: i64| SignalSnapshot {
            last_webhook_at: Some(webhook),
            ..SignalSnapshot::default()
        };
        // The stopped instance saw an old fiserv webhook and tupay's latest one.
        stopped
            .publish_signals(vec![
                ("fiserv".to_string(), seen(1_000)),
                ("tupay".to_string(), seen(9_000)),
            ])
            .await
            .expect("publishes");
        published_ago(&stopped, "2 hours").await;

        let peers = a.peer_signals().await.expect("a reads");
        let local = |provider: &str| seen(if provider == "fiserv" { 5_000 } else { 2_000 });
        let gone: Vec<(String, String)> = retired(&peers, local)
            .into_iter()
            .map(|p| (p.instance.clone(), p.provider.clone()))
            .collect();
        assert_eq!(
            gone,
            [(stopped.claimer().to_string(), "fiserv".to_string())]
        );
        assert_eq!(
            a.forget_peer_signals(&gone, RETIRE_AFTER)
                .await
                .expect("forget"),
            1
        );
        let left: Vec<String> = a
            .peer_signals()
            .await
            .expect("a reads")
            .into_iter()
            .map(|p| p.provider)
            .collect();
        assert_eq!(
            left,
            ["tupay"],
            "the row holding tupay's latest webhook stays"
        );

        // A row published again meanwhile is not forgotten.
        stopped
            .publish_signals(vec![("tupay".to_string(), seen(9_500))])
            .await
            .expect("publishes again");
        let again = [(stopped.claimer().to_string(), "tupay".to_string())];
        assert_eq!(
            a.forget_peer_signals(&again, RETIRE_AFTER)
                .await
                .expect("forget"),
            0
        );
    }
}
