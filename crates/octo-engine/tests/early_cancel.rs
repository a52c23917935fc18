//! Cancels that reach a task before its script could start: the task ends
//! Canceled at once, without trying its machine for minutes.
//!
//! A task created and started on a store only this node uses: the engine
//! reads nothing before its first step starts, yet a cancel requested before
//! the engine registered the task (the API stored it and found nothing to
//! cancel) still stops it.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use octo_comms::{ServerComms, ServerCommsOptions};
use octo_engine::secrets::MasterKey;
use octo_engine::{Engine, EngineDeps, PackageFiles, StepLimits, DEFAULT_HEALTH_SCAN_INTERVAL};
use octo_store::{now_ms, Machine, NewMachine, Store, Task, TaskState, TaskStep};
use octo_store_tests::fixtures::{new_machine, new_task};
use octo_tls::{Identity, TrustStore};

const T: Duration = Duration::from_secs(20);

/// An engine alone on an in-memory store, and a machine nothing answers for
/// (connections refused: its steps would retry for minutes).
struct Fixture {
    store: Arc<dyn Store>,
    engine: Arc<Engine>,
    machine: Machine,
    _data: tempfile::TempDir,
}

impl Fixture {
    async fn new() -> Self {
        let store: Arc<dyn Store> = Arc::new(
            octo_store_sqlite::SqliteStore::open_in_memory()
                .await
                .unwrap(),
        );
        let data = tempfile::tempdir().unwrap();
        let (key, _) = MasterKey::generate().unwrap();
        let engine = Arc::new(Engine::new(EngineDeps {
            store: store.clone(),
            comms: ServerComms::new(
                Identity::generate("octopus-test").unwrap(),
                TrustStore::new([], Arc::new(|t| format!("trust {t}"))),
                ServerCommsOptions::default(),
            ),
            tool: Arc::new(Err("no tool in this test".into())),
            tentacle: Arc::new(Err("no tentacle in this test".into())),
            packages: PackageFiles::new(data.path(), store.clone(), "node-a"),
            master_key: Arc::new(key),
            task_cap: 10,
            node_name: "node-a".into(),
            limits: StepLimits::default(),
            max_log_bytes_per_step: 1024 * 1024,
            health_scan_interval: DEFAULT_HEALTH_SCAN_INTERVAL,
        }));
        let machine = store
            .create_machine(&NewMachine {
                uri: "https://127.0.0.1:9/".into(),
                ..new_machine("web01", &[], &[])
            })
            .await
            .unwrap();
        Self {
            store,
            engine,
            machine,
            _data: data,
        }
    }

    async fn script_task(&self) -> (Task, Vec<TaskStep>) {
        let args = serde_json::json!({ "script": "true", "machines": ["web01"] });
        self.store
            .create_task_with_steps(
                &new_task("Script", "t", &args, &[self.machine.id]),
                now_ms(),
            )
            .await
            .unwrap()
    }

    /// The cancel as the API makes it: stored, then the engine told.
    async fn cancel(&self, id: &str) {
        self.store.request_cancel(id).await.unwrap();
        self.engine.cancel(id);
    }

    async fn log(&self, id: &str) -> Vec<String> {
        self.store
            .task_log(id, 0, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.text)
            .collect()
    }

    /// Waits until the task's log has a line containing `text`.
    async fn until_logged(&self, id: &str, text: &str) {
        let mut changes = self.engine.subscribe(id);
        let seen = tokio::time::timeout(T, async {
            while !self.log(id).await.iter().any(|l| l.contains(text)) {
                changes.changed().await.unwrap();
            }
        })
        .await;
        assert!(seen.is_ok(), "no '{text}' in {:#?}", self.log(id).await);
    }

    /// Waits for the task's end.
    async fn ended(&self, id: &str) -> Task {
        let mut changes = self.engine.subscribe(id);
        let ended = tokio::time::timeout(T, async {
            loop {
                let now = self.store.task(id).await.unwrap().unwrap();
                if now.state.is_final() {
                    return now;
                }
                changes.changed().await.unwrap();
            }
        })
        .await;
        match ended {
            Ok(task) => task,
            Err(_) => panic!("task {id} did not end; its log: {:#?}", self.log(id).await),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_requested_before_the_engine_has_the_task_stops_it() {
    let f = Fixture::new().await;
    let mark = f.engine.creation_mark();
    let (task, steps) = f.script_task().await;
    // Between the task's creation and its start: nothing running here to stop.
    f.cancel(&task.id).await;
    assert!(!task.cancel_requested, "the task as created");
    f.engine
        .start_created(task.clone(), steps, Vec::new(), mark);
    let ended = f.ended(&task.id).await;
    assert_eq!(ended.state, TaskState::Canceled, "{ended:?}");
    let step = f
        .store
        .task_step(&task.id, f.machine.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(step.state, TaskState::Canceled, "{step:?}");
}

/// A step still trying to reach its machine (the script never started) ends
/// Canceled as soon as it is canceled, not after the minute a started
/// script's cancel is tried for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_never_reached_its_machine_is_canceled_at_once() {
    let f = Fixture::new().await;
    let mark = f.engine.creation_mark();
    let (task, steps) = f.script_task().await;
    f.engine
        .start_created(task.clone(), steps, Vec::new(), mark);
    f.until_logged(&task.id, "cannot reach web01").await;
    f.cancel(&task.id).await;
    let ended = f.ended(&task.id).await;
    assert_eq!(ended.state, TaskState::Canceled, "{ended:?}");
    let log = f.log(&task.id).await;
    assert!(
        log.iter()
            .any(|l| l == "web01: canceled before the script started"),
        "{log:#?}"
    );
}
