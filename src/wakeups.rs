//! Wake-ups across instances on one PostgreSQL store: a job woken in-process (a queued
//! status fetch, an alert pass asked for, alert deliveries queued) is also announced with
//! `NOTIFY`, and every instance `LISTEN`s and wakes its own job, so the instance holding
//! the work starts it at once instead of at its next periodic tick.
//!
//! A wake-up is a hint: when one is lost (the listener reconnecting, the store out of
//! reach) the job still runs at its tick. Outgoing wake-ups are coalesced (many wakes of
//! one job, one `NOTIFY`) and sent by one task, so a burst of webhooks costs a few round
//! trips. On SQLite there is one instance: nothing is relayed.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

use crate::store::postgres::notify::{Listener, Wake as Heard};
use crate::store::postgres::{from_postgres, PgStore};
use crate::store::StoreError;

/// A job one instance may wake on another.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Wake {
    /// A status fetch of this provider was queued.
    StatusFetch { provider: String },
    /// An alert pass was asked for (a conflict, a quarantine, a reconcile pass).
    AlertPass,
    /// Alert deliveries were queued.
    AlertOutbox,
}

const FETCH_CHANNEL: &str = "cashout_recon_fetch";
const ALERT_PASS_CHANNEL: &str = "cashout_recon_alert_pass";
const OUTBOX_CHANNEL: &str = "cashout_recon_alert_outbox";

/// How long the listener waits before reconnecting.
const LISTEN_RETRY: Duration = Duration::from_secs(1);

impl Wake {
    /// Every channel listened to.
    pub const CHANNELS: [&'static str; 3] = [FETCH_CHANNEL, ALERT_PASS_CHANNEL, OUTBOX_CHANNEL];

    fn channel(&self) -> &'static str {
        match self {
            Wake::StatusFetch { .. } => FETCH_CHANNEL,
            Wake::AlertPass => ALERT_PASS_CHANNEL,
            Wake::AlertOutbox => OUTBOX_CHANNEL,
        }
    }

    /// `<origin> <provider>` (the origin lets an instance ignore its own wake-ups).
    fn payload(&self, origin: &str) -> String {
        match self {
            Wake::StatusFetch { provider } => format!("{origin} {provider}"),
            Wake::AlertPass | Wake::AlertOutbox => origin.to_string(),
        }
    }

    /// The wake-up a notification carries and the instance that sent it.
    fn parse(channel: &str, payload: &str) -> Option<(Wake, String)> {
        let (origin, rest) = payload.split_once(' ').unwrap_or((payload, ""));
        let wake = match channel {
            FETCH_CHANNEL if !rest.is_empty() => Wake::StatusFetch {
                provider: rest.to_string(),
            },
            ALERT_PASS_CHANNEL => Wake::AlertPass,
            OUTBOX_CHANNEL => Wake::AlertOutbox,
            _ => return None,
        };
        Some((wake, origin.to_string()))
    }
}

/// Where a component's in-process wake-ups are also sent to the other instances: a no-op
/// until [`start`] connects it. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct WakeRelay {
    outgoing: Arc<OnceLock<mpsc::UnboundedSender<Wake>>>,
}

impl WakeRelay {
    /// Announces `wake` to the other instances (when connected).
    pub fn relay(&self, wake: Wake) {
        if let Some(outgoing) = self.outgoing.get() {
            let _ = outgoing.send(wake);
        }
    }

    fn connect(&self, outgoing: mpsc::UnboundedSender<Wake>) {
        let _ = self.outgoing.set(outgoing);
    }
}

/// This instance's jobs, woken when another instance announces work.
#[derive(Debug, Clone, Default)]
pub struct LocalWakers {
    /// Each provider's fetch worker.
    pub status_fetch: HashMap<String, Arc<Notify>>,
    pub alert_pass: Option<Arc<Notify>>,
    pub alert_outbox: Option<Arc<Notify>>,
}

impl LocalWakers {
    /// The wakers of a running daemon's jobs.
    pub fn of(state: &crate::app::AppState) -> LocalWakers {
        LocalWakers {
            status_fetch: state
                .poller
                .active_providers()
                .into_iter()
                .filter_map(|provider| {
                    let waker = state.poller.fetch_waker(&provider)?;
                    Some((provider, waker))
                })
                .collect(),
            alert_pass: Some(state.alerting.waker()),
            alert_outbox: Some(state.alerting.outbox_waker()),
        }
    }

    fn wake(&self, wake: &Wake) {
        let waker = match wake {
            Wake::StatusFetch { provider } => self.status_fetch.get(provider),
            Wake::AlertPass => self.alert_pass.as_ref(),
            Wake::AlertOutbox => self.alert_outbox.as_ref(),
        };
        if let Some(waker) = waker {
            waker.notify_one();
        }
    }

    fn wake_all(&self) {
        for waker in self
            .status_fetch
            .values()
            .chain(self.alert_pass.iter())
            .chain(self.alert_outbox.iter())
        {
            waker.notify_one();
        }
    }
}

/// The running relay: stops when dropped.
#[derive(Debug)]
pub struct CrossInstanceWakes {
    sender: JoinHandle<()>,
    receiver: JoinHandle<()>,
}

impl Drop for CrossInstanceWakes {
    fn drop(&mut self) {
        self.sender.abort();
        self.receiver.abort();
    }
}

/// Connects `relays` (the components that wake jobs in-process) to the other instances
/// on `store`, and wakes `local` when another instance announces work. The listener
/// holds a connection of its own, made as the store's are (its URL, its TLS).
pub fn start(store: PgStore, relays: &[&WakeRelay], local: LocalWakers) -> CrossInstanceWakes {
    let origin = store.claimer().to_string();
    let (outgoing, pending) = mpsc::unbounded_channel();
    for relay in relays {
        relay.connect(outgoing.clone());
    }
    let listen = store.connect_to().clone();
    let sender = tokio::spawn(send_wakes(store, origin.clone(), pending));
    let listener = Listener::start(
        listen,
        Wake::CHANNELS.iter().map(|c| c.to_string()).collect(),
        LISTEN_RETRY,
    );
    let receiver = tokio::spawn(receive_wakes(listener, origin, local));
    CrossInstanceWakes { sender, receiver }
}

/// [`start`] for a running daemon on PostgreSQL: relays the poller's and the alerting's
/// wake-ups and wakes their jobs; the listener connects as `store` does.
pub fn start_for_daemon(state: &crate::app::AppState, store: PgStore) -> CrossInstanceWakes {
    start(
        store,
        &[state.poller.wake_relay(), state.alerting.wake_relay()],
        LocalWakers::of(state),
    )
}

/// Sends what is pending, coalesced, one statement per batch.
async fn send_wakes(store: PgStore, origin: String, mut pending: mpsc::UnboundedReceiver<Wake>) {
    while let Some(first) = pending.recv().await {
        let mut batch = HashSet::from([first]);
        while let Ok(more) = pending.try_recv() {
            batch.insert(more);
        }
        if let Err(err) = notify_all(&store, &origin, &batch).await {
            // The others still run at their ticks.
            tracing::debug!(error = %err, "cannot announce wake-ups to the other instances");
        }
    }
}

async fn notify_all(
    store: &PgStore,
    origin: &str,
    batch: &HashSet<Wake>,
) -> Result<(), StoreError> {
    let (channels, payloads): (Vec<&str>, Vec<String>) = batch
        .iter()
        .map(|wake| (wake.channel(), wake.payload(origin)))
        .unzip();
    let client = store.client().await?;
    client
        .execute(
            "SELECT pg_notify(channel, payload) FROM unnest($1::text[], $2::text[]) AS w(channel, payload)",
            &[&channels, &payloads],
        )
        .await
        .map_err(|e| from_postgres(&e))?;
    Ok(())
}

/// Wakes the local job another instance announced; everything after a (re)subscription
/// (what was announced meanwhile is lost).
async fn receive_wakes(mut listener: Listener, origin: String, local: LocalWakers) {
    while let Some(heard) = listener.recv().await {
        match heard {
            Heard::Subscribed => local.wake_all(),
            Heard::Notified { channel, payload } => match Wake::parse(&channel, &payload) {
                Some((_, from)) if from == origin => {}
                Some((wake, _)) => local.wake(&wake),
                None => tracing::debug!(channel, "unknown wake-up ignored"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wake_survives_its_notification() {
        for wake in [
            Wake::StatusFetch {
                provider: "fiserv".into(),
            },
            Wake::AlertPass,
            Wake::AlertOutbox,
        ] {
            let parsed = Wake::parse(wake.channel(), &wake.payload("pool-a"));
            assert_eq!(parsed, Some((wake, "pool-a".to_string())));
        }
        assert_eq!(Wake::parse(FETCH_CHANNEL, "pool-a"), None);
        assert_eq!(Wake::parse("other", "pool-a"), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wake_on_one_instance_wakes_the_job_on_the_other() {
        use crate::store::postgres::testing::TestDatabase;

        let db = TestDatabase::create().await;
        let (a, b) = (db.migrated(2).await, db.store(2));
        let relay_a = WakeRelay::default();
        let a_fetch = Arc::new(Notify::new());
        let _a = start(
            a,
            &[&relay_a],
            LocalWakers {
                status_fetch: HashMap::from([("fiserv".to_string(), a_fetch.clone())]),
                ..LocalWakers::default()
            },
        );
        let b_fetch = Arc::new(Notify::new());
        let b_alerts = Arc::new(Notify::new());
        let _b = start(
            b,
            &[&WakeRelay::default()],
            LocalWakers {
                status_fetch: HashMap::from([("fiserv".to_string(), b_fetch.clone())]),
                alert_pass: Some(b_alerts.clone()),
                alert_outbox: None,
            },
        );
        let within = Duration::from_secs(20);
        // Both listeners subscribed (each wakes everything once when it does).
        tokio::time::timeout(within, a_fetch.notified())
            .await
            .expect("a subscribed");
        tokio::time::timeout(within, b_fetch.notified())
            .await
            .expect("b subscribed");
        tokio::time::timeout(within, b_alerts.notified())
            .await
            .expect("b subscribed");

        // Relayed until heard: the first NOTIFY may precede b's LISTEN on a busy machine.
        let relay_until = |notify: Arc<Notify>, wake: Wake| {
            let relay = relay_a.clone();
            async move {
                tokio::time::timeout(within, async {
                    loop {
                        relay.relay(wake.clone());
                        if tokio::time::timeout(Duration::from_millis(200), notify.notified())
                            .await
                            .is_ok()
                        {
                            return;
                        }
                    }
                })
                .await
            }
        };
        relay_until(
            b_fetch.clone(),
            Wake::StatusFetch {
                provider: "fiserv".into(),
            },
        )
        .await
        .expect("b's fetch worker woken by a's wake-up");
        relay_until(b_alerts.clone(), Wake::AlertPass)
            .await
            .expect("b's alert pass woken by a's wake-up");
    }
}
