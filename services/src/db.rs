//! The one database a service's replicas share: an SQLite file by default (several local
//! replicas open the same file, in WAL mode), PostgreSQL when `DATABASE_URL` is a
//! `postgres://` URL. Queries are written once, in the SQL both understand (`$N` parameters,
//! `ON CONFLICT`, `RETURNING`).

use anyhow::Context;
use sqlx::any::AnyPoolOptions;
use sqlx::AnyPool;
use std::time::Duration;

/// The database pool every handler uses.
pub type Db = AnyPool;

/// Opens `url` and creates the tables in `schema` that are missing.
pub async fn open(url: &str, schema: &[&str]) -> anyhow::Result<Db> {
    sqlx::any::install_default_drivers();
    let pool = AnyPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .with_context(|| format!("opening database {}", redact(url)))?;
    if url.starts_with("sqlite:") {
        // Readers never wait for the writer, and writers from other replicas queue up
        // (sqlx sets a 5 s busy timeout) instead of failing. Switching the journal mode takes
        // the file for itself, which the busy timeout does not cover: replicas starting
        // together take turns.
        retry_while_locked(|| sqlx::query("PRAGMA journal_mode=WAL").execute(&pool))
            .await
            .context("enabling WAL")?;
    }
    for statement in schema {
        retry_while_locked(|| sqlx::query(statement).execute(&pool))
            .await
            .with_context(|| format!("creating schema: {statement}"))?;
    }
    Ok(pool)
}

/// Runs `op` again (for up to ten seconds) while the database reports a race between replicas
/// starting together: SQLite's "database is locked", or PostgreSQL's concurrent
/// `CREATE TABLE IF NOT EXISTS`, which can fail on its catalogue's unique index, with
/// "relation already exists" (42P07), or with the table's row type "already exists" (42710).
async fn retry_while_locked<T, F, Fut>(mut op: F) -> Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match op().await {
            Err(sqlx::Error::Database(e))
                if (e.message().contains("locked")
                    || e.is_unique_violation()
                    || matches!(e.code().as_deref(), Some("42P07" | "42710")))
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => return other,
        }
    }
}

/// `url` without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// `value` as a `LIKE` pattern that matches it anywhere, with `%`, `_` and `\` escaped
/// (use with `ESCAPE '\'`).
pub fn like_pattern(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('%');
    for c in value.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

/// Whether `e` is a unique-constraint violation.
pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_patterns_escape_wildcards() {
        assert_eq!(like_pattern("a%b_c\\"), "%a\\%b\\_c\\\\%");
    }

    #[test]
    fn passwords_are_not_printed() {
        assert_eq!(
            redact("postgres://app:secret@db:5432/shop"),
            "postgres://app:***@db:5432/shop"
        );
        assert_eq!(redact("sqlite:///tmp/x.db"), "sqlite:///tmp/x.db");
    }
}
