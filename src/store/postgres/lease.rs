//! Named leases with fencing tokens: one instance at a time does a job (a provider's poll
//! cycle, the reconciliation pass, the daily report, the alert outbox), and a killed or
//! paused instance's lease is taken over when it expires.
//!
//! Every takeover increments the lease's token, and a lease row is never deleted, so the
//! token only grows. A holder checks its token inside each write transaction
//! ([`check_fence`]): the check locks the lease row until the commit, so a takeover waits
//! for a write in flight, and a holder resumed after losing its lease finds the token
//! moved on and writes nothing. Lease times are the server's clock (`now()`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;

use super::{from_postgres, PgStore};
use crate::store::lease::fence_in_scope;
use crate::store::{JobLease, JobName, StoreError};

/// A held lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub name: String,
    pub holder: String,
    /// The fencing token: checked by every write made under the lease.
    pub token: i64,
    /// When it lapses unless renewed (server time).
    pub expires_at: DateTime<Utc>,
}

/// Why a write under a lease was refused.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FenceError {
    /// Another holder took the lease over (or it was never held with this token).
    #[error("lease {name} lost: token {held} was superseded (now {current:?})")]
    Lost {
        name: String,
        held: i64,
        current: Option<i64>,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn ttl_millis(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

/// Takes the lease `name` for `holder` for `ttl` when it is free, expired, or already
/// `holder`'s (then it is extended, and keeps its token while unexpired). One statement:
/// two instances asking at once cannot both get it. `None` while another holds it.
pub async fn acquire(
    client: &impl GenericClient,
    name: &str,
    holder: &str,
    ttl: Duration,
) -> Result<Option<Lease>, StoreError> {
    let row = client
        .query_opt(
            "INSERT INTO leases AS l (name, holder, token, expires_at)
             VALUES ($1, $2, 1, now() + $3 * interval '1 millisecond')
             ON CONFLICT (name) DO UPDATE
                SET holder = EXCLUDED.holder,
                    expires_at = EXCLUDED.expires_at,
                    token = CASE WHEN l.holder = EXCLUDED.holder AND l.expires_at >= now()
                                 THEN l.token ELSE l.token + 1 END
              WHERE l.expires_at < now() OR l.holder = EXCLUDED.holder
             RETURNING token, expires_at",
            &[&name, &holder, &(ttl_millis(ttl) as f64)],
        )
        .await
        .map_err(|e| from_postgres(&e))?;
    row.map(|row| {
        Ok(Lease {
            name: name.to_string(),
            holder: holder.to_string(),
            token: row.try_get(0).map_err(|e| from_postgres(&e))?,
            expires_at: row.try_get(1).map_err(|e| from_postgres(&e))?,
        })
    })
    .transpose()
}

/// Extends a held lease by `ttl` from now. `None` when it was taken over: the holder
/// must stop (a lapsed lease nobody took yet is still its own, with the same token).
pub async fn renew(
    client: &impl GenericClient,
    lease: &Lease,
    ttl: Duration,
) -> Result<Option<Lease>, StoreError> {
    let row = client
        .query_opt(
            "UPDATE leases SET expires_at = now() + $4 * interval '1 millisecond'
             WHERE name = $1 AND holder = $2 AND token = $3
             RETURNING expires_at",
            &[
                &lease.name,
                &lease.holder,
                &lease.token,
                &(ttl_millis(ttl) as f64),
            ],
        )
        .await
        .map_err(|e| from_postgres(&e))?;
    row.map(|row| {
        Ok(Lease {
            expires_at: row.try_get(0).map_err(|e| from_postgres(&e))?,
            ..lease.clone()
        })
    })
    .transpose()
}

/// Gives a held lease up at once (a clean shutdown): the next [`acquire`], by anyone,
/// gets it with a new token. `false` when it had been taken over already.
pub async fn release(client: &impl GenericClient, lease: &Lease) -> Result<bool, StoreError> {
    let released = client
        .execute(
            "UPDATE leases SET expires_at = '-infinity'
             WHERE name = $1 AND holder = $2 AND token = $3",
            &[&lease.name, &lease.holder, &lease.token],
        )
        .await
        .map_err(|e| from_postgres(&e))?;
    Ok(released == 1)
}

/// Inside a write transaction: refuses the write unless `lease` still holds its token,
/// and keeps the lease row share-locked until the transaction ends, so a takeover (which
/// updates the row) waits for this write's commit and then bumps the token. A shared
/// lock: one holder's concurrent transactions do not wait for each other.
pub async fn check_fence(
    tx: &tokio_postgres::Transaction<'_>,
    lease: &Lease,
) -> Result<(), FenceError> {
    let current: Option<i64> = tx
        .query_opt(
            "SELECT token FROM leases WHERE name = $1 FOR SHARE",
            &[&lease.name],
        )
        .await
        .map_err(|e| from_postgres(&e))?
        .map(|row| row.try_get(0))
        .transpose()
        .map_err(|e| from_postgres(&e))?;
    if current == Some(lease.token) {
        Ok(())
    } else {
        Err(FenceError::Lost {
            name: lease.name.clone(),
            held: lease.token,
            current,
        })
    }
}

/// The lease as it stands (any holder), for status pages and tests.
pub async fn current(client: &impl GenericClient, name: &str) -> Result<Option<Lease>, StoreError> {
    let row = client
        .query_opt(
            "SELECT holder, token, expires_at FROM leases WHERE name = $1",
            &[&name],
        )
        .await
        .map_err(|e| from_postgres(&e))?;
    row.map(|row| {
        Ok(Lease {
            name: name.to_string(),
            holder: row.try_get(0).map_err(|e| from_postgres(&e))?,
            token: row.try_get(1).map_err(|e| from_postgres(&e))?,
            expires_at: row.try_get(2).map_err(|e| from_postgres(&e))?,
        })
    })
    .transpose()
}

impl Lease {
    /// The row of a job lease of the store's interface.
    pub fn of_job(lease: &JobLease) -> Lease {
        Lease {
            name: lease.job.lease_name(),
            holder: lease.holder.clone(),
            token: lease.token,
            expires_at: lease.expires_at,
        }
    }

    fn into_job(self, job: JobName) -> JobLease {
        JobLease {
            job,
            holder: self.holder,
            token: self.token,
            expires_at: self.expires_at,
        }
    }
}

impl PgStore {
    /// Takes `job`'s lease for `ttl` as this pool ([`PgStore::claimer`]): `None` while
    /// another instance holds it (the SQLite store's `Store::lease`).
    pub async fn lease(&self, job: JobName, ttl: Duration) -> Result<Option<JobLease>, StoreError> {
        let client = self.client().await?;
        Ok(acquire(&client, &job.lease_name(), self.claimer(), ttl)
            .await?
            .map(|lease| lease.into_job(job)))
    }

    /// Extends a held lease by `ttl` from now: `None` when another instance took it over.
    pub async fn renew(
        &self,
        lease: &JobLease,
        ttl: Duration,
    ) -> Result<Option<JobLease>, StoreError> {
        let client = self.client().await?;
        Ok(renew(&client, &Lease::of_job(lease), ttl)
            .await?
            .map(|renewed| renewed.into_job(lease.job.clone())))
    }

    /// Gives a lease up at once; `false` when it had been taken over already.
    pub async fn release(&self, lease: &JobLease) -> Result<bool, StoreError> {
        let client = self.client().await?;
        release(&client, &Lease::of_job(lease)).await
    }
}

/// Inside a write transaction: checks the fence of the job lease the calling task runs
/// under ([`crate::store::lease::under`]), if any, and keeps it locked until the commit.
/// A write outside any job (an API request) is not fenced.
pub async fn check_scoped_fence(tx: &tokio_postgres::Transaction<'_>) -> Result<(), StoreError> {
    let Some(lease) = fence_in_scope() else {
        return Ok(());
    };
    match check_fence(tx, &Lease::of_job(&lease)).await {
        Ok(()) => Ok(()),
        Err(FenceError::Lost { name, .. }) => Err(StoreError::LeaseLost { job: name }),
        Err(FenceError::Store(err)) => Err(err),
    }
}
