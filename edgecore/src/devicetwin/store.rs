//! Twin state on disk: one SQLite file beside MetaManager's database, one JSON row per device
//! (desired and reported values with their versions and timestamps, state, last online).
//!
//! A file of its own keeps twin writes (many per second with busy mappers) out of MetaManager's
//! single writer. Rows are written in batches (one transaction per batch of mapper messages).
//! A row that cannot be read is reported and left in place, not silently dropped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::twin::DeviceTwin;

#[derive(Debug, thiserror::Error)]
pub enum TwinStoreError {
    #[error("device twin database {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: sqlx::Error,
    },
}

#[derive(Clone)]
pub struct TwinStore {
    pool: SqlitePool,
    path: PathBuf,
}

/// The twin database that goes with MetaManager's `edgecore.db`: `edgecore-devicetwin.db`.
pub fn path_beside(metamanager_db: &Path) -> PathBuf {
    let stem = metamanager_db
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "edgecore".into());
    metamanager_db.with_file_name(format!("{stem}-devicetwin.db"))
}

impl TwinStore {
    pub async fn open(path: &Path) -> Result<Self, TwinStoreError> {
        let err = |source| TwinStoreError::Db {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| err(sqlx::Error::Io(e)))?;
        }
        let opts = SqliteConnectOptions::from_str("sqlite://")
            .map_err(err)?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // Reported values change every second; a power cut may lose the last batch, which
            // the mapper reports again — unlike MetaManager's acked objects.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            // One row per device: a small page cache is plenty (SQLite's default is 2 MiB).
            .pragma("cache_size", "-256");
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await
            .map_err(err)?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS device_twin (id TEXT PRIMARY KEY NOT NULL, twin TEXT NOT NULL)",
        )
        .execute(&pool)
        .await
        .map_err(err)?;
        Ok(TwinStore {
            pool,
            path: path.to_owned(),
        })
    }

    fn err(&self, source: sqlx::Error) -> TwinStoreError {
        TwinStoreError::Db {
            path: self.path.clone(),
            source,
        }
    }

    /// Every saved twin. Unreadable rows are logged with their id and skipped (kept on disk).
    pub async fn load(&self) -> Result<BTreeMap<String, DeviceTwin>, TwinStoreError> {
        let rows = sqlx::query("SELECT id, twin FROM device_twin")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        let mut out = BTreeMap::new();
        for r in rows {
            let id: String = r.get(0);
            let text: String = r.get(1);
            match serde_json::from_str::<DeviceTwin>(&text) {
                Ok(t) => {
                    out.insert(id, t);
                }
                Err(e) => tracing::error!(path = %self.path.display(), device = %id, error = %e,
                    "corrupt device twin row; the device starts with an empty twin (row kept)"),
            }
        }
        Ok(out)
    }

    /// Writes a batch: `Some` saves the twin, `None` deletes it. One transaction.
    pub async fn write(&self, batch: Vec<(String, Option<String>)>) -> Result<(), TwinStoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await.map_err(|e| self.err(e))?;
        for (id, twin) in batch {
            match twin {
                Some(text) => {
                    sqlx::query(
                        "INSERT INTO device_twin (id, twin) VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET twin = excluded.twin",
                    )
                    .bind(id)
                    .bind(text)
                    .execute(&mut *tx)
                    .await
                }
                None => {
                    sqlx::query("DELETE FROM device_twin WHERE id = ?")
                        .bind(id)
                        .execute(&mut *tx)
                        .await
                }
            }
            .map_err(|e| self.err(e))?;
        }
        tx.commit().await.map_err(|e| self.err(e))
    }
}
