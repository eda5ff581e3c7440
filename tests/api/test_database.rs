//! Fresh PostgreSQL databases for the suite's postgres mode, one per test app, dropped after.
//!
//! The server is `CASHOUT_RECON_TEST_DATABASE_URL` (a role that may `CREATE DATABASE`;
//! `.ci/postgres` starts one and prints it). Without it a postgres-mode test fails, never
//! skips. Connections use the store's connector (the URL's `sslmode`).

use cashout_recon::store::postgres::PgTarget;

/// Names the test server's connection string.
pub const TEST_DATABASE_URL_ENV: &str = "CASHOUT_RECON_TEST_DATABASE_URL";

/// A database created for one test app; dropped (with its connections) when this is dropped.
pub struct TestDatabase {
    admin: PgTarget,
    name: String,
    url: String,
}

impl TestDatabase {
    /// Creates `api_<uuid>` on the test server. Panics, saying what to do, when the server
    /// is not named or cannot be reached.
    pub async fn create() -> TestDatabase {
        let admin_url = std::env::var(TEST_DATABASE_URL_ENV)
            .ok()
            .filter(|url| !url.trim().is_empty())
            .unwrap_or_else(|| {
                panic!(
                    "{TEST_DATABASE_URL_ENV} is not set: the PostgreSQL runs of the suite need a \
                     server whose role may CREATE DATABASE. Start one with `sudo .ci/postgres` \
                     and export {TEST_DATABASE_URL_ENV} with the URL it prints."
                )
            });
        let admin = PgTarget::parse(&admin_url, None).unwrap_or_else(|err| {
            panic!("{TEST_DATABASE_URL_ENV} is not a connection string: {err}")
        });
        let name = format!("api_{}", uuid::Uuid::new_v4().simple());
        let client = connect(&admin).await;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|err| panic!("CREATE DATABASE {name}: {err:?}"));
        let url = with_database(&admin_url, &name);
        TestDatabase { admin, name, url }
    }

    /// The test database's connection string.
    pub fn url(&self) -> &str {
        &self.url
    }
}

async fn connect(admin: &PgTarget) -> tokio_postgres::Client {
    let (client, connection) = admin.connect().await.unwrap_or_else(|err| {
        panic!(
            "cannot reach the test PostgreSQL server of {TEST_DATABASE_URL_ENV} ({err}). \
                 Start one with `sudo .ci/postgres`."
        )
    });
    tokio::spawn(connection);
    client
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop may run inside the test's runtime: the DROP DATABASE runs on a thread of its own.
        let admin = self.admin.clone();
        let name = self.name.clone();
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async move {
                let (client, connection) = admin.connect().await.ok()?;
                tokio::spawn(connection);
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(()))) {
            eprintln!("test database {} was not dropped", self.name);
        }
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
