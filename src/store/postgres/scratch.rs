//! A throwaway PostgreSQL database: created fresh on a server whose role may
//! `CREATE DATABASE`, dropped with its connections afterwards (for `bench-ingest`).
//! The database the server URL names is only used to issue the `CREATE`/`DROP`.

use super::{from_postgres, parse_target, PgTarget};
use crate::store::StoreError;

/// A database created by [`ScratchDatabase::create`]; [`ScratchDatabase::drop_database`]
/// removes it (nothing does on drop: the caller awaits the removal and reports its failure).
pub struct ScratchDatabase {
    admin: PgTarget,
    name: String,
    url: String,
}

impl ScratchDatabase {
    /// Creates `<prefix>_<uuid>` on the server of `server_url` (connecting with the TLS
    /// its `sslmode` asks for, as the store does; see [`super::tls`]).
    pub async fn create(server_url: &str, prefix: &str) -> Result<ScratchDatabase, StoreError> {
        let admin = parse_target(server_url, None)?;
        let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
        let database = ScratchDatabase {
            url: with_database(server_url, &name),
            admin,
            name,
        };
        database
            .administer(&format!("CREATE DATABASE {}", database.name))
            .await?;
        Ok(database)
    }

    /// The connection string of the new database (the server URL's, with its name).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `postgresql://host:port/name`, without credentials.
    pub fn describe(&self) -> String {
        self.admin.with_dbname(&self.name).describe()
    }

    /// Drops the database, ending the connections still open on it.
    pub async fn drop_database(self) -> Result<(), StoreError> {
        self.administer(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .await
    }

    /// Runs one statement on a connection of its own to the server URL's database.
    async fn administer(&self, statement: &str) -> Result<(), StoreError> {
        let (client, connection) = self.admin.connect().await.map_err(|err| {
            StoreError::Unavailable(format!(
                "cannot reach {}: {}",
                self.admin.describe(),
                from_postgres(&err)
            ))
        })?;
        let driver = tokio::spawn(connection);
        let result = client
            .batch_execute(statement)
            .await
            .map_err(|err| from_postgres(&err));
        drop(client);
        let _ = driver.await;
        result.map_err(|err| match err {
            StoreError::Database(reason) => StoreError::Database(format!("{statement}: {reason}")),
            other => other,
        })
    }
}

/// `url` with its database replaced by `dbname` (URL or `key=value` form).
pub fn with_database(url: &str, dbname: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return format!("{url} dbname={dbname}");
    };
    let (base, query) = match url.find('?') {
        Some(at) => (&url[..at], &url[at..]),
        None => (url, ""),
    };
    let authority_start = scheme_end + 3;
    let base = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    format!("{base}/{dbname}{query}")
}
