//! SQLite itself: a database file on disk (created with its directory, WAL
//! journal, migrations re-run on every open) and a pool of several connections
//! writing at once. The store contract is in `suite.rs`.

#![allow(clippy::unwrap_used)]

use octo_store::{Store, TaskState, DEFAULT_POLICY};
use octo_store_sqlite::SqliteStore;
use octo_store_tests::fixtures::{new_machine, new_task, strings, tentacle_line};
use serde_json::json;

#[tokio::test]
async fn a_file_database_persists_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data").join("octopus.db");
    let (machine_id, task_id) = {
        let s = SqliteStore::open(&path).await.unwrap();
        assert!(path.exists(), "the file and its directory are created");
        s.create_user("admin", "Admin", None).await.unwrap();
        s.create_environment(1, "Production", "").await.unwrap();
        let m = s
            .create_machine(&new_machine("web01", &["Production"], &["web"]))
            .await
            .unwrap();
        let t = s
            .create_task(&new_task("Script", "x", &json!({"a": 1}), &[m.id]), 1)
            .await
            .unwrap();
        s.append_log(&t.id, &[tentacle_line(m.id, 0, "hello")])
            .await
            .unwrap();
        assert!(path.with_extension("db-wal").exists(), "WAL journal");
        s.close().await;
        (m.id, t.id)
    };
    // Opening again runs the migrations again: nothing to do, nothing lost.
    for _ in 0..2 {
        let s = SqliteStore::open(&path).await.unwrap();
        assert_eq!(s.count_users().await.unwrap(), 1);
        let m = s.machine(1, "web01").await.unwrap().unwrap();
        assert_eq!(
            (m.id, m.environments, m.roles),
            (machine_id, strings(&["Production"]), strings(&["web"]))
        );
        assert!(s.policy(1, DEFAULT_POLICY).await.unwrap().is_some());
        assert_eq!(
            s.task(&task_id).await.unwrap().unwrap().arguments,
            json!({"a": 1})
        );
        assert_eq!(s.task_log(&task_id, 0, 10).await.unwrap()[0].text, "hello");
        assert_eq!(s.task_steps(&task_id).await.unwrap()[0].next_sequence, 1);
        s.close().await;
    }
    // Task numbers carry on where they stopped.
    let s = SqliteStore::open(&path).await.unwrap();
    let t = s
        .create_task(&new_task("Health", "x", &json!({}), &[]), 2)
        .await
        .unwrap();
    assert_eq!(t.id, "ServerTasks-2");
    s.close().await;
}

#[tokio::test]
async fn the_wal_is_copied_into_the_database_in_the_background() {
    use sqlx::{ConnectOptions, Connection};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("octopus.db");
    let s = SqliteStore::open(&path).await.unwrap();
    // Enough writes to call for a checkpoint (128), far fewer pages than a
    // writer checkpoints after in its own commit.
    for i in 0..130 {
        s.create_environment(1, &format!("Env{i}"), "")
            .await
            .unwrap();
    }
    // The database file alone (`immutable` reads it without the WAL): the
    // writes reach it with no write after them.
    let alone = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .read_only(true)
        .immutable(true);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let seen = async {
            let mut c = alone.connect().await?;
            let n: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM environments WHERE name LIKE 'Env%'")
                    .fetch_one(&mut c)
                    .await?;
            c.close().await?;
            Ok::<_, sqlx::Error>(n)
        }
        .await;
        // The first 127 at least: the 128th write called for the checkpoint.
        if matches!(seen, Ok(n) if n >= 127) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the environments never reached the database file: {seen:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    s.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_on_a_file_database_all_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("octopus.db"))
        .await
        .unwrap();
    let m = s
        .create_machine(&new_machine("web01", &[], &[]))
        .await
        .unwrap();
    let mut handles = Vec::new();
    for i in 0..8 {
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            let t = s
                .create_task(
                    &new_task("Script", &format!("task {i}"), &json!({}), &[m.id]),
                    i,
                )
                .await
                .unwrap();
            for chunk in 0..10 {
                let lines: Vec<_> = (0..20)
                    .map(|j| tentacle_line(m.id, chunk * 20 + j, "line"))
                    .collect();
                s.append_log(&t.id, &lines).await.unwrap();
                s.set_task_state(&t.id, TaskState::Executing, None, chunk)
                    .await
                    .unwrap();
            }
            t.id
        }));
    }
    let mut ids = Vec::new();
    for h in handles {
        let id = h.await.unwrap();
        assert_eq!(s.task_log(&id, 0, 1_000).await.unwrap().len(), 200);
        assert_eq!(s.task_steps(&id).await.unwrap()[0].next_sequence, 200);
        ids.push(id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 8, "every task got its own number");
}

#[tokio::test]
async fn open_existing_refuses_anything_but_this_stores_database() {
    let dir = tempfile::tempdir().unwrap();
    let refused = |e: octo_store::StoreError, path: &std::path::Path| {
        let e = e.to_string();
        assert!(e.contains(path.to_str().unwrap()), "names the file: {e}");
        e
    };
    // No file: nothing is created.
    let missing = dir.path().join("missing.db");
    let e = refused(
        SqliteStore::open_existing(&missing).await.unwrap_err(),
        &missing,
    );
    assert!(e.contains("cannot be opened"), "{e}");
    assert!(!missing.exists(), "no file created");
    // Not SQLite at all.
    let garbage = dir.path().join("garbage.db");
    std::fs::write(
        &garbage,
        b"this is not a database, just some text ".repeat(200),
    )
    .unwrap();
    let e = refused(
        SqliteStore::open_existing(&garbage).await.unwrap_err(),
        &garbage,
    );
    assert!(e.contains("not a database"), "{e}");
    // SQLite, but somebody else's: no schema of ours is added to it.
    let foreign = dir.path().join("foreign.db");
    {
        use sqlx::ConnectOptions;
        let mut c = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&foreign)
            .create_if_missing(true)
            .connect()
            .await
            .unwrap();
        sqlx::query("CREATE TABLE notes (text TEXT)")
            .execute(&mut c)
            .await
            .unwrap();
    }
    let e = refused(
        SqliteStore::open_existing(&foreign).await.unwrap_err(),
        &foreign,
    );
    assert!(e.contains("not one this server made"), "{e}");
    {
        use sqlx::ConnectOptions;
        let mut c = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&foreign)
            .connect()
            .await
            .unwrap();
        let tables: Vec<(String,)> =
            sqlx::query_as("SELECT name FROM sqlite_master WHERE type = 'table'")
                .fetch_all(&mut c)
                .await
                .unwrap();
        assert_eq!(tables, [("notes".to_string(),)], "left as it was");
    }
    // Ours: opened, data intact.
    let ours = dir.path().join("ours.db");
    let s = SqliteStore::open(&ours).await.unwrap();
    s.create_user("admin", "Admin", None).await.unwrap();
    s.close().await;
    let s = SqliteStore::open_existing(&ours).await.unwrap();
    assert_eq!(s.count_users().await.unwrap(), 1);
    s.close().await;
}

/// A transaction's BEGIN travels with its first statement: what it wrote is
/// there after the commit, gone when it is dropped, and a transaction that
/// ran nothing commits (nothing) and leaves its connection fit to lend.
#[tokio::test]
async fn a_transaction_begins_with_its_first_statement() {
    use octo_store::params;
    use octo_store::sql::{Access, Engine, Params};

    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("octopus.db"))
        .await
        .unwrap();
    let count = |store: &SqliteStore| {
        let store = store.clone();
        async move {
            let mut c = store.begin(Access::Single).await.unwrap();
            task_counter(c.as_mut()).await
        }
    };
    let bump = "UPDATE counters SET value = value + ? WHERE name = 'task'";
    assert_eq!(count(&store).await, 0);

    let mut tx = store.begin(Access::Write).await.unwrap();
    assert_eq!(tx.execute(bump, params![1_i64]).await.unwrap(), 1);
    assert_eq!(tx.execute(bump, params![1_i64]).await.unwrap(), 1);
    tx.commit().await.unwrap();
    assert_eq!(count(&store).await, 2, "committed");
    // First a statement that returns rows (the BEGIN goes with it), and the
    // counts of changed rows after it are its own.
    let mut tx = store.begin(Access::Write).await.unwrap();
    let rows = tx
        .fetch(
            "UPDATE counters SET value = value + 0 WHERE name = 'task' RETURNING value",
            Params::default(),
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "the BEGIN adds no row");
    assert_eq!(tx.execute(bump, params![0_i64]).await.unwrap(), 1);
    assert_eq!(
        tx.execute(
            "UPDATE counters SET value = 0 WHERE name = 'none'",
            Params::default()
        )
        .await
        .unwrap(),
        0
    );
    tx.commit().await.unwrap();
    assert_eq!(count(&store).await, 2);

    let mut tx = store.begin(Access::Write).await.unwrap();
    tx.execute(bump, params![10_i64]).await.unwrap();
    drop(tx);
    assert_eq!(count(&store).await, 2, "dropped: rolled back");
    let mut tx = store.begin(Access::Write).await.unwrap();
    tx.fetch(
        "UPDATE counters SET value = value + 10 WHERE name = 'task' RETURNING value",
        Params::default(),
    )
    .await
    .unwrap();
    drop(tx);
    assert_eq!(
        count(&store).await,
        2,
        "begun with a fetch, dropped: rolled back"
    );

    for access in [Access::Write, Access::Read] {
        store.begin(access).await.unwrap().commit().await.unwrap();
    }
    // A failing first statement: its transaction never began, and the
    // connections are lent again as usual.
    for sql in [
        "UPDATE no_such_table SET x = 1",
        "SELECT x FROM no_such_table",
    ] {
        let mut tx = store.begin(Access::Write).await.unwrap();
        assert!(tx.fetch(sql, Params::default()).await.is_err());
        drop(tx);
    }
    let mut tx = store.begin(Access::Write).await.unwrap();
    tx.execute(bump, params![1_i64]).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(count(&store).await, 3);
    // A read transaction sees one snapshot from its first statement.
    let mut read = store.begin(Access::Read).await.unwrap();
    let before = task_counter(read.as_mut()).await;
    let mut tx = store.begin(Access::Write).await.unwrap();
    tx.execute(bump, params![1_i64]).await.unwrap();
    tx.commit().await.unwrap();
    let again = task_counter(read.as_mut()).await;
    assert_eq!(before, again, "the snapshot taken at the first read");
    read.commit().await.unwrap();
    assert_eq!(count(&store).await, 4);
}

/// A write transaction given back unfinished (its caller returned an error
/// half-way, or was cancelled) holds SQLite's write lock until it is rolled
/// back. It was rolled back only when its connection was next lent, and the
/// connections are lent last-given-back first: with another connection given
/// back after it, every later writer (one at a time) got the other one and
/// failed with "database is locked" after the busy timeout, for as long as the
/// server never needed two connections at once (the API fuzzer met it: node
/// heartbeats and a space's deletion failed for 10 s).
#[tokio::test]
async fn a_write_given_back_unfinished_lets_the_next_writer_in_at_once() {
    use octo_store::params;
    use octo_store::sql::{Access, Engine};
    use std::time::Duration;

    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("octopus.db"))
        .await
        .unwrap();
    let bump = "UPDATE counters SET value = value + ? WHERE name = 'task'";
    for round in 0..3 {
        // The writer takes the lock, a reader holds a second connection,
        // the writer goes away half-way, then the reader: the reader's
        // connection is the next one lent.
        let mut write = store.begin(Access::Write).await.unwrap();
        write.execute(bump, params![100_i64]).await.unwrap();
        let mut read = store.begin(Access::Single).await.unwrap();
        let before = task_counter(read.as_mut()).await;
        drop(write);
        drop(read);
        // Well under the busy timeout (5 s) after which SQLite gives up.
        let next = tokio::time::timeout(Duration::from_secs(3), async {
            let mut tx = store.begin(Access::Write).await.unwrap();
            tx.execute(bump, params![1_i64]).await?;
            tx.commit().await
        })
        .await
        .unwrap_or_else(|_| panic!("round {round}: the next writer waited for the lock"));
        next.unwrap_or_else(|e| panic!("round {round}: the next writer failed: {e}"));
        let mut c = store.begin(Access::Single).await.unwrap();
        assert_eq!(
            task_counter(c.as_mut()).await,
            before + 1,
            "round {round}: the unfinished write rolled back, the next one stored"
        );
    }
    // A read transaction given back unfinished ends too: the connections
    // all go back to the pool, and closing waits for them.
    let mut read = store.begin(Access::Read).await.unwrap();
    task_counter(read.as_mut()).await;
    drop(read);
    tokio::time::timeout(Duration::from_secs(3), store.close())
        .await
        .expect("every connection given back");
}

/// The task counter's value, read on `on`.
async fn task_counter(on: &mut (dyn octo_store::sql::Tx + 'static)) -> i64 {
    let rows = on
        .fetch(
            "SELECT value FROM counters WHERE name = 'task'",
            octo_store::sql::Params::default(),
        )
        .await
        .unwrap();
    rows[0]
        .i64(octo_store::sql::Col::Index(0))
        .unwrap()
        .unwrap()
}

/// Each connection a tentacle opens asks whether it presents a machine's next
/// certificate: that lookup (and the rotation's update) find the machine by
/// index, not by reading every machine (issue 15: 5,000 polling tentacles
/// reconnecting made 5,000 scans of 5,000 rows).
#[tokio::test]
async fn a_next_certificate_is_looked_up_by_index() {
    use octo_store::params;
    use octo_store::sql::{Access, Col, Engine};

    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("octopus.db"))
        .await
        .unwrap();
    let mut c = store.begin(Access::Single).await.unwrap();
    for sql in [
        "SELECT m.id FROM machines m WHERE m.next_thumbprint = ?",
        "UPDATE machines SET thumbprint = next_thumbprint, next_thumbprint = NULL \
         WHERE next_thumbprint = ?",
    ] {
        let rows = c
            .fetch(&format!("EXPLAIN QUERY PLAN {sql}"), params!["AB"])
            .await
            .unwrap();
        let plan: Vec<String> = rows
            .iter()
            .map(|r| r.text(Col::Index(3)).unwrap().unwrap_or_default())
            .collect();
        assert!(
            plan.iter()
                .any(|d| d.starts_with("SEARCH") && d.contains("INDEX machines_next_thumbprint (")),
            "{sql}: {plan:?}"
        );
        assert!(
            !plan.iter().any(|d| d.starts_with("SCAN")),
            "{sql}: {plan:?}"
        );
    }
}
