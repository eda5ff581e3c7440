//! Alert signals across instances (PostgreSQL): each instance publishes its in-memory
//! [`AlertSignals`] into `provider_signals` about once a second (and when it stops), never
//! on the webhook hot path; the alert pass and the console merge every other instance's
//! published signals with their own live ones ([`merge`]). On SQLite there is one instance
//! and nothing to publish or read.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::signals::{AlertSignals, SignalSnapshot};
use crate::store::postgres::PgStore;
use crate::store::{Store, StoreError};

/// How often an instance publishes its signals.
pub const PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// How recently an instance must have published for its rejection rates to count (its
/// times count however old: what a stopped instance saw stays true).
pub const FRESH_FOR: Duration = Duration::from_secs(5);

/// How long an instance must have been silent before its published rows may be
/// forgotten ([`retired`]): it has stopped (a running one publishes every second).
pub const RETIRE_AFTER: Duration = Duration::from_secs(3600);

/// One provider's signals as another instance last published them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSignals {
    pub instance: String,
    pub provider: String,
    pub signals: SignalSnapshot,
    /// How long ago it published them, by the database's clock (instances' clocks may
    /// differ).
    pub age: Duration,
}

impl PeerSignals {
    fn is_fresh(&self) -> bool {
        self.age <= FRESH_FOR
    }
}

/// One provider's signals over every instance: this instance's `local` ones and what
/// `peers` published for the same provider. The last webhook and the last successful poll
/// are the latest any instance saw (a stopped instance's included); poll failures and the
/// last error come from the instance whose poll cycle finished last (the poll lease's
/// holder, or its latest); rejection counts are summed over this instance and the peers
/// that published within [`FRESH_FOR`] (a stopped instance no longer counts). A rate is
/// unknown only when it is unknown everywhere it counts.
pub fn merge<'a>(
    local: &SignalSnapshot,
    peers: impl IntoIterator<Item = &'a PeerSignals>,
) -> SignalSnapshot {
    let mut merged = local.clone();
    for peer in peers {
        let theirs = &peer.signals;
        merged.last_webhook_at = merged.last_webhook_at.max(theirs.last_webhook_at);
        merged.last_poll_ok_at = merged.last_poll_ok_at.max(theirs.last_poll_ok_at);
        if theirs.last_poll_at > merged.last_poll_at {
            merged.last_poll_at = theirs.last_poll_at;
            merged.consecutive_poll_failures = theirs.consecutive_poll_failures;
            merged.last_poll_error = theirs.last_poll_error.clone();
        }
        if peer.is_fresh() {
            merged.rejections_last_minute =
                match (merged.rejections_last_minute, theirs.rejections_last_minute) {
                    (Some(ours), Some(more)) => Some(ours.saturating_add(more)),
                    (known, None) | (None, known) => known,
                };
            merged.rejections_last_hour = merged
                .rejections_last_hour
                .saturating_add(theirs.rejections_last_hour);
        }
    }
    merged
}

/// Whether `newer` gives [`merge`] everything `older` would, once `older` no longer counts
/// for rejections: a last webhook and a last successful poll at least as late, and a
/// later poll cycle (so `older`'s failures could not be the ones that stand).
fn covers(newer: &SignalSnapshot, older: &SignalSnapshot) -> bool {
    newer.last_webhook_at >= older.last_webhook_at
        && newer.last_poll_ok_at >= older.last_poll_ok_at
        && (older.last_poll_at.is_none() || newer.last_poll_at > older.last_poll_at)
}

/// The rows of stopped instances that can be forgotten without changing any merge: silent
/// for longer than [`RETIRE_AFTER`] and covered by what this instance (`local`, per
/// provider) or an instance still publishing knows. A stopped instance's row that still
/// holds the latest fact of its provider stays, so the table keeps at most a few rows per
/// provider however often instances restart (each start is a new instance).
pub fn retired(peers: &[PeerSignals], local: impl Fn(&str) -> SignalSnapshot) -> Vec<&PeerSignals> {
    peers
        .iter()
        .filter(|peer| peer.age > RETIRE_AFTER)
        .filter(|peer| {
            covers(&local(&peer.provider), &peer.signals)
                || peers.iter().any(|other| {
                    other.provider == peer.provider
                        && other.age <= RETIRE_AFTER
                        && covers(&other.signals, &peer.signals)
                })
        })
        .collect()
}

/// What the other instances published, ready to merge provider by provider.
#[derive(Clone, Debug, Default)]
pub struct SharedSignals {
    peers: Vec<PeerSignals>,
}

impl SharedSignals {
    /// Reads what the other instances published (nothing on SQLite).
    pub async fn load(store: &Store) -> Result<SharedSignals, StoreError> {
        Ok(SharedSignals {
            peers: store.peer_signals().await?,
        })
    }

    /// The stopped instances' rows that [`retired`] lets go, as `(instance, provider)`.
    pub fn retired(&self, local: &AlertSignals, now_ms: i64) -> Vec<(String, String)> {
        retired(&self.peers, |provider| local.snapshot(provider, now_ms))
            .into_iter()
            .map(|peer| (peer.instance.clone(), peer.provider.clone()))
            .collect()
    }

    /// `provider`'s signals at `now_ms` over every instance (`local` is this one's).
    pub fn snapshot(&self, local: &AlertSignals, provider: &str, now_ms: i64) -> SignalSnapshot {
        merge(
            &local.snapshot(provider, now_ms),
            self.peers.iter().filter(|p| p.provider == provider),
        )
    }
}

/// The task publishing this instance's signals; [`SignalPublisher::stop`] publishes them
/// one last time.
pub struct SignalPublisher {
    store: PgStore,
    signals: Arc<AlertSignals>,
    task: JoinHandle<()>,
}

impl SignalPublisher {
    /// Publishes `signals` every [`PUBLISH_EVERY`] as the pool's instance.
    pub fn start(store: PgStore, signals: Arc<AlertSignals>) -> SignalPublisher {
        let task = tokio::spawn(publish_every_second(store.clone(), signals.clone()));
        SignalPublisher {
            store,
            signals,
            task,
        }
    }

    /// Stops publishing after one last publication (at shutdown, before the pool closes).
    pub async fn stop(self) {
        self.task.abort();
        publish(&self.store, &self.signals).await;
    }
}

impl Drop for SignalPublisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn publish_every_second(store: PgStore, signals: Arc<AlertSignals>) {
    let mut ticks = tokio::time::interval(PUBLISH_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        publish(&store, &signals).await;
    }
}

async fn publish(store: &PgStore, signals: &AlertSignals) {
    let snapshots = signals.snapshots(chrono::Utc::now().timestamp_millis());
    if let Err(err) = store.publish_signals(snapshots).await {
        // The next tick publishes again; meanwhile the others read the previous ones.
        tracing::debug!(error = %err, "cannot publish the alert signals to the other instances");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(signals: SignalSnapshot, age_secs: u64) -> PeerSignals {
        PeerSignals {
            instance: "b".to_string(),
            provider: "fiserv".to_string(),
            signals,
            age: Duration::from_secs(age_secs),
        }
    }

    fn aged(instance: &str, signals: SignalSnapshot, age_secs: u64) -> PeerSignals {
        PeerSignals {
            instance: instance.to_string(),
            ..peer(signals, age_secs)
        }
    }

    fn seen(webhook: Option<i64>, poll: Option<i64>, poll_ok: Option<i64>) -> SignalSnapshot {
        SignalSnapshot {
            last_webhook_at: webhook,
            last_poll_at: poll,
            last_poll_ok_at: poll_ok,
            ..SignalSnapshot::default()
        }
    }

    #[test]
    fn a_stopped_instance_is_forgotten_once_it_adds_nothing_to_the_merge() {
        let hour = RETIRE_AFTER.as_secs();
        let local = |_: &str| seen(Some(5_000), Some(6_000), Some(6_000));
        let peers = vec![
            // Stopped, everything it saw is older than what this instance knows.
            aged("old", seen(Some(1_000), Some(2_000), Some(2_000)), hour + 1),
            // Stopped, but it saw the provider's latest webhook: kept.
            aged("latest-webhook", seen(Some(9_000), None, None), hour + 1),
            // Silent for less than the hour: kept, whatever it saw.
            aged("recent", seen(Some(1_000), None, None), hour - 1),
            // Stopped, its poll cycle is the last one that ran anywhere: kept (its
            // failures are the ones that stand).
            aged("last-poll", seen(None, Some(7_000), Some(1_000)), hour + 1),
            // Stopped, covered by an instance still publishing (not by this one).
            aged("covered-by-peer", seen(Some(8_500), None, None), hour + 1),
        ];
        let mut peers = peers;
        peers.push(aged("publishing", seen(Some(8_600), None, None), 1));

        let gone: Vec<&str> = retired(&peers, local)
            .into_iter()
            .map(|p| p.instance.as_str())
            .collect();
        assert_eq!(gone, ["old", "covered-by-peer"]);

        // Forgetting them changes no merge.
        let kept: Vec<PeerSignals> = peers
            .iter()
            .filter(|p| !gone.contains(&p.instance.as_str()))
            .cloned()
            .collect();
        assert_eq!(
            merge(&local("fiserv"), &kept),
            merge(&local("fiserv"), &peers)
        );
    }

    #[test]
    fn two_stopped_instances_that_saw_the_same_do_not_retire_each_other() {
        let hour = RETIRE_AFTER.as_secs();
        let nothing = |_: &str| SignalSnapshot::default();
        let peers = vec![
            aged("a", seen(Some(1_000), None, None), hour + 1),
            aged("b", seen(Some(1_000), None, None), hour + 1),
        ];
        assert!(retired(&peers, nothing).is_empty());
    }

    #[test]
    fn two_instances_signals_merge_into_one() {
        // A holds the alerts lease and polls; B receives the webhooks and is rejecting some.
        let a = SignalSnapshot {
            rejections_last_minute: Some(3),
            rejections_last_hour: 10,
            last_webhook_at: Some(1_000),
            consecutive_poll_failures: Some(2),
            last_poll_error: Some("503".to_string()),
            last_poll_at: Some(9_000),
            last_poll_ok_at: Some(5_000),
        };
        let b = SignalSnapshot {
            rejections_last_minute: Some(4),
            rejections_last_hour: 20,
            last_webhook_at: Some(8_000),
            consecutive_poll_failures: Some(0),
            last_poll_error: None,
            last_poll_at: Some(6_000),
            last_poll_ok_at: Some(6_000),
        };

        let merged = merge(&a, [&peer(b, 1)]);

        assert_eq!(
            merged,
            SignalSnapshot {
                rejections_last_minute: Some(7),
                rejections_last_hour: 30,
                last_webhook_at: Some(8_000),
                // A's cycle finished last: its failures stand; B's success is older.
                consecutive_poll_failures: Some(2),
                last_poll_error: Some("503".to_string()),
                last_poll_at: Some(9_000),
                last_poll_ok_at: Some(6_000),
            }
        );
    }

    #[test]
    fn the_latest_poll_cycle_decides_poll_health_wherever_it_ran() {
        let local = SignalSnapshot::default();
        let polling = SignalSnapshot {
            consecutive_poll_failures: Some(4),
            last_poll_error: Some("timeout".to_string()),
            last_poll_at: Some(2_000),
            last_poll_ok_at: Some(100),
            ..SignalSnapshot::default()
        };

        let merged = merge(&local, [&peer(polling, 0)]);

        assert_eq!(merged.consecutive_poll_failures, Some(4));
        assert_eq!(merged.last_poll_error.as_deref(), Some("timeout"));
        assert_eq!(merged.last_poll_ok_at, Some(100));
    }

    #[test]
    fn a_stale_instance_keeps_its_times_but_not_its_rates() {
        let local = SignalSnapshot {
            rejections_last_minute: None,
            ..SignalSnapshot::default()
        };
        let stopped = SignalSnapshot {
            rejections_last_minute: Some(50),
            rejections_last_hour: 80,
            last_webhook_at: Some(7_000),
            ..SignalSnapshot::default()
        };

        let merged = merge(&local, [&peer(stopped.clone(), 60)]);

        assert_eq!(
            merged.rejections_last_minute, None,
            "unknown here, stale there"
        );
        assert_eq!(merged.rejections_last_hour, 0);
        assert_eq!(
            merged.last_webhook_at,
            Some(7_000),
            "its last webhook stays true"
        );
        let fresh = merge(&local, [&peer(stopped, 2)]);
        assert_eq!(fresh.rejections_last_minute, Some(50));
        assert_eq!(fresh.rejections_last_hour, 80);
    }
}
