//! The store contract (`octo-store-tests`) on PostgreSQL: every test on a
//! database of its own in this test process's throwaway cluster
//! (`octo_testkit::postgres`).

#![allow(clippy::unwrap_used)]

use octo_store_postgres::PgStore;

async fn fresh() -> (PgStore, ()) {
    let url = octo_testkit::postgres::shared().create_database();
    (PgStore::connect(&url).await.unwrap(), ())
}

octo_store_tests::store_suite!(fresh());
