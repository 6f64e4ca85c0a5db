//! SQLite persistence (`--analysis-db`): one row per route holding its
//! aggregates and bounded examples as JSON. The worker writes changed routes
//! in one transaction about once a second, never on the request path; a
//! restarted proxy loads them and keeps counting, and `umbra report --db`
//! reads them after the proxy has stopped.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use rusqlite::{params, Connection, OpenFlags};

use super::report::RouteState;
use super::AnalysisError;

pub struct Store {
    connection: Connection,
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, AnalysisError> {
        let connection = Connection::open(path)?;
        connection.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS route_state (
                 route   TEXT PRIMARY KEY,
                 state   TEXT NOT NULL,
                 updated INTEGER NOT NULL
             );",
        )?;
        Ok(Store { connection })
    }

    /// Opens a database `open` made, read-only, for `umbra report --db`:
    /// it never creates a file (a mistyped path would otherwise report "no
    /// traffic") nor writes to one a running proxy owns.
    pub fn open_existing(path: &Path) -> Result<Store, AnalysisError> {
        if let Ok(false) = path.try_exists() {
            return Err(AnalysisError::NoDatabase(path.to_path_buf()));
        }
        // SQLite reads a directory as a "disk I/O error".
        if path.is_dir() {
            return Err(AnalysisError::NotADatabase {
                path: path.to_path_buf(),
                why: "it is a directory".into(),
            });
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        Ok(Store {
            connection: Connection::open_with_flags(path, flags)?,
        })
    }

    pub fn load(&self) -> Result<BTreeMap<Arc<str>, RouteState>, AnalysisError> {
        let mut statement = self
            .connection
            .prepare("SELECT route, state FROM route_state")?;
        let rows = statement.query_map([], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
        })?;
        let mut routes = BTreeMap::new();
        for row in rows {
            let (route, state) = row?;
            routes.insert(route.into(), serde_json::from_str(&state)?);
        }
        Ok(routes)
    }

    /// Deletes the given routes, in one transaction.
    pub fn delete<'a>(
        &mut self,
        routes: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), AnalysisError> {
        let transaction = self.connection.transaction()?;
        {
            let mut statement =
                transaction.prepare_cached("DELETE FROM route_state WHERE route = ?1")?;
            for route in routes {
                statement.execute(params![route])?;
            }
        }
        transaction.commit()?;
        Ok(())
    }

    /// Writes the given routes in one transaction.
    pub fn save<'a>(
        &mut self,
        routes: impl IntoIterator<Item = &'a RouteState>,
    ) -> Result<(), AnalysisError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let transaction = self.connection.transaction()?;
        {
            let mut statement = transaction.prepare_cached(
                "INSERT INTO route_state (route, state, updated) VALUES (?1, ?2, ?3)
                 ON CONFLICT(route) DO UPDATE SET state = excluded.state, updated = excluded.updated",
            )?;
            for route in routes {
                statement.execute(params![route.name, serde_json::to_string(route)?, now])?;
            }
        }
        transaction.commit()?;
        Ok(())
    }
}
