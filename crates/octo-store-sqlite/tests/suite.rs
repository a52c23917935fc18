//! The store contract (`octo-store-tests`) on SQLite: every test on a database
//! in memory and on one in a temporary file (WAL, a pool of several connections).

#![allow(clippy::unwrap_used)]

use octo_store_sqlite::SqliteStore;
use tempfile::TempDir;

async fn in_memory() -> (SqliteStore, ()) {
    (SqliteStore::open_in_memory().await.unwrap(), ())
}

async fn in_a_file() -> (SqliteStore, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("octopus.db"))
        .await
        .unwrap();
    (store, dir)
}

mod in_memory {
    octo_store_tests::store_suite!(super::in_memory());
}

mod in_a_file {
    octo_store_tests::store_suite!(super::in_a_file());
}
