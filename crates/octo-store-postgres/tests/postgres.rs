//! PostgreSQL itself, where it differs from one SQLite file: several
//! connections (and several stores, as several server nodes would hold)
//! writing at once, with row locks instead of one write lock; reconnecting to
//! a migrated database; and the messages of a database that cannot be
//! reached. The store contract is in `suite.rs`.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use octo_store::{Store, StoreError, TaskState};
use octo_store_postgres::PgStore;
use octo_store_tests::fixtures::{new_machine, new_task, server_line, tentacle_line};
use serde_json::json;
use tokio::time::timeout;

/// Bound on each test's work.
const T: Duration = Duration::from_secs(120);

async fn database() -> String {
    octo_testkit::postgres::shared().create_database()
}

/// Log lines of one task written by several steps at once: a reader paging
/// by id while they are written ("lines after the last id I saw", as the
/// live log does) sees every line. Ids are handed out before commit; were two
/// appends to interleave, a reader could see the later one's ids first and
/// step over the earlier one's for good. Each step writes its output
/// (`append_log`) and, between batches, a server line with the step's state
/// (`update_step_logged`), as a step's end does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reader_paging_by_id_misses_no_line_while_steps_append_at_once() {
    let url = database().await;
    let s = PgStore::connect(&url).await.unwrap();
    let mut machines = Vec::new();
    for i in 0..6 {
        let m = s
            .create_machine(&new_machine(&format!("web{i}"), &[], &[]))
            .await
            .unwrap();
        machines.push(m.id);
    }
    let task = s
        .create_task(&new_task("Script", "x", &json!({}), &machines), 1)
        .await
        .unwrap();
    const BATCHES: i64 = 40;
    const PER_BATCH: i64 = 5;
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (s, id, done) = (s.clone(), task.id.clone(), done.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut after = 0;
            loop {
                // Whether the writers were done before this read: then it is the last.
                let last = done.load(Ordering::SeqCst);
                let page = s.task_log(&id, after, 10_000).await.unwrap();
                if let Some(l) = page.last() {
                    after = l.id;
                }
                seen.extend(page.into_iter().map(|l| l.text));
                if last {
                    return seen;
                }
                tokio::task::yield_now().await;
            }
        })
    };
    let writers: Vec<_> = machines
        .iter()
        .map(|&m| {
            let (s, id) = (s.clone(), task.id.clone());
            tokio::spawn(async move {
                let mut step = s.task_step(&id, m).await.unwrap().unwrap();
                for b in 0..BATCHES {
                    let lines: Vec<_> = (0..PER_BATCH)
                        .map(|j| {
                            let sequence = b * PER_BATCH + j;
                            tentacle_line(m, sequence, &format!("{m}: {sequence}"))
                        })
                        .collect();
                    s.append_log(&id, &lines).await.unwrap();
                    step.state = TaskState::Executing;
                    step.next_sequence = (b + 1) * PER_BATCH;
                    let line = server_line(&format!("{m}: batch {b} stored"));
                    s.update_step_logged(&step, &[line]).await.unwrap();
                }
            })
        })
        .collect();
    timeout(T, async {
        for w in writers {
            w.await.unwrap();
        }
    })
    .await
    .unwrap();
    done.store(true, Ordering::SeqCst);
    let seen = timeout(T, reader).await.unwrap().unwrap();
    let expected = machines.len() * usize::try_from(BATCHES * (PER_BATCH + 1)).unwrap();
    let mut distinct = seen.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), seen.len(), "no line twice");
    assert_eq!(seen.len(), expected, "no line missed by the live reader");
    for step in s.task_steps(&task.id).await.unwrap() {
        assert_eq!(step.next_sequence, BATCHES * PER_BATCH);
    }
}

/// Two stores on one database, as two server nodes: each sees the other's
/// writes, task numbers never repeat, and a name taken at once by both goes
/// to one of them (the other is told it exists).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_on_one_database_share_names_and_task_numbers() {
    let url = database().await;
    let a = PgStore::connect(&url).await.unwrap();
    let b = PgStore::connect(&url).await.unwrap();
    let m = a
        .create_machine(&new_machine("web01", &[], &[]))
        .await
        .unwrap();
    assert_eq!(b.machine(1, "WEB01").await.unwrap().unwrap().id, m.id);

    let mut handles = Vec::new();
    for i in 0..20 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        handles.push(tokio::spawn(async move {
            s.create_task(&new_task("Health", "x", &json!({}), &[m.id]), i)
                .await
                .unwrap()
                .id
        }));
    }
    let mut ids = Vec::new();
    for h in handles {
        ids.push(timeout(T, h).await.unwrap().unwrap());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 20, "every task got its own number");
    assert_eq!(
        b.list_tasks(None, 100).await.unwrap()[0].id,
        "ServerTasks-20"
    );

    for round in 0..10 {
        let name = format!("db{round}");
        let (ma, mb) = (
            new_machine(&name, &[], &[]),
            new_machine(&name.to_uppercase(), &[], &[]),
        );
        let (ra, rb) = tokio::join!(a.create_machine(&ma), b.create_machine(&mb));
        let conflicts = [&ra, &rb]
            .iter()
            .filter(|r| {
                matches!(
                    r,
                    Err(StoreError::Conflict {
                        kind: "machine",
                        ..
                    })
                )
            })
            .count();
        assert_eq!(
            (ra.is_ok() as usize + rb.is_ok() as usize, conflicts),
            (1, 1),
            "{ra:?} {rb:?}"
        );
    }
}

/// Two nodes finishing one task at once, one with Success and one with
/// Failed: one wins, the other is told the task has already finished. A
/// final state never changes, even between two writers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_final_state_written_at_once_by_two_nodes_is_never_overwritten() {
    let url = database().await;
    let a = PgStore::connect(&url).await.unwrap();
    let b = PgStore::connect(&url).await.unwrap();
    for round in 0..20 {
        let t = a
            .create_task(&new_task("Script", "x", &json!({}), &[]), round)
            .await
            .unwrap();
        a.set_task_state(&t.id, TaskState::Executing, None, 1)
            .await
            .unwrap();
        let (ra, rb) = tokio::join!(
            a.set_task_state(&t.id, TaskState::Success, None, 2),
            b.set_task_state(&t.id, TaskState::Failed, Some("b"), 3),
        );
        let stored = a.task(&t.id).await.unwrap().unwrap();
        match (ra, rb) {
            (Ok(()), Err(StoreError::Invalid(_))) => assert_eq!(stored.state, TaskState::Success),
            (Err(StoreError::Invalid(_)), Ok(())) => assert_eq!(stored.state, TaskState::Failed),
            other => panic!("round {round}: both wrote a final state: {other:?}"),
        }
    }
}

/// Connecting again to a database already migrated changes nothing and
/// loses nothing; task numbers carry on.
#[tokio::test]
async fn reconnecting_keeps_everything_and_numbers_carry_on() {
    let url = database().await;
    let s = PgStore::connect(&url).await.unwrap();
    s.create_user("admin", "Admin", None).await.unwrap();
    let t = s
        .create_task(&new_task("Health", "x", &json!({"a": 1}), &[]), 1)
        .await
        .unwrap();
    s.close().await;
    for _ in 0..2 {
        let s = PgStore::connect(&url).await.unwrap();
        assert_eq!(s.count_users().await.unwrap(), 1);
        assert_eq!(
            s.task(&t.id).await.unwrap().unwrap().arguments,
            json!({"a": 1})
        );
        s.close().await;
    }
    let s = PgStore::connect(&url).await.unwrap();
    let t2 = s
        .create_task(&new_task("Health", "x", &json!({}), &[]), 2)
        .await
        .unwrap();
    assert_eq!(t2.id, "ServerTasks-2");
}

/// A database that cannot be reached, or refuses the password, is named in
/// the error with what to check, and the password is not.
#[tokio::test]
async fn connection_failures_say_what_to_check_and_hide_the_password() {
    let pg = octo_testkit::postgres::shared();
    let wrong = format!(
        "postgres://postgres:n0t-the-Passw0rd@127.0.0.1:{}/postgres",
        pg.port()
    );
    let err = PgStore::connect(&wrong).await.unwrap_err().to_string();
    assert!(
        err.contains("connecting to PostgreSQL at postgres://postgres:***@127.0.0.1:"),
        "{err}"
    );
    assert!(err.contains("password"), "{err}");
    assert!(!err.contains("n0t-the-Passw0rd"), "{err}");

    // Nothing listens on port 1.
    let err = PgStore::connect("postgres://u:s3cr3t-pw@127.0.0.1:1/octopus")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("check that it runs"), "{err}");
    assert!(!err.contains("s3cr3t-pw"), "{err}");

    let err = PgStore::connect("postgres://u:s3cr3t-pw@127.0.0.1:notaport/x")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("is not valid"), "{err}");
    assert!(!err.contains("s3cr3t-pw"), "{err}");
}

/// Each store hears its own events marked as its own, and another store's
/// (another node's, or another process's on the same machine) not; an event
/// as published before events named their publisher is another's too, and
/// the token is one more field that a node not knowing it ignores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_knows_its_own_events_from_the_others() {
    use octo_store::{ClusterEvent, Heard};

    let url = database().await;
    let a = PgStore::connect(&url).await.unwrap();
    let b = PgStore::connect(&url).await.unwrap();
    let mut heard_by_a = a.listen().await.unwrap().expect("PostgreSQL is shared");
    let mut heard_by_b = b.listen().await.unwrap().expect("PostgreSQL is shared");
    let changed = |id: &str| ClusterEvent::TaskChanged {
        task_id: id.to_string(),
    };
    a.publish(&changed("ServerTasks-1")).await.unwrap();
    b.publish(&changed("ServerTasks-2")).await.unwrap();
    // A clone is the same store (the same process).
    a.clone().publish(&changed("ServerTasks-3")).await.unwrap();
    // The form every node published before (no publisher).
    let old = serde_json::to_string(&changed("ServerTasks-4")).unwrap();
    let raw = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(octo_store::sql::CLUSTER_CHANNEL)
        .bind(&old)
        .execute(&raw)
        .await
        .unwrap();
    async fn next(rx: &mut tokio::sync::mpsc::Receiver<Heard>) -> Heard {
        timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("an event within 10 s")
            .expect("the listener runs")
    }
    let mut by_a = Vec::new();
    let mut by_b = Vec::new();
    for _ in 0..4 {
        by_a.push(next(&mut heard_by_a).await);
        by_b.push(next(&mut heard_by_b).await);
    }
    // Which of ServerTasks-1..4 each store hears as its own.
    for (got, own) in [
        (by_a, [true, false, true, false]),
        (by_b, [false, true, false, false]),
    ] {
        let expected: Vec<Heard> = (1..=4)
            .zip(own)
            .map(|(n, own)| Heard {
                event: changed(&format!("ServerTasks-{n}")),
                own,
            })
            .collect();
        assert_eq!(got, expected);
    }
    // What a node that does not know the publisher's token reads: the
    // event, the token ignored.
    let published = octo_store::cluster_payload("x", &changed("ServerTasks-5")).unwrap();
    assert_eq!(
        serde_json::from_str::<ClusterEvent>(&published).unwrap(),
        changed("ServerTasks-5")
    );
    raw.close().await;
}
