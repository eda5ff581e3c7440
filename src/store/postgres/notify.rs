//! Wake-ups across instances: `NOTIFY` sent inside a write transaction (delivered when it
//! commits, never for one rolled back) and a [`Listener`] on a connection of its own, so
//! work queued by one instance wakes the others instead of waiting for their next timer.
//!
//! A wake-up is a hint, not a message queue: notifications sent while a listener is
//! reconnecting are lost. Each (re)subscription therefore yields [`Wake::Subscribed`], on
//! which the caller re-checks its tables as if woken for everything.

use std::time::Duration;

use deadpool_postgres::GenericClient;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::AsyncMessage;

use super::{from_postgres, PgTarget};
use crate::store::StoreError;

/// Sends `payload` on `channel` (as part of the caller's transaction, when in one).
pub async fn notify(
    client: &impl GenericClient,
    channel: &str,
    payload: &str,
) -> Result<(), StoreError> {
    client
        .execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
        .await
        .map_err(|e| from_postgres(&e))?;
    Ok(())
}

/// What a [`Listener`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    /// Listening (first, or again after the connection was lost): anything sent before
    /// may have been missed, so re-check everything.
    Subscribed,
    /// A notification on one of the channels.
    Notified { channel: String, payload: String },
}

/// Listens on channels over its own connection, reconnecting (after `retry`) whenever it
/// is lost. Stops when dropped.
#[derive(Debug)]
pub struct Listener {
    wakes: mpsc::Receiver<Wake>,
    task: JoinHandle<()>,
}

impl Listener {
    /// Starts listening on `channels` (names as given to [`notify`]).
    pub fn start(mut target: PgTarget, channels: Vec<String>, retry: Duration) -> Listener {
        target
            .config_mut()
            .application_name("cashout-recon listener");
        let (sender, wakes) = mpsc::channel(256);
        let task = tokio::spawn(async move {
            while !sender.is_closed() {
                if let Err(err) = listen_once(&target, &channels, &sender).await {
                    tracing::warn!(error = %err, "postgres: listener connection lost; reconnecting");
                }
                tokio::time::sleep(retry).await;
            }
        });
        Listener { wakes, task }
    }

    /// The next wake-up (`None` only once the listener stopped).
    pub async fn recv(&mut self) -> Option<Wake> {
        self.wakes.recv().await
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One connection's life: subscribe, then forward notifications until it ends.
async fn listen_once(
    target: &PgTarget,
    channels: &[String],
    sender: &mpsc::Sender<Wake>,
) -> Result<(), StoreError> {
    let (client, mut connection) = target.connect().await.map_err(|e| from_postgres(&e))?;
    let forward = sender.clone();
    // The connection must be driven while the client subscribes: its messages go here.
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(note)) => {
                    let wake = Wake::Notified {
                        channel: note.channel().to_string(),
                        payload: note.payload().to_string(),
                    };
                    if forward.send(wake).await.is_err() {
                        return Ok(());
                    }
                }
                Ok(_) => {}
                Err(err) => return Err(from_postgres(&err)),
            }
        }
        Ok(())
    });
    for channel in channels {
        let listen = format!("LISTEN \"{}\"", channel.replace('"', "\"\""));
        if let Err(err) = client.batch_execute(&listen).await {
            driver.abort();
            return Err(from_postgres(&err));
        }
    }
    if sender.send(Wake::Subscribed).await.is_err() {
        driver.abort();
        return Ok(());
    }
    let ended = driver.await;
    drop(client);
    match ended {
        Ok(result) => result,
        Err(err) => Err(StoreError::Unavailable(format!("listener task: {err}"))),
    }
}
