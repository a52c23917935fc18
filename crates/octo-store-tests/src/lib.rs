//! The store's contract: what every engine of [`Store`] must do, as a suite of
//! tests that each engine runs on its own stores with [`store_suite!`].
//!
//! Each test is a `pub async fn name(store: &dyn Store)` given a fresh, empty
//! store. Tests about one engine itself (files on disk, its pool, its
//! migrations) stay in that engine's crate; they may use [`fixtures`].

// A test suite: a panic is a failed test.
#![allow(clippy::unwrap_used)]

use octo_store::{
    ticket, AuditEvent, AuditFilter, EndpointKind, HealthFilter, HealthStatus, HealthUpdate,
    MachineFilter, MachineQuery, MachineUpdate, NewAuditEvent, NewMachine, NodeBeat, NodeState,
    Permission, PolicySettings, Role, Store, StoreError, Task, TaskQuery, TaskState,
    TentacleUpdate, DEFAULT_POLICY,
};
use serde_json::json;

pub mod fixtures;
mod package_content;

pub use package_content::*;

use fixtures::{
    names, new_machine, new_package, new_task, server_line, strings, tentacle_line, thumb,
};

/// One `#[tokio::test]` per contract test, each on a fresh store.
///
/// `$factory` is an expression, evaluated once per test, whose value is a future
/// of `(store, guard)`: a fresh, empty store (any [`Store`]) and whatever must
/// live as long as it (its temporary directory; `()` when nothing). The calling
/// crate needs `tokio` (with `macros` and `rt`) among its dev-dependencies.
///
/// ```ignore
/// mod in_memory {
///     octo_store_tests::store_suite!(async { (MyStore::open_in_memory().await.unwrap(), ()) });
/// }
/// ```
#[macro_export]
macro_rules! store_suite {
    ($factory:expr) => {
        $crate::store_suite!(@each $factory;
            users_round_trip_and_are_found_case_insensitively,
            api_keys_authenticate_until_revoked,
            environments_crud_and_delete_in_use_is_refused,
            tenants_keep_their_tags,
            the_default_policy_exists,
            machines_are_created_listed_and_filtered,
            machine_creation_is_checked,
            machines_by_thumbprint_replace_delete_and_health,
            tasks_are_numbered_listed_and_change_state,
            logs_append_once_advance_the_step_and_page,
            packages_are_unique_per_id_and_version_unless_replaced,
            step_output_variables_and_step_log_round_trip,
            spaces_partition_names_and_refuse_deletion_while_machines_remain,
            disabled_users_and_idle_sessions_do_not_authenticate,
            teams_hold_members_and_grants_narrowed_to_environments,
            scoped_environments_cannot_be_deleted_from_under_a_grant,
            audit_events_are_listed_newest_first_and_filtered,
            settings_and_task_secrets_round_trip,
            tasks_are_created_with_their_steps_as_read,
            task_states_change_with_their_line,
            machines_come_in_filtered_pages,
            machines_environments_and_tasks_change_and_page,
            nodes_heartbeat_and_keep_their_drain_flag,
            tasks_are_claimed_by_one_live_node_and_leases_by_one_holder,
            polling_presence_and_step_assignment_follow_live_nodes,
            // Package content (chunked, content-addressed).
            package_content_is_invisible_until_complete_and_reads_back_by_chunks,
            incomplete_or_malformed_package_content_is_refused,
            package_content_is_deleted_only_when_no_package_uses_it,
            abandoned_package_uploads_are_removed_by_node_or_age,
            policies_are_added_and_changed_with_their_tentacle_update,
            // Values to mask (sensitive output variables across nodes).
            task_masks_are_kept_once_in_order_per_task,
            // Fewer round trips per step (issue 15).
            machine_rows_reach_a_machine_without_its_lists,
            every_machine_read_gives_the_lists_in_the_same_order,
            large_log_batches_store_every_line_once_in_order,
            a_task_with_its_log_reads_as_its_parts_do,
            a_step_is_saved_after_its_line,
            a_last_step_ends_with_its_task,
            a_task_starts_with_its_first_step,
            // Every connection asks whether it ends a certificate rotation.
            a_next_certificate_replaces_the_current_one_once,
            polling_thumbprints_are_each_polling_machines_current_and_next,
        );
    };
    (@each $factory:expr; $($test:ident,)+) => {
        $(
            #[::tokio::test]
            async fn $test() {
                let (store, _guard) = $factory.await;
                $crate::$test(&store).await;
            }
        )+
    };
}

pub async fn users_round_trip_and_are_found_case_insensitively(s: &dyn Store) {
    assert_eq!(s.count_users().await.unwrap(), 0);
    let hash = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA";
    let admin = s
        .create_user("Admin", "The Admin", Some(hash))
        .await
        .unwrap();
    assert!(!admin.is_admin, "a new user holds no role");
    let admin = fixtures::make_admin(s, &admin).await;
    assert!(admin.id > 0);
    assert!(admin.is_admin);
    assert_eq!(admin.display_name, "The Admin");
    let robot = s.create_user("robot", "CI", None).await.unwrap();
    assert!(!robot.is_admin);
    assert_eq!(s.count_users().await.unwrap(), 2);

    let (found, found_hash) = s.user_by_name("ADMIN").await.unwrap().unwrap();
    assert_eq!(found, admin);
    assert_eq!(found_hash.as_deref(), Some(hash));
    let (_, no_hash) = s.user_by_name("robot").await.unwrap().unwrap();
    assert_eq!(no_hash, None);
    assert!(s.user_by_name("nobody").await.unwrap().is_none());

    let err = s.create_user("admin", "again", None).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict { kind: "user", .. }),
        "{err:?}"
    );
    assert!(matches!(
        s.create_user(" ", "", None).await,
        Err(StoreError::Invalid(_))
    ));
}

pub async fn api_keys_authenticate_until_revoked(s: &dyn Store) {
    let alice = s.create_user("alice", "Alice", None).await.unwrap();
    let alice = fixtures::make_admin(s, &alice).await;
    let bob = s.create_user("bob", "Bob", None).await.unwrap();
    let a1 = s
        .create_api_key(
            alice.id,
            "admin (created at first start)",
            "AA11",
            "API-AA",
            false,
        )
        .await
        .unwrap();
    let a2 = s
        .create_api_key(alice.id, "laptop", "bb22", "API-BB", false)
        .await
        .unwrap();
    let b1 = s
        .create_api_key(bob.id, "ci", "cc33", "API-CC", false)
        .await
        .unwrap();
    assert_eq!(a1.last_used_at, None);
    assert!(!a1.revoked);
    assert_eq!(a1.prefix, "API-AA");

    // The hash is matched whatever the case of its hex.
    let (key, user) = s
        .authenticate_api_key("aa11", 42_000, i64::MAX)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(key.id, a1.id);
    assert_eq!(key.last_used_at, Some(42_000));
    assert_eq!(user, alice);
    let (key, user) = s
        .authenticate_api_key("CC33", 43_000, i64::MAX)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((key.id, user.id), (b1.id, bob.id));
    assert!(s
        .authenticate_api_key("ffff", 1, i64::MAX)
        .await
        .unwrap()
        .is_none());

    let mine = s.list_api_keys(Some(alice.id)).await.unwrap();
    assert_eq!(
        mine.iter().map(|k| k.id).collect::<Vec<_>>(),
        vec![a1.id, a2.id]
    );
    assert_eq!(mine[0].last_used_at, Some(42_000));
    assert_eq!(s.list_api_keys(None).await.unwrap().len(), 3);

    s.revoke_api_key(a1.id).await.unwrap();
    assert!(s
        .authenticate_api_key("aa11", 50_000, i64::MAX)
        .await
        .unwrap()
        .is_none());
    let listed = s.list_api_keys(Some(alice.id)).await.unwrap();
    assert!(listed[0].revoked);
    assert_eq!(
        listed[0].last_used_at,
        Some(42_000),
        "a refused key is not marked used"
    );
    let (key, _) = s
        .authenticate_api_key("bb22", 50_000, i64::MAX)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(key.last_used_at, Some(50_000));
    // The use time is recorded again only once it is a grain old (a minute
    // here): most requests only read.
    let grain = octo_store::api_key_use_grain_ms(i64::MAX);
    assert_eq!(grain, 60_000);
    let (key, _) = s
        .authenticate_api_key("bb22", 50_000 + grain, i64::MAX)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        key.last_used_at,
        Some(50_000),
        "within the grain: not written"
    );
    let stored = s.api_key(key.id).await.unwrap().unwrap();
    assert_eq!(stored.last_used_at, Some(50_000));
    let (key, _) = s
        .authenticate_api_key("bb22", 50_001 + grain, i64::MAX)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(key.last_used_at, Some(50_001 + grain));
    let stored = s.api_key(key.id).await.unwrap().unwrap();
    assert_eq!(stored.last_used_at, Some(50_001 + grain));

    assert!(matches!(
        s.revoke_api_key(9_999).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        s.create_api_key(9_999, "x", "dd44", "API-DD", false).await,
        Err(StoreError::NotFound { kind: "user", .. })
    ));
    assert!(matches!(
        s.create_api_key(bob.id, "x", "CC33", "API-CC", false).await,
        Err(StoreError::Conflict {
            kind: "API key",
            ..
        })
    ));
}

pub async fn environments_crud_and_delete_in_use_is_refused(s: &dyn Store) {
    let prod = s.create_environment(1, "Production", "live").await.unwrap();
    s.create_environment(1, "dev", "").await.unwrap();
    s.create_environment(1, "Staging", "").await.unwrap();
    assert_eq!(prod.description, "live");
    let listed: Vec<String> = s
        .list_environments(1)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(
        listed,
        ["Production", "dev", "Staging"],
        "in the space's order: new ones last"
    );
    assert_eq!(s.environment(1, "PRODUCTION").await.unwrap(), Some(prod));
    assert!(s.environment(1, "qa").await.unwrap().is_none());
    assert!(matches!(
        s.create_environment(1, "production", "").await,
        Err(StoreError::Conflict {
            kind: "environment",
            ..
        })
    ));

    s.create_machine(&new_machine("web01", &["Production"], &["web"]))
        .await
        .unwrap();
    s.create_machine(&new_machine("web02", &["production", "Staging"], &["web"]))
        .await
        .unwrap();
    let err = s.delete_environment(1, "production").await.unwrap_err();
    let StoreError::Invalid(message) = err else {
        panic!("expected Invalid, got {err:?}")
    };
    assert_eq!(
        message,
        "environment 'Production' is used by 2 machine(s): web01, web02; move or delete them first"
    );
    assert!(s.environment(1, "Production").await.unwrap().is_some());

    s.delete_environment(1, "dev").await.unwrap();
    assert!(s.environment(1, "dev").await.unwrap().is_none());
    assert!(matches!(
        s.delete_environment(1, "dev").await,
        Err(StoreError::NotFound { .. })
    ));

    s.delete_machine(1, "web01").await.unwrap();
    s.delete_machine(1, "web02").await.unwrap();
    s.delete_environment(1, "Production").await.unwrap();
    s.delete_environment(1, "staging").await.unwrap();
    assert!(s.list_environments(1).await.unwrap().is_empty());
}

pub async fn tenants_keep_their_tags(s: &dyn Store) {
    let acme = s
        .create_tenant(
            1,
            "Acme",
            &strings(&["Tier/Gold", "Region/EU", "Tier/Gold"]),
        )
        .await
        .unwrap();
    assert_eq!(
        acme.tags,
        ["Region/EU", "Tier/Gold"],
        "sorted, duplicates dropped"
    );
    s.create_tenant(1, "beta", &[]).await.unwrap();
    let tenants = s.list_tenants(1).await.unwrap();
    assert_eq!(tenants.len(), 2);
    assert_eq!(tenants[0], acme);
    assert_eq!(tenants[1].name, "beta");
    assert!(tenants[1].tags.is_empty());
    assert!(matches!(
        s.create_tenant(1, "ACME", &[]).await,
        Err(StoreError::Conflict { kind: "tenant", .. })
    ));
}

pub async fn the_default_policy_exists(s: &dyn Store) {
    let p = s.policy(1, DEFAULT_POLICY).await.unwrap().unwrap();
    assert_eq!(p.name, DEFAULT_POLICY);
    assert_eq!(
        (
            p.health_check_interval_s,
            p.health_check_timeout_s,
            p.polling_wait_s
        ),
        (3600, 60, 120)
    );
    assert!(s.policy(1, "Nope").await.unwrap().is_none());
    assert_eq!(p.tentacle_update, TentacleUpdate::Manual);
}

pub async fn machines_are_created_listed_and_filtered(s: &dyn Store) {
    for env in ["Production", "Staging", "Dev"] {
        s.create_environment(1, env, "").await.unwrap();
    }
    s.create_tenant(1, "Acme", &strings(&["Tier/Gold"]))
        .await
        .unwrap();
    s.create_tenant(1, "Globex", &[]).await.unwrap();

    let mut web01 = new_machine("web01", &["Production"], &["web", "app"]);
    web01.tenants = strings(&["acme"]);
    web01.tenant_tags = strings(&["Tier/Gold"]);
    let web01 = s.create_machine(&web01).await.unwrap();
    assert!(web01.id > 0);
    assert_eq!(
        web01.environments,
        ["Production"],
        "names as stored, not as given"
    );
    assert_eq!(web01.roles, ["app", "web"]);
    assert_eq!(web01.tenants, ["Acme"]);
    assert_eq!(web01.tenant_tags, ["Tier/Gold"]);
    assert_eq!(web01.policy, DEFAULT_POLICY);
    assert_eq!(web01.status, HealthStatus::Unknown);
    assert_eq!(web01.status_reason, "");
    assert_eq!(web01.last_health_at, None);
    assert!(web01.created_at > 0);

    let mut db01 = new_machine("DB01", &["production", "Staging"], &["db"]);
    db01.kind = EndpointKind::Polling;
    db01.uri = "poll://abcdef/".into();
    db01.tenants = strings(&["Globex", "Acme"]);
    db01.thumbprint = thumb('b');
    let db01 = s.create_machine(&db01).await.unwrap();
    assert_eq!(db01.kind, EndpointKind::Polling);
    assert_eq!(
        db01.thumbprint,
        thumb('B'),
        "thumbprints are stored in upper case"
    );
    assert_eq!(db01.environments, ["Production", "Staging"]);
    assert_eq!(db01.tenants, ["Acme", "Globex"]);

    let mut worker = new_machine("worker1", &[], &[]);
    worker.worker_pool = Some("Default Worker Pool".into());
    worker.policy = Some(DEFAULT_POLICY.to_lowercase());
    let worker = s.create_machine(&worker).await.unwrap();
    assert_eq!(worker.worker_pool.as_deref(), Some("Default Worker Pool"));
    assert!(worker.environments.is_empty());

    assert_eq!(s.machine(1, "WEB01").await.unwrap(), Some(web01.clone()));
    assert_eq!(s.machine_by_id(db01.id).await.unwrap(), Some(db01.clone()));
    assert!(s.machine(1, "web99").await.unwrap().is_none());
    assert!(s.machine_by_id(9_999).await.unwrap().is_none());

    let all = s.list_machines(&MachineFilter::default()).await.unwrap();
    assert_eq!(names(&all), ["DB01", "web01", "worker1"]);
    assert_eq!(all[1], web01, "listed machines are fully populated");

    let filter = |names: &[&str], envs: &[&str], roles: &[&str], tenants: &[&str]| MachineFilter {
        space_id: Some(1),
        names: strings(names),
        environments: strings(envs),
        roles: strings(roles),
        tenants: strings(tenants),
    };
    let list = |f: MachineFilter| async move {
        names(&s.list_machines(&f).await.unwrap())
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        list(filter(&["db01", "WORKER1", "missing"], &[], &[], &[])).await,
        ["DB01", "worker1"]
    );
    assert_eq!(
        list(filter(&[], &["PRODUCTION"], &[], &[])).await,
        ["DB01", "web01"]
    );
    assert_eq!(
        list(filter(&[], &["staging", "dev"], &[], &[])).await,
        ["DB01"]
    );
    assert_eq!(
        list(filter(&[], &["Dev"], &[], &[])).await,
        Vec::<String>::new()
    );
    assert_eq!(list(filter(&[], &[], &["WEB"], &[])).await, ["web01"]);
    assert_eq!(
        list(filter(&[], &[], &["web", "db"], &[])).await,
        ["DB01", "web01"]
    );
    assert_eq!(list(filter(&[], &[], &[], &["globex"])).await, ["DB01"]);
    assert_eq!(
        list(filter(&[], &[], &[], &["acme"])).await,
        ["DB01", "web01"]
    );
    // Every non-empty dimension must match.
    assert_eq!(
        list(filter(&[], &["Production"], &["db"], &[])).await,
        ["DB01"]
    );
    assert_eq!(
        list(filter(&["web01"], &["Production"], &["db"], &[])).await,
        Vec::<String>::new()
    );
    assert_eq!(
        list(filter(
            &["web01", "db01"],
            &["production"],
            &["web", "db"],
            &["Acme"]
        ))
        .await,
        ["DB01", "web01"]
    );
}

pub async fn machine_creation_is_checked(s: &dyn Store) {
    s.create_environment(1, "Production", "").await.unwrap();
    s.create_machine(&new_machine("web01", &["Production"], &[]))
        .await
        .unwrap();

    let err = s
        .create_machine(&new_machine("WEB01", &["Production"], &[]))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict { kind: "machine", name } if name == "WEB01"),
        "{err:?}"
    );

    let err = s
        .create_machine(&new_machine("web02", &["Production", "Prod"], &[]))
        .await
        .unwrap_err();
    let StoreError::Invalid(message) = err else {
        panic!("expected Invalid, got {err:?}")
    };
    assert_eq!(
        message,
        "environment 'Prod' does not exist; create it with `octopus environment create Prod`"
    );

    let err = s
        .create_machine(&new_machine("web02", &["My Env"], &[]))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("`octopus environment create 'My Env'`"),
        "{err}"
    );

    let mut m = new_machine("web02", &["Production"], &[]);
    m.tenants = strings(&["Acme"]);
    let err = s.create_machine(&m).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Invalid(msg) if msg.starts_with("tenant 'Acme' does not exist")),
        "{err:?}"
    );

    let mut m = new_machine("web02", &["Production"], &[]);
    m.policy = Some("Strict".into());
    let err = s.create_machine(&m).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Invalid(msg) if msg.starts_with("machine policy 'Strict' does not exist"))
    );

    assert!(matches!(
        s.create_machine(&new_machine("", &[], &[])).await,
        Err(StoreError::Invalid(_))
    ));
    let mut m = new_machine("web02", &[], &[]);
    m.roles = strings(&[""]);
    assert!(matches!(
        s.create_machine(&m).await,
        Err(StoreError::Invalid(_))
    ));

    // Nothing was left behind by the refused ones.
    assert_eq!(
        names(&s.list_machines(&MachineFilter::default()).await.unwrap()),
        ["web01"]
    );
}

pub async fn machines_by_thumbprint_replace_delete_and_health(s: &dyn Store) {
    s.create_environment(1, "Production", "").await.unwrap();
    s.create_environment(1, "Staging", "").await.unwrap();
    let a = s
        .create_machine(&new_machine("a", &["Production"], &["web"]))
        .await
        .unwrap();
    let b = s
        .create_machine(&new_machine("b", &["Production"], &["web"]))
        .await
        .unwrap();
    let mut c = new_machine("c", &[], &[]);
    c.thumbprint = thumb('C');
    let c = s.create_machine(&c).await.unwrap();

    // A cloned image: two machines present the same certificate.
    let same = s
        .machines_by_thumbprint(Some(1), &thumb('a'))
        .await
        .unwrap();
    assert_eq!(names(&same), ["a", "b"]);
    assert_eq!(
        s.machines_by_thumbprint(Some(1), &thumb('C'))
            .await
            .unwrap(),
        vec![c.clone()]
    );
    assert!(s
        .machines_by_thumbprint(Some(1), &thumb('D'))
        .await
        .unwrap()
        .is_empty());

    // Health.
    let h = HealthUpdate {
        status: HealthStatus::Healthy,
        reason: String::new(),
        at: 10_000,
        tentacle_version: Some("8.1.0".into()),
        tool_version: Some("1.2.3".into()),
        os: Some("linux Debian 12 x86_64".into()),
        free_bytes: Some(5 << 30),
    };
    s.record_health(a.id, &h).await.unwrap();
    let got = s.machine(1, "a").await.unwrap().unwrap();
    assert_eq!(got.status, HealthStatus::Healthy);
    assert_eq!(got.last_health_at, Some(10_000));
    assert_eq!(got.tentacle_version.as_deref(), Some("8.1.0"));
    assert_eq!(got.tool_version.as_deref(), Some("1.2.3"));
    assert_eq!(got.os.as_deref(), Some("linux Debian 12 x86_64"));
    assert_eq!(got.free_bytes, Some(5 << 30));
    let down = HealthUpdate {
        status: HealthStatus::Unavailable,
        reason: "connection refused".into(),
        at: 20_000,
        tentacle_version: None,
        tool_version: None,
        os: None,
        free_bytes: None,
    };
    s.record_health(a.id, &down).await.unwrap();
    let got = s.machine(1, "a").await.unwrap().unwrap();
    assert_eq!(got.status, HealthStatus::Unavailable);
    assert_eq!(got.status_reason, "connection refused");
    assert_eq!(got.last_health_at, Some(20_000));
    assert_eq!(
        got.tentacle_version.as_deref(),
        Some("8.1.0"),
        "last known version kept"
    );
    // An older result arriving late does not overwrite a newer one.
    s.record_health(
        a.id,
        &HealthUpdate {
            at: 15_000,
            ..h.clone()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        s.machine(1, "a").await.unwrap().unwrap().status,
        HealthStatus::Unavailable
    );
    assert!(matches!(
        s.record_health(9_999, &h).await,
        Err(StoreError::NotFound { .. })
    ));

    // Replace keeps the id and rewrites everything else.
    let mut again = new_machine("A", &["Staging"], &["api"]);
    again.thumbprint = thumb('e');
    again.kind = EndpointKind::Polling;
    again.uri = "poll://new/".into();
    let replaced = s.replace_machine(&again).await.unwrap();
    assert_eq!(replaced.id, a.id);
    assert_eq!(replaced.created_at, a.created_at);
    assert_eq!(replaced.name, "A");
    assert_eq!(replaced.kind, EndpointKind::Polling);
    assert_eq!(replaced.uri, "poll://new/");
    assert_eq!(replaced.thumbprint, thumb('E'));
    assert_eq!(replaced.environments, ["Staging"]);
    assert_eq!(replaced.roles, ["api"]);
    assert_eq!(replaced.status, HealthStatus::Unknown);
    assert_eq!(replaced.last_health_at, None);
    assert_eq!(s.machine(1, "a").await.unwrap(), Some(replaced));
    assert_eq!(
        names(
            &s.machines_by_thumbprint(Some(1), &thumb('A'))
                .await
                .unwrap()
        ),
        ["b"]
    );
    assert!(matches!(
        s.replace_machine(&new_machine("zz", &[], &[])).await,
        Err(StoreError::NotFound {
            kind: "machine",
            ..
        })
    ));
    assert!(matches!(
        s.replace_machine(&new_machine("b", &["Nope"], &[])).await,
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(
        s.machine(1, "b").await.unwrap(),
        Some(b.clone()),
        "a refused replace changes nothing"
    );

    // Delete.
    s.delete_machine(1, "B").await.unwrap();
    assert!(s.machine(1, "b").await.unwrap().is_none());
    assert!(matches!(
        s.delete_machine(1, "b").await,
        Err(StoreError::NotFound {
            kind: "machine",
            ..
        })
    ));
    assert_eq!(
        names(&s.list_machines(&MachineFilter::default()).await.unwrap()),
        ["A", "c"]
    );
    // Its name can be used again, and its id is not.
    let b2 = s.create_machine(&new_machine("b", &[], &[])).await.unwrap();
    assert!(b2.id > c.id);
}

pub async fn tasks_are_created_with_their_steps_as_read(s: &dyn Store) {
    let mut ids = Vec::new();
    for name in ["web01", "Cache01", "db01", "cache00"] {
        let m = s
            .create_machine(&new_machine(name, &[], &[]))
            .await
            .unwrap();
        ids.push(m.id);
    }
    ids.push(ids[0]);
    let args = json!({"script": "true"});
    let (task, created) = s
        .create_task_with_steps(&new_task("Script", "Run a script", &args, &ids), 900)
        .await
        .unwrap();
    let names: Vec<&str> = created.iter().map(|s| s.machine_name.as_str()).collect();
    assert_eq!(names, ["cache00", "Cache01", "db01", "web01"]);
    assert_eq!(created, s.task_steps(&task.id).await.unwrap());
    assert_eq!(Some(task.clone()), s.task(&task.id).await.unwrap());
    assert!(created.iter().all(|st| st.state == TaskState::Queued
        && st.ticket == ticket(&task.id, st.machine_id)
        && st.task_id == task.id));
    // A machine that does not exist: no task, and no record of one.
    let started = NewAuditEvent {
        at: 901,
        user_id: None,
        username: "alice".into(),
        source: "127.0.0.1".into(),
        action: "started".into(),
        kind: "task".into(),
        object: "replaced by the task's id".into(),
        space_id: Some(1),
        details: "Run a script".into(),
    };
    let mut gone = new_task("Script", "Run a script", &args, &[ids[0], 999_999]);
    gone.audit = Some(started.clone());
    gone.secrets = vec![("PW".into(), "ciphertext".into())];
    let err = s.create_task_with_steps(&gone, 901).await.unwrap_err();
    assert!(
        err.to_string().contains("machine #999999 does not exist"),
        "{err}"
    );
    assert_eq!(s.list_tasks(None, 10).await.unwrap().len(), 1);
    // Nor steps or secrets under the number it would have had.
    let next = format!(
        "ServerTasks-{}",
        task.id["ServerTasks-".len()..].parse::<i64>().unwrap() + 1
    );
    assert!(s.task_steps(&next).await.unwrap().is_empty());
    assert!(s.task_secrets(&next).await.unwrap().is_empty());
    let audit = AuditFilter {
        include_system: true,
        limit: 100,
        ..AuditFilter::default()
    };
    assert!(s.list_audit(&audit).await.unwrap().is_empty());
    // Recorded with the task, under its id.
    let mut audited = new_task("Script", "Run a script", &args, &[ids[1]]);
    audited.audit = Some(started);
    audited.secrets = vec![("PW".into(), "ciphertext".into())];
    let (task, _) = s.create_task_with_steps(&audited, 902).await.unwrap();
    assert_eq!(
        s.task_secrets(&task.id).await.unwrap(),
        [("PW".to_string(), "ciphertext".to_string())]
    );
    // No machine: a task of no steps (the count of machines is not checked).
    let (empty, steps) = s
        .create_task_with_steps(&new_task("Script", "none", &args, &[]), 903)
        .await
        .unwrap();
    assert!(steps.is_empty());
    assert_eq!(Some(empty.clone()), s.task(&empty.id).await.unwrap());
    let events = s.list_audit(&audit).await.unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        (events[0].object.as_str(), events[0].username.as_str()),
        (task.id.as_str(), "alice")
    );
    assert_eq!(events[0].space.as_deref(), Some("Default"));
}

pub async fn task_states_change_with_their_line(s: &dyn Store) {
    let m = s
        .create_machine(&new_machine("web01", &[], &[]))
        .await
        .unwrap();
    let t = s
        .create_task(&new_task("Script", "x", &json!({}), &[m.id]), 1)
        .await
        .unwrap();
    let texts = |lines: Vec<octo_store::TaskLogLine>| -> Vec<String> {
        lines.into_iter().map(|l| l.text).collect()
    };
    s.set_task_state_logged(
        &t.id,
        TaskState::Executing,
        None,
        5,
        &server_line("Task started"),
    )
    .await
    .unwrap();
    let task = s.task(&t.id).await.unwrap().unwrap();
    assert_eq!(
        (task.state, task.started_at),
        (TaskState::Executing, Some(5))
    );
    s.set_task_state_logged(
        &t.id,
        TaskState::Failed,
        Some("boom"),
        9,
        &server_line("Task finished"),
    )
    .await
    .unwrap();
    let task = s.task(&t.id).await.unwrap().unwrap();
    assert_eq!(
        (task.state, task.error.as_deref(), task.completed_at),
        (TaskState::Failed, Some("boom"), Some(9))
    );
    assert_eq!(
        texts(s.task_log(&t.id, 0, 10).await.unwrap()),
        ["Task started", "Task finished"]
    );
    // A final state never changes: the line is stored all the same, and the
    // error says why.
    assert!(matches!(
        s.set_task_state_logged(&t.id, TaskState::Executing, None, 12, &server_line("late"))
            .await,
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(
        s.task(&t.id).await.unwrap().unwrap().state,
        TaskState::Failed
    );
    assert_eq!(
        texts(s.task_log(&t.id, 0, 10).await.unwrap()),
        ["Task started", "Task finished", "late"]
    );
    // No such task: said so, and nothing stored.
    let missing = s
        .set_task_state_logged(
            "ServerTasks-99",
            TaskState::Executing,
            None,
            1,
            &server_line("x"),
        )
        .await;
    assert!(
        matches!(&missing, Err(StoreError::NotFound { kind: "task", name }) if name == "ServerTasks-99"),
        "{missing:?}"
    );
    assert!(s
        .task_log("ServerTasks-99", 0, 10)
        .await
        .unwrap()
        .is_empty());
}

pub async fn tasks_are_numbered_listed_and_change_state(s: &dyn Store) {
    let m1 = s
        .create_machine(&new_machine("web01", &[], &[]))
        .await
        .unwrap();
    let m2 = s
        .create_machine(&new_machine("db01", &[], &[]))
        .await
        .unwrap();
    let args = json!({"script": "echo hi", "syntax": "Bash"});
    let t1 = s
        .create_task(
            &new_task("Script", "Run a script", &args, &[m1.id, m2.id, m1.id]),
            1_000,
        )
        .await
        .unwrap();
    assert_eq!(t1.id, "ServerTasks-1");
    assert_eq!(t1.kind, "Script");
    assert_eq!(t1.description, "Run a script");
    assert_eq!(t1.state, TaskState::Queued);
    assert_eq!(t1.arguments, args);
    assert_eq!(t1.created_at, 1_000);
    assert_eq!(
        (
            t1.error.as_deref(),
            t1.cancel_requested,
            t1.started_at,
            t1.completed_at
        ),
        (None, false, None, None)
    );

    let steps = s.task_steps(&t1.id).await.unwrap();
    assert_eq!(steps.len(), 2, "one step per machine, duplicates dropped");
    assert_eq!(steps[0].machine_name, "db01");
    assert_eq!(steps[1].machine_name, "web01");
    for step in &steps {
        assert_eq!(step.task_id, t1.id);
        assert_eq!(step.state, TaskState::Queued);
        assert_eq!(step.ticket, ticket(&t1.id, step.machine_id));
        assert_eq!(step.ticket, format!("ServerTasks-1-m{}", step.machine_id));
        assert!(step.ticket.len() <= 128);
        assert!(step
            .ticket
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')));
        assert_eq!(step.next_sequence, 0);
        assert_eq!(step.exit_code, None);
    }

    let t2 = s
        .create_task(
            &new_task("Health", "Check health", &json!(null), &[m1.id]),
            2_000,
        )
        .await
        .unwrap();
    let t3 = s
        .create_task(&new_task("Health", "Check health", &json!({}), &[]), 3_000)
        .await
        .unwrap();
    assert_eq!(t2.id, "ServerTasks-2");
    assert_eq!(t3.id, "ServerTasks-3");
    assert!(s.task_steps(&t3.id).await.unwrap().is_empty());
    assert!(s.task_steps("ServerTasks-99").await.unwrap().is_empty());
    let err = s
        .create_task(&new_task("Script", "x", &json!({}), &[9_999]), 4_000)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");

    let ids = |ts: Vec<Task>| ts.into_iter().map(|t| t.id).collect::<Vec<_>>();
    assert_eq!(
        ids(s.list_tasks(None, 10).await.unwrap()),
        ["ServerTasks-3", "ServerTasks-2", "ServerTasks-1"]
    );
    assert_eq!(
        ids(s.list_tasks(None, 2).await.unwrap()),
        ["ServerTasks-3", "ServerTasks-2"]
    );
    assert_eq!(s.task(&t1.id).await.unwrap(), Some(t1.clone()));
    assert!(s.task("ServerTasks-99").await.unwrap().is_none());

    // States.
    s.set_task_state(&t1.id, TaskState::Executing, None, 1_100)
        .await
        .unwrap();
    let got = s.task(&t1.id).await.unwrap().unwrap();
    assert_eq!(
        (got.state, got.started_at, got.completed_at),
        (TaskState::Executing, Some(1_100), None)
    );
    s.set_task_state(&t1.id, TaskState::Failed, Some("web01 failed"), 1_500)
        .await
        .unwrap();
    let got = s.task(&t1.id).await.unwrap().unwrap();
    assert_eq!(got.state, TaskState::Failed);
    assert_eq!(got.error.as_deref(), Some("web01 failed"));
    assert_eq!(
        (got.started_at, got.completed_at),
        (Some(1_100), Some(1_500))
    );
    // Final states never change again.
    assert!(matches!(
        s.set_task_state(&t1.id, TaskState::Executing, None, 1_600)
            .await,
        Err(StoreError::Invalid(_))
    ));
    s.set_task_state(&t1.id, TaskState::Failed, None, 1_700)
        .await
        .unwrap();
    assert_eq!(
        s.task(&t1.id).await.unwrap().unwrap().completed_at,
        Some(1_500)
    );
    assert!(matches!(
        s.set_task_state("ServerTasks-99", TaskState::Executing, None, 1)
            .await,
        Err(StoreError::NotFound { kind: "task", .. })
    ));

    s.set_task_state(&t2.id, TaskState::Executing, None, 2_100)
        .await
        .unwrap();
    assert_eq!(
        ids(s.unfinished_tasks().await.unwrap()),
        ["ServerTasks-3", "ServerTasks-2"]
    );

    // Cancellation.
    s.request_cancel(&t2.id).await.unwrap();
    assert!(s.task(&t2.id).await.unwrap().unwrap().cancel_requested);
    assert!(!s.task(&t3.id).await.unwrap().unwrap().cancel_requested);
    s.request_cancel(&t1.id).await.unwrap();
    assert!(
        !s.task(&t1.id).await.unwrap().unwrap().cancel_requested,
        "finished: nothing to cancel"
    );
    assert!(matches!(
        s.request_cancel("ServerTasks-99").await,
        Err(StoreError::NotFound { .. })
    ));
    s.set_task_state(&t2.id, TaskState::Canceled, None, 2_200)
        .await
        .unwrap();
    s.set_task_state(&t3.id, TaskState::Canceled, None, 3_100)
        .await
        .unwrap();
    let t3 = s.task(&t3.id).await.unwrap().unwrap();
    assert_eq!(
        (t3.started_at, t3.completed_at),
        (None, Some(3_100)),
        "canceled before it started"
    );
    assert!(s.unfinished_tasks().await.unwrap().is_empty());

    // Steps.
    let mut step = s.task_steps(&t1.id).await.unwrap().remove(1);
    step.state = TaskState::Failed;
    step.exit_code = Some(3);
    step.error = Some("exit code 3".into());
    step.started_at = Some(1_200);
    step.completed_at = Some(1_400);
    step.next_sequence = 7;
    s.update_step(&step).await.unwrap();
    assert_eq!(s.task_steps(&t1.id).await.unwrap()[1], step);
    step.machine_id = 9_999;
    assert!(matches!(
        s.update_step(&step).await,
        Err(StoreError::NotFound { .. })
    ));

    // The history outlives the machine.
    s.delete_machine(1, "web01").await.unwrap();
    assert_eq!(s.task_steps(&t1.id).await.unwrap()[1].machine_name, "web01");
}

pub async fn logs_append_once_advance_the_step_and_page(s: &dyn Store) {
    let m1 = s
        .create_machine(&new_machine("web01", &[], &[]))
        .await
        .unwrap();
    let m2 = s
        .create_machine(&new_machine("web02", &[], &[]))
        .await
        .unwrap();
    let task = s
        .create_task(&new_task("Script", "x", &json!({}), &[m1.id, m2.id]), 1)
        .await
        .unwrap();
    let other = s
        .create_task(&new_task("Script", "y", &json!({}), &[m1.id]), 2)
        .await
        .unwrap();

    s.append_log(&task.id, &[server_line("starting")])
        .await
        .unwrap();
    s.append_log(
        &task.id,
        &[tentacle_line(m1.id, 0, "a0"), tentacle_line(m1.id, 1, "a1")],
    )
    .await
    .unwrap();
    s.append_log(&other.id, &[tentacle_line(m1.id, 0, "other")])
        .await
        .unwrap();
    // A resumed stream sends 1 again; 2 and web02's 0 are new.
    s.append_log(
        &task.id,
        &[
            tentacle_line(m1.id, 1, "a1 again"),
            tentacle_line(m1.id, 2, "a2"),
            tentacle_line(m2.id, 0, "b0"),
        ],
    )
    .await
    .unwrap();
    s.append_log(&task.id, &[server_line("starting"), server_line("done")])
        .await
        .unwrap();
    s.append_log(&task.id, &[]).await.unwrap();

    let log = s.task_log(&task.id, 0, 100).await.unwrap();
    let texts: Vec<&str> = log.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(
        texts,
        ["starting", "a0", "a1", "a2", "b0", "starting", "done"],
        "server lines never collide"
    );
    assert!(log.windows(2).all(|w| w[0].id < w[1].id));
    assert!(log.iter().all(|l| l.task_id == task.id));
    assert_eq!(
        (log[0].machine_id, log[0].sequence, log[0].stream.as_str()),
        (None, None, "server")
    );
    assert_eq!(
        (log[2].machine_id, log[2].sequence, log[2].timestamp),
        (Some(m1.id), Some(1), 1_001)
    );

    let steps = s.task_steps(&task.id).await.unwrap();
    assert_eq!(steps[0].next_sequence, 3, "web01 stored 0..=2");
    assert_eq!(steps[1].next_sequence, 1, "web02 stored 0");
    assert_eq!(s.task_steps(&other.id).await.unwrap()[0].next_sequence, 1);
    // Lines that arrive out of order never move the resume point back.
    s.append_log(&task.id, &[tentacle_line(m1.id, 0, "a0 again")])
        .await
        .unwrap();
    assert_eq!(s.task_steps(&task.id).await.unwrap()[0].next_sequence, 3);
    // Nor does a step saved from an older read.
    let mut stale = steps[0].clone();
    stale.next_sequence = 1;
    stale.state = TaskState::Executing;
    s.update_step(&stale).await.unwrap();
    let now = &s.task_steps(&task.id).await.unwrap()[0];
    assert_eq!((now.state, now.next_sequence), (TaskState::Executing, 3));

    // Paging: ids after the last one seen, at most `limit`.
    let page1 = s.task_log(&task.id, 0, 3).await.unwrap();
    assert_eq!(page1.len(), 3);
    let page2 = s.task_log(&task.id, page1[2].id, 3).await.unwrap();
    let page3 = s.task_log(&task.id, page2[2].id, 3).await.unwrap();
    assert_eq!(page3.len(), 1);
    assert!(s
        .task_log(&task.id, page3[0].id, 3)
        .await
        .unwrap()
        .is_empty());
    let all: Vec<_> = page1.into_iter().chain(page2).chain(page3).collect();
    assert_eq!(all, log);
    assert_eq!(s.task_log(&other.id, 0, 100).await.unwrap().len(), 1);

    assert!(matches!(
        s.append_log("ServerTasks-99", &[server_line("x")]).await,
        Err(StoreError::NotFound { kind: "task", .. })
    ));
}

pub async fn packages_are_unique_per_id_and_version_unless_replaced(store: &dyn Store) {
    let (a, prev) = store
        .put_package(&new_package("Acme.Web", "1.0.0", 'a'), false, 1)
        .await
        .unwrap();
    assert!(prev.is_none());
    store
        .put_package(&new_package("Acme.Web", "1.1.0", 'b'), false, 2)
        .await
        .unwrap();
    store
        .put_package(&new_package("Other", "1.0.0", 'a'), false, 3)
        .await
        .unwrap();
    // Same ID (any case) and version: refused, then replaced on request.
    let err = store
        .put_package(&new_package("acme.web", "1.0.0", 'c'), false, 4)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    let (replaced, prev) = store
        .put_package(&new_package("acme.web", "1.0.0", 'c'), true, 5)
        .await
        .unwrap();
    assert_eq!(replaced.id, a.id);
    assert_eq!(replaced.sha256, thumb('c'));
    assert_eq!(prev.unwrap().sha256, "a".repeat(64));

    let web = store.list_packages(1, Some("ACME.WEB")).await.unwrap();
    let versions: Vec<&str> = web.iter().map(|p| p.version.as_str()).collect();
    assert_eq!(versions, ["1.1.0", "1.0.0"], "by upload time");
    assert_eq!(store.list_packages(1, None).await.unwrap().len(), 3);
    assert_eq!(
        store
            .count_packages_with_sha256(&"a".repeat(64))
            .await
            .unwrap(),
        1
    );
    assert!(store
        .package(1, "Acme.Web", "1.1.0")
        .await
        .unwrap()
        .is_some());
    let gone = store.delete_package(1, "Acme.Web", "1.1.0").await.unwrap();
    assert_eq!(gone.version, "1.1.0");
    assert!(store
        .package(1, "Acme.Web", "1.1.0")
        .await
        .unwrap()
        .is_none());
    let err = store
        .delete_package(1, "Acme.Web", "1.1.0")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
}

pub async fn step_output_variables_and_step_log_round_trip(store: &dyn Store) {
    store.create_environment(1, "Test", "").await.unwrap();
    let m = store
        .create_machine(&new_machine("web-1", &["Test"], &[]))
        .await
        .unwrap();
    let task = store
        .create_task(&new_task("Deploy", "d", &json!({}), &[m.id]), 1)
        .await
        .unwrap();
    let mut step = store.task_steps(&task.id).await.unwrap().remove(0);
    assert!(step.output_variables.is_empty());
    step.output_variables
        .insert("Url".into(), "http://x/?a='b'".into());
    store.update_step(&step).await.unwrap();
    let again = store.task_steps(&task.id).await.unwrap().remove(0);
    assert_eq!(again.output_variables, step.output_variables);

    store
        .append_log(
            &task.id,
            &[
                server_line("server"),
                tentacle_line(m.id, 0, "one"),
                tentacle_line(m.id, 1, "two"),
            ],
        )
        .await
        .unwrap();
    let lines = store.step_log(&task.id, m.id).await.unwrap();
    let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(texts, ["one", "two"]);
    // Its size counts the machine's lines only, in UTF-8 bytes.
    store
        .append_log(&task.id, &[tentacle_line(m.id, 2, "drei \u{fc}")])
        .await
        .unwrap();
    assert_eq!(
        store.step_log_size(&task.id, m.id).await.unwrap(),
        (3, 3 + 3 + 7)
    );
    assert_eq!(
        store.step_log_size(&task.id, m.id + 1).await.unwrap(),
        (0, 0)
    );
}

pub async fn spaces_partition_names_and_refuse_deletion_while_machines_remain(s: &dyn Store) {
    let spaces = s.list_spaces().await.unwrap();
    assert_eq!(spaces.len(), 1);
    assert_eq!((spaces[0].id, spaces[0].name.as_str()), (1, "Default"));
    assert!(spaces[0].is_default);
    let ops = s.create_space("Ops", "the ops team").await.unwrap();
    assert!(!ops.is_default);
    assert!(matches!(
        s.create_space("OPS", "").await,
        Err(StoreError::Conflict { kind: "space", .. })
    ));
    assert_eq!(s.space_by_name("ops").await.unwrap().unwrap().id, ops.id);
    assert_eq!(s.space_by_id(ops.id).await.unwrap().unwrap().name, "Ops");
    // Each space has its own default policy.
    let policy = s.policy(ops.id, DEFAULT_POLICY).await.unwrap().unwrap();
    assert_eq!(policy.space_id, ops.id);
    assert_ne!(
        policy.id,
        s.policy(1, DEFAULT_POLICY).await.unwrap().unwrap().id
    );

    // The same names in two spaces are two things.
    s.create_environment(1, "Prod", "").await.unwrap();
    let ops_prod = s.create_environment(ops.id, "Prod", "").await.unwrap();
    assert_eq!(ops_prod.space_id, ops.id);
    assert_eq!(s.list_environments(ops.id).await.unwrap().len(), 1);
    let mut m = new_machine("web", &["Prod"], &["web"]);
    s.create_machine(&m).await.unwrap();
    m.space_id = ops.id;
    let in_ops = s.create_machine(&m).await.unwrap();
    assert_eq!(in_ops.space_id, ops.id);
    assert_eq!(in_ops.environments, ["Prod"]);
    assert_eq!(
        s.machine(ops.id, "WEB").await.unwrap().unwrap().id,
        in_ops.id
    );
    assert_eq!(
        s.list_machines(&MachineFilter::space(ops.id))
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        s.list_machines(&MachineFilter::default())
            .await
            .unwrap()
            .len(),
        2,
        "no space: every space"
    );
    assert_eq!(
        s.machines_by_thumbprint(None, &thumb('A'))
            .await
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        s.machines_by_thumbprint(Some(ops.id), &thumb('A'))
            .await
            .unwrap()
            .len(),
        1
    );
    // An environment of another space cannot be named.
    let mut other = new_machine("db", &["Prod"], &[]);
    other.space_id = 9_999;
    assert!(s.create_machine(&other).await.is_err());

    // Packages and tasks are per space too.
    let mut p = new_package("Acme", "1.0.0", 'a');
    s.put_package(&p, false, 1).await.unwrap();
    p.space_id = ops.id;
    s.put_package(&p, false, 2).await.unwrap();
    assert_eq!(s.list_packages(ops.id, None).await.unwrap().len(), 1);
    assert_eq!(s.count_packages_with_sha256(&p.sha256).await.unwrap(), 2);
    let mut t = new_task("Script", "x", &json!({}), &[in_ops.id]);
    t.space_id = ops.id;
    t.environments = strings(&["Prod"]);
    let task = s.create_task(&t, 3).await.unwrap();
    assert_eq!(task.space_id, ops.id);
    assert_eq!(task.environments, ["Prod"]);
    assert_eq!(s.list_tasks(Some(ops.id), 10).await.unwrap().len(), 1);
    assert!(s.list_tasks(Some(1), 10).await.unwrap().is_empty());

    // Deleting: refused while machines remain (saying how many), never the default.
    let err = s.delete_space(ops.id).await.unwrap_err().to_string();
    assert!(err.contains("1 machine"), "{err}");
    assert!(matches!(
        s.delete_space(1).await,
        Err(StoreError::Invalid(_))
    ));
    s.delete_machine(ops.id, "web").await.unwrap();
    let gone = s.delete_space(ops.id).await.unwrap();
    assert_eq!(gone.name, "Ops");
    assert!(s.space_by_id(ops.id).await.unwrap().is_none());
    assert!(
        s.task(&task.id).await.unwrap().is_none(),
        "its tasks go with it"
    );
    assert_eq!(s.count_packages_with_sha256(&p.sha256).await.unwrap(), 1);
    assert!(s.machine(1, "web").await.unwrap().is_some());
}

pub async fn disabled_users_and_idle_sessions_do_not_authenticate(s: &dyn Store) {
    let u = s.create_user("carol", "Carol", None).await.unwrap();
    assert!(!u.disabled);
    s.create_api_key(u.id, "ci", "aa01", "API-A1", false)
        .await
        .unwrap();
    let session = s
        .create_api_key(u.id, "session", "aa02", "API-A2", true)
        .await
        .unwrap();
    assert!(session.session);
    let hour = 3_600_000;
    // A session key used within the idle time stays valid, and its use counts.
    let now = session.created_at + hour;
    assert!(s
        .authenticate_api_key("aa02", now, 2 * hour)
        .await
        .unwrap()
        .is_some());
    assert!(s
        .authenticate_api_key("aa02", now + hour, 2 * hour)
        .await
        .unwrap()
        .is_some());
    // Idle for longer: refused; an ordinary key is not affected.
    assert!(s
        .authenticate_api_key("aa02", now + 4 * hour, 2 * hour)
        .await
        .unwrap()
        .is_none());
    assert!(s
        .authenticate_api_key("aa01", now + 4 * hour, 2 * hour)
        .await
        .unwrap()
        .is_some());
    // A disabled user's keys stop working; enabled again, they work.
    let u = s.set_user_disabled(u.id, true).await.unwrap();
    assert!(u.disabled);
    assert!(s
        .authenticate_api_key("aa01", now, hour)
        .await
        .unwrap()
        .is_none());
    s.set_user_disabled(u.id, false).await.unwrap();
    assert!(s
        .authenticate_api_key("aa01", now, hour)
        .await
        .unwrap()
        .is_some());
    assert_eq!(
        s.api_key(session.id).await.unwrap().unwrap().prefix,
        "API-A2"
    );
    assert!(matches!(
        s.set_user_disabled(9_999, true).await,
        Err(StoreError::NotFound { .. })
    ));
    s.set_password_hash(u.id, "$argon2id$x").await.unwrap();
    let (_, hash) = s.user_by_name("carol").await.unwrap().unwrap();
    assert_eq!(hash.as_deref(), Some("$argon2id$x"));
    assert_eq!(s.list_users().await.unwrap().len(), 1);
    assert_eq!(s.user_by_id(u.id).await.unwrap().unwrap().username, "carol");
}

pub async fn teams_hold_members_and_grants_narrowed_to_environments(s: &dyn Store) {
    // The built-in administrators' team exists from the start.
    let teams = s.list_teams(None).await.unwrap();
    assert_eq!(teams.len(), 1);
    assert_eq!(teams[0].name, octo_store::ADMINISTRATORS_TEAM);
    assert!(teams[0].built_in && teams[0].space_id.is_none());
    assert_eq!(teams[0].grants.len(), 1);
    assert_eq!(teams[0].grants[0].role, octo_store::SYSTEM_ADMINISTRATOR);
    assert!(matches!(
        s.delete_team(teams[0].id).await,
        Err(StoreError::Invalid(_))
    ));
    let admin = s.create_user("root", "Root", None).await.unwrap();
    let admin = fixtures::make_admin(s, &admin).await;
    assert!(admin.is_admin);
    assert_eq!(
        s.holders_of(octo_store::SYSTEM_ADMINISTRATOR)
            .await
            .unwrap()
            .len(),
        1
    );
    s.set_user_disabled(admin.id, true).await.unwrap();
    assert!(
        s.holders_of(octo_store::SYSTEM_ADMINISTRATOR)
            .await
            .unwrap()
            .is_empty(),
        "a disabled administrator holds nothing"
    );

    s.create_environment(1, "Test", "").await.unwrap();
    s.create_environment(1, "Production", "").await.unwrap();
    let dev = s.create_user("dev", "Dev", None).await.unwrap();
    let team = s
        .create_team(Some(1), "Testers", "deploy to Test")
        .await
        .unwrap();
    assert_eq!(team.space.as_deref(), Some("Default"));
    assert!(matches!(
        s.create_team(Some(1), "testers", "").await,
        Err(StoreError::Conflict { kind: "team", .. })
    ));
    // The same name outside any space is another team.
    s.create_team(None, "Testers", "").await.unwrap();
    s.add_team_member(team.id, dev.id).await.unwrap();
    s.add_team_member(team.id, dev.id).await.unwrap();
    let grant = s
        .add_grant(
            team.id,
            "Project deployer",
            Some(1),
            &strings(&["test"]),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(grant.environments, ["Test"]);
    assert_eq!(grant.space_id, Some(1));
    assert!(matches!(
        s.add_grant(
            team.id,
            "Project deployer",
            Some(1),
            &strings(&["Nope"]),
            &[]
        )
        .await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        s.add_grant(team.id, "Project deployer", None, &strings(&["Test"]), &[])
            .await,
        Err(StoreError::Invalid(_))
    ));
    let team = s.team(team.id).await.unwrap().unwrap();
    assert_eq!(team.members, ["dev"]);
    assert_eq!(team.grants, vec![grant.clone()]);
    assert_eq!(s.grants_of_user(dev.id).await.unwrap(), vec![grant.clone()]);
    assert!(!s.user_by_id(dev.id).await.unwrap().unwrap().is_admin);
    assert_eq!(s.list_teams(Some(1)).await.unwrap().len(), 3);

    s.remove_grant(team.id, grant.id).await.unwrap();
    assert!(s.grants_of_user(dev.id).await.unwrap().is_empty());
    s.remove_team_member(team.id, dev.id).await.unwrap();
    assert!(matches!(
        s.remove_team_member(team.id, dev.id).await,
        Err(StoreError::NotFound { .. })
    ));
    s.delete_team(team.id).await.unwrap();
    assert!(s.team(team.id).await.unwrap().is_none());

    let role = Role {
        name: "Auditor".into(),
        description: "reads the log".into(),
        built_in: false,
        permissions: vec![Permission::EventView, Permission::TaskView],
    };
    assert_eq!(s.create_role(&role).await.unwrap(), role);
    assert_eq!(s.list_roles().await.unwrap(), vec![role.clone()]);
    assert!(matches!(
        s.create_role(&role).await,
        Err(StoreError::Conflict { kind: "role", .. })
    ));
}

pub async fn scoped_environments_cannot_be_deleted_from_under_a_grant(s: &dyn Store) {
    s.create_environment(1, "Test", "").await.unwrap();
    let team = s.create_team(Some(1), "Testers", "").await.unwrap();
    let grant = s
        .add_grant(
            team.id,
            "Environment viewer",
            Some(1),
            &strings(&["Test"]),
            &[],
        )
        .await
        .unwrap();
    let err = s
        .delete_environment(1, "Test")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("Testers"), "{err}");
    s.remove_grant(team.id, grant.id).await.unwrap();
    s.delete_environment(1, "Test").await.unwrap();
}

pub async fn audit_events_are_listed_newest_first_and_filtered(s: &dyn Store) {
    let ops = s.create_space("Ops", "").await.unwrap();
    let event = |at: i64, user: &str, space: Option<i64>, object: &str| NewAuditEvent {
        at,
        user_id: None,
        username: user.into(),
        source: "127.0.0.1".into(),
        action: "created".into(),
        kind: "environment".into(),
        object: object.into(),
        space_id: space,
        details: String::new(),
    };
    s.append_audit(&event(10, "alice", Some(1), "a"))
        .await
        .unwrap();
    s.append_audit(&event(20, "bob", Some(ops.id), "b"))
        .await
        .unwrap();
    s.append_audit(&event(30, "alice", None, "c"))
        .await
        .unwrap();
    let all = AuditFilter {
        include_system: true,
        limit: 100,
        ..AuditFilter::default()
    };
    let objects =
        |events: Vec<AuditEvent>| -> Vec<String> { events.into_iter().map(|e| e.object).collect() };
    assert_eq!(objects(s.list_audit(&all).await.unwrap()), ["c", "b", "a"]);
    let listed = s.list_audit(&all).await.unwrap();
    assert_eq!(listed[1].space.as_deref(), Some("Ops"));
    assert_eq!(listed[0].space, None);
    let default_only = AuditFilter {
        space_id: Some(1),
        limit: 100,
        ..AuditFilter::default()
    };
    assert_eq!(objects(s.list_audit(&default_only).await.unwrap()), ["a"]);
    let default_and_system = AuditFilter {
        include_system: true,
        ..default_only.clone()
    };
    assert_eq!(
        objects(s.list_audit(&default_and_system).await.unwrap()),
        ["c", "a"]
    );
    let spaces_only = AuditFilter {
        limit: 100,
        ..AuditFilter::default()
    };
    assert_eq!(
        objects(s.list_audit(&spaces_only).await.unwrap()),
        ["b", "a"]
    );
    let alice_since = AuditFilter {
        username: Some("ALICE".into()),
        since: Some(15),
        ..all.clone()
    };
    assert_eq!(objects(s.list_audit(&alice_since).await.unwrap()), ["c"]);
    let one = AuditFilter { limit: 1, ..all };
    assert_eq!(objects(s.list_audit(&one).await.unwrap()), ["c"]);
}

pub async fn settings_and_task_secrets_round_trip(s: &dyn Store) {
    assert_eq!(s.setting("master-key").await.unwrap(), None);
    s.set_setting("master-key", "one").await.unwrap();
    s.set_setting("master-key", "two").await.unwrap();
    assert_eq!(
        s.setting("master-key").await.unwrap().as_deref(),
        Some("two")
    );
    assert_eq!(s.count_task_secrets().await.unwrap(), 0);
    let mut t = new_task("Script", "x", &json!({}), &[]);
    t.secrets = vec![
        ("B".into(), "cipher-b".into()),
        ("A".into(), "cipher-a".into()),
    ];
    let task = s.create_task(&t, 1).await.unwrap();
    assert_eq!(
        s.task_secrets(&task.id).await.unwrap(),
        vec![
            ("A".to_string(), "cipher-a".to_string()),
            ("B".into(), "cipher-b".into())
        ]
    );
    assert_eq!(s.count_task_secrets().await.unwrap(), 2);
}

pub async fn task_masks_are_kept_once_in_order_per_task(s: &dyn Store) {
    let one = s
        .create_task(&new_task("Script", "one", &json!({}), &[]), 1)
        .await
        .unwrap();
    let two = s
        .create_task(&new_task("Script", "two", &json!({}), &[]), 2)
        .await
        .unwrap();
    assert!(s.task_masks(&one.id).await.unwrap().is_empty());
    s.add_task_mask(&one.id, "cipher-z").await.unwrap();
    s.add_task_mask(&one.id, "cipher-a").await.unwrap();
    // Learned again (a resumed step prints it again): kept once.
    s.add_task_mask(&one.id, "cipher-z").await.unwrap();
    s.add_task_mask(&two.id, "cipher-b").await.unwrap();
    assert_eq!(
        s.task_masks(&one.id).await.unwrap(),
        vec!["cipher-z".to_string(), "cipher-a".into()]
    );
    assert_eq!(s.task_masks(&two.id).await.unwrap(), vec!["cipher-b"]);
    // Read with the secrets, in one read: the same, each task its own.
    let mut t = new_task("Script", "three", &json!({}), &[]);
    t.secrets = vec![
        ("Z".into(), "secret-z".into()),
        ("B".into(), "secret-b".into()),
    ];
    let three = s.create_task(&t, 3).await.unwrap();
    s.add_task_mask(&three.id, "cipher-y").await.unwrap();
    s.add_task_mask(&three.id, "cipher-x").await.unwrap();
    let both = s.task_secrets_and_masks(&three.id).await.unwrap();
    assert_eq!(
        both.secrets,
        vec![
            ("B".to_string(), "secret-b".to_string()),
            ("Z".into(), "secret-z".into())
        ]
    );
    assert_eq!(both.masks, vec!["cipher-y".to_string(), "cipher-x".into()]);
    let of_one = s.task_secrets_and_masks(&one.id).await.unwrap();
    assert!(of_one.secrets.is_empty());
    assert_eq!(
        of_one.masks,
        vec!["cipher-z".to_string(), "cipher-a".into()]
    );
    assert_eq!(
        s.task_secrets_and_masks("no-such-task").await.unwrap(),
        octo_store::TaskSecretsAndMasks::default()
    );
    // A task that does not exist cannot get masks.
    assert!(s.add_task_mask("no-such-task", "cipher-c").await.is_err());
}

pub async fn machines_come_in_filtered_pages(s: &dyn Store) {
    s.create_environment(1, "Test", "").await.unwrap();
    s.create_environment(1, "Prod", "").await.unwrap();
    for i in 0..30 {
        let env = if i % 3 == 0 { "Prod" } else { "Test" };
        let mut m = new_machine(&format!("web-{i:02}"), &[env], &["web"]);
        m.thumbprint = format!("{:064X}", i + 1);
        if i % 5 == 0 {
            m.kind = EndpointKind::Polling;
            m.uri = format!("poll://sub{i}/");
        }
        let m = s.create_machine(&m).await.unwrap();
        if i % 2 == 0 {
            let h = HealthUpdate {
                status: HealthStatus::Healthy,
                reason: if i % 4 == 0 {
                    "old tool".into()
                } else {
                    String::new()
                },
                at: 10,
                tentacle_version: None,
                tool_version: None,
                os: None,
                free_bytes: None,
            };
            s.record_health(m.id, &h).await.unwrap();
        }
    }
    let mut worker = new_machine("builder", &[], &[]);
    worker.worker_pool = Some("Builders".into());
    worker.thumbprint = thumb('F');
    s.create_machine(&worker).await.unwrap();
    let q = |f: &dyn Fn(&mut MachineQuery)| {
        let mut q = MachineQuery {
            filter: MachineFilter::space(1),
            limit: 10,
            ..MachineQuery::default()
        };
        f(&mut q);
        q
    };
    let (page, total) = s.machine_page(&q(&|_| {})).await.unwrap();
    assert_eq!((page.len(), total), (10, 31));
    assert_eq!(page[0].name, "builder", "by name");
    let (page, _) = s.machine_page(&q(&|q| q.offset = 30)).await.unwrap();
    assert_eq!(names(&page), ["web-29"]);
    let (page, total) = s
        .machine_page(&q(&|q| q.filter.environments = strings(&["prod"])))
        .await
        .unwrap();
    assert_eq!((page.len(), total), (10, 10));
    assert!(page.iter().all(|m| m.environments == ["Prod"]));
    let (_, total) = s
        .machine_page(&q(&|q| q.name_contains = Some("B-1".into())))
        .await
        .unwrap();
    assert_eq!(total, 10, "web-10 .. web-19, ignoring case");
    let (_, total) = s
        .machine_page(&q(&|q| q.name_contains = Some("%".into())))
        .await
        .unwrap();
    assert_eq!(total, 0, "no wildcard");
    let (_, healthy) = s
        .machine_page(&q(&|q| q.health = vec![HealthFilter::Healthy]))
        .await
        .unwrap();
    let (_, warnings) = s
        .machine_page(&q(&|q| q.health = vec![HealthFilter::HealthyWithWarnings]))
        .await
        .unwrap();
    let (_, unknown) = s
        .machine_page(&q(&|q| q.health = vec![HealthFilter::Unknown]))
        .await
        .unwrap();
    assert_eq!((healthy, warnings, unknown), (7, 8, 16));
    let (_, polling) = s
        .machine_page(&q(&|q| q.kind = Some(EndpointKind::Polling)))
        .await
        .unwrap();
    assert_eq!(polling, 6);
    let (page, workers) = s
        .machine_page(&q(&|q| q.workers = Some(true)))
        .await
        .unwrap();
    assert_eq!(
        (workers, page[0].worker_pool.as_deref()),
        (1, Some("Builders"))
    );
    let (_, targets) = s
        .machine_page(&q(&|q| q.workers = Some(false)))
        .await
        .unwrap();
    assert_eq!(targets, 30);
    let (_, visible) = s
        .machine_page(&q(&|q| q.visible_environments = Some(strings(&["Prod"]))))
        .await
        .unwrap();
    assert_eq!(visible, 10);
    let (_, other) = s
        .machine_page(&MachineQuery {
            filter: MachineFilter::space(2),
            limit: 10,
            ..MachineQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(other, 0);
}

pub async fn machines_environments_and_tasks_change_and_page(s: &dyn Store) {
    for e in ["Dev", "Test", "Prod"] {
        s.create_environment(1, e, "").await.unwrap();
    }
    // Reorder, rename.
    s.move_environment(1, "prod", 0).await.unwrap();
    let order = |envs: Vec<octo_store::Environment>| -> Vec<String> {
        envs.into_iter().map(|e| e.name).collect()
    };
    assert_eq!(
        order(s.list_environments(1).await.unwrap()),
        ["Prod", "Dev", "Test"]
    );
    s.move_environment(1, "Prod", 99).await.unwrap();
    assert_eq!(
        order(s.list_environments(1).await.unwrap()),
        ["Dev", "Test", "Prod"]
    );
    let renamed = s
        .update_environment(1, "test", "QA", "quality")
        .await
        .unwrap();
    assert_eq!(
        (renamed.name.as_str(), renamed.description.as_str()),
        ("QA", "quality")
    );
    assert!(matches!(
        s.update_environment(1, "QA", "dev", "").await,
        Err(StoreError::Conflict { .. })
    ));
    assert!(matches!(
        s.move_environment(1, "nope", 0).await,
        Err(StoreError::NotFound { .. })
    ));
    // A machine's settings.
    let m = s
        .create_machine(&new_machine("web", &["Dev"], &["web"]))
        .await
        .unwrap();
    assert!(!m.disabled);
    let u = MachineUpdate {
        environments: Some(strings(&["QA", "Prod"])),
        roles: Some(strings(&["api"])),
        disabled: Some(true),
        ..MachineUpdate::default()
    };
    let m = s.update_machine(m.id, &u).await.unwrap();
    assert_eq!(m.environments, ["Prod", "QA"]);
    assert_eq!(m.roles, ["api"]);
    assert!(m.disabled);
    assert_eq!(m.policy, DEFAULT_POLICY);
    let bad = MachineUpdate {
        environments: Some(strings(&["Nowhere"])),
        ..MachineUpdate::default()
    };
    assert!(matches!(
        s.update_machine(m.id, &bad).await,
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(
        s.machine(1, "web").await.unwrap().unwrap().environments,
        ["Prod", "QA"]
    );
    assert_eq!(s.list_policies(1).await.unwrap().len(), 1);
    // Tasks, filtered and paged.
    let mut t = new_task("Script", "a", &json!({}), &[m.id]);
    t.environments = strings(&["Prod"]);
    let first = s.create_task(&t, 1).await.unwrap();
    t.kind = "Health".into();
    t.environments = strings(&["QA"]);
    let second = s.create_task(&t, 2).await.unwrap();
    s.set_task_state(&second.id, TaskState::Failed, Some("x"), 3)
        .await
        .unwrap();
    let page = |f: &dyn Fn(&mut TaskQuery)| {
        let mut q = TaskQuery {
            space_id: Some(1),
            limit: 10,
            ..TaskQuery::default()
        };
        f(&mut q);
        q
    };
    let ids = |r: (Vec<Task>, i64)| -> (Vec<String>, i64) {
        (r.0.into_iter().map(|t| t.id).collect(), r.1)
    };
    assert_eq!(
        ids(s.task_page(&page(&|_| {})).await.unwrap()),
        (vec![second.id.clone(), first.id.clone()], 2)
    );
    assert_eq!(
        ids(s
            .task_page(&page(&|q| q.states = vec![TaskState::Failed]))
            .await
            .unwrap())
        .1,
        1
    );
    assert_eq!(
        ids(s
            .task_page(&page(&|q| q.kind = Some("Script".into())))
            .await
            .unwrap())
        .0,
        std::slice::from_ref(&first.id)
    );
    assert_eq!(
        ids(s
            .task_page(&page(&|q| q.machine = Some("WEB".into())))
            .await
            .unwrap())
        .1,
        2
    );
    assert_eq!(
        ids(s
            .task_page(&page(&|q| q.environment = Some("qa".into())))
            .await
            .unwrap())
        .0,
        std::slice::from_ref(&second.id)
    );
    assert_eq!(
        ids(s
            .task_page(&page(&|q| q.visible_environments = Some(strings(&["Prod"]))))
            .await
            .unwrap())
        .0,
        std::slice::from_ref(&first.id)
    );
    assert_eq!(
        ids(s
            .task_page(&page(&|q| {
                q.limit = 1;
                q.offset = 1;
            }))
            .await
            .unwrap()),
        (vec![first.id], 2)
    );
}

/// Nodes: the first heartbeat makes the row, later ones update it; the drain
/// flag is the operator's (a heartbeat, even a restart's, keeps it); names
/// compare without regard to case; an old heartbeat reads as Offline.
pub async fn nodes_heartbeat_and_keep_their_drain_flag(store: &dyn Store) {
    assert!(store.list_nodes().await.unwrap().is_empty());
    let now = octo_store::now_ms();
    let beat = |name: &str, at: i64, steps: i64| NodeBeat {
        name: name.into(),
        started_at: now,
        at,
        task_cap: 5,
        running_tasks: 1,
        running_steps: steps,
    };
    let a = store.node_heartbeat(&beat("node-a", now, 2)).await.unwrap();
    assert_eq!(
        (
            a.name.as_str(),
            a.state,
            a.draining,
            a.task_cap,
            a.running_steps
        ),
        ("node-a", NodeState::Running, false, 5, 2)
    );
    store.node_heartbeat(&beat("node-b", now, 0)).await.unwrap();
    let drained = store.set_node_draining("NODE-A", true).await.unwrap();
    assert_eq!(
        (drained.state, drained.draining),
        (NodeState::Draining, true)
    );
    // The next heartbeat (a restart: a new start time) keeps the flag and tells the node.
    let mut again = beat("node-a", now + 1, 0);
    again.started_at = now + 1;
    again.task_cap = 2;
    let a = store.node_heartbeat(&again).await.unwrap();
    assert!(a.draining);
    assert_eq!((a.started_at, a.task_cap, a.running_steps), (now + 1, 2, 0));
    let names: Vec<_> = store
        .list_nodes()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.name)
        .collect();
    assert_eq!(names, ["node-a", "node-b"]);
    let a = store.set_node_draining("node-a", false).await.unwrap();
    assert_eq!(a.state, NodeState::Running);
    // A node whose last heartbeat is old is offline.
    let old = now - octo_store::NODE_OFFLINE_AFTER_MS - 1_000;
    let c = store.node_heartbeat(&beat("node-c", old, 0)).await.unwrap();
    assert_eq!(c.state, NodeState::Offline);
    assert_eq!(store.node("Node-C").await.unwrap().unwrap().last_seen, old);
    assert!(store.node("node-d").await.unwrap().is_none());
    assert!(matches!(
        store.set_node_draining("node-d", true).await,
        Err(StoreError::NotFound { kind: "node", .. })
    ));
    assert!(matches!(
        store.node_heartbeat(&beat(" ", now, 0)).await,
        Err(StoreError::Invalid(_))
    ));
}

/// A task is taken by one node; another takes it only once that node is
/// offline. A lease is held by one holder until it runs out.
pub async fn tasks_are_claimed_by_one_live_node_and_leases_by_one_holder(store: &dyn Store) {
    store.create_environment(1, "Production", "").await.unwrap();
    let m = store
        .create_machine(&new_machine("web01", &["Production"], &["web"]))
        .await
        .unwrap();
    let now = octo_store::now_ms();
    let task = store
        .create_task(&new_task("script", "echo", &json!({}), &[m.id]), now)
        .await
        .unwrap();
    let beat = |name: &str, at: i64| NodeBeat {
        name: name.into(),
        started_at: at,
        at,
        task_cap: 5,
        running_tasks: 0,
        running_steps: 0,
    };
    store.node_heartbeat(&beat("node-a", now)).await.unwrap();
    store.node_heartbeat(&beat("node-b", now)).await.unwrap();
    assert!(store.claim_task(&task.id, "node-a", now).await.unwrap());
    assert!(store.claim_task(&task.id, "NODE-A", now).await.unwrap());
    assert!(!store.claim_task(&task.id, "node-b", now).await.unwrap());
    // Node a stops heartbeating: once offline, node b may take its task over.
    let later = now + octo_store::NODE_OFFLINE_AFTER_MS + 1_000;
    store.node_heartbeat(&beat("node-b", later)).await.unwrap();
    assert!(store.claim_task(&task.id, "node-b", later).await.unwrap());
    assert!(!store.claim_task(&task.id, "node-a", later).await.unwrap());
    assert!(!store
        .claim_task("ServerTasks-999", "node-a", later)
        .await
        .unwrap());
    // Taken with the row as it is then: its holder gets it, fresh; others none.
    store.request_cancel(&task.id).await.unwrap();
    let taken = store
        .claim_task_row(&task.id, "node-b", later)
        .await
        .unwrap()
        .expect("node b holds the task");
    assert_eq!(
        (taken.id.as_str(), taken.cancel_requested),
        (task.id.as_str(), true)
    );
    assert_eq!(
        store
            .claim_task_row(&task.id, "node-a", later)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .claim_task_row("ServerTasks-999", "node-b", later)
            .await
            .unwrap(),
        None
    );

    assert!(store.lease("health", "node-a", now, 60_000).await.unwrap());
    assert!(store
        .lease("health", "node-a", now + 10, 60_000)
        .await
        .unwrap());
    assert!(!store
        .lease("health", "node-b", now + 20, 60_000)
        .await
        .unwrap());
    assert!(store.lease("other", "node-b", now, 60_000).await.unwrap());
    assert!(store
        .lease("health", "node-b", now + 70_000, 60_000)
        .await
        .unwrap());
    assert!(!store
        .lease("health", "node-a", now + 70_001, 60_000)
        .await
        .unwrap());
}

/// Where polling tentacles are connected counts only for live nodes, latest
/// first; a step handed to a node is listed for it until it ends. On a store
/// that nodes share, a published event reaches a listener.
pub async fn polling_presence_and_step_assignment_follow_live_nodes(store: &dyn Store) {
    let now = octo_store::now_ms();
    let beat = |name: &str, at: i64| NodeBeat {
        name: name.into(),
        started_at: at,
        at,
        task_cap: 5,
        running_tasks: 0,
        running_steps: 0,
    };
    store.node_heartbeat(&beat("node-a", now)).await.unwrap();
    store.node_heartbeat(&beat("node-b", now)).await.unwrap();
    let old = now - octo_store::NODE_OFFLINE_AFTER_MS - 1_000;
    store.node_heartbeat(&beat("node-c", old)).await.unwrap();
    for (node, at) in [("node-a", now - 10), ("node-b", now), ("node-c", now + 5)] {
        store
            .set_polling_presence(node, "SUB-1", true, at)
            .await
            .unwrap();
    }
    // node-c is offline: not a place to send work.
    assert_eq!(
        store.polling_nodes("SUB-1", now).await.unwrap(),
        ["node-b", "node-a"]
    );
    store
        .set_polling_presence("node-b", "SUB-1", false, now)
        .await
        .unwrap();
    assert_eq!(store.polling_nodes("SUB-1", now).await.unwrap(), ["node-a"]);
    store
        .set_polling_presence("node-a", "SUB-2", true, now)
        .await
        .unwrap();
    store.clear_polling_presence("NODE-A").await.unwrap();
    assert!(store.polling_nodes("SUB-1", now).await.unwrap().is_empty());
    assert!(store.polling_nodes("SUB-2", now).await.unwrap().is_empty());

    store.create_environment(1, "Production", "").await.unwrap();
    let m1 = store
        .create_machine(&new_machine("web01", &["Production"], &["web"]))
        .await
        .unwrap();
    let m2 = store
        .create_machine(&new_machine("web02", &["Production"], &["web"]))
        .await
        .unwrap();
    let task = store
        .create_task(
            &new_task("script", "echo", &json!({}), &[m1.id, m2.id]),
            now,
        )
        .await
        .unwrap();
    assert_eq!(store.step_node(&task.id, m1.id).await.unwrap(), None);
    // A step's placement reads its machine's row with the node it went to.
    let placement = |task_id: String, machine_id: i64| async move {
        let (machine, node) = store
            .machine_row_and_step_node(&task_id, machine_id)
            .await
            .unwrap();
        (machine.map(|m| (m.id, m.name)), node)
    };
    assert_eq!(
        placement(task.id.clone(), m1.id).await,
        (Some((m1.id, "web01".to_string())), None)
    );
    store
        .assign_step(&task.id, m1.id, Some("node-b"))
        .await
        .unwrap();
    assert_eq!(
        placement(task.id.clone(), m1.id).await,
        (
            Some((m1.id, "web01".to_string())),
            Some("node-b".to_string())
        )
    );
    assert_eq!(
        placement("ServerTasks-999".into(), m1.id).await,
        (Some((m1.id, "web01".to_string())), None),
        "no such task: the machine, handed nowhere"
    );
    assert_eq!(
        placement(task.id.clone(), 999_999).await,
        (None, None),
        "no such machine"
    );
    store
        .assign_step(&task.id, m2.id, Some("node-b"))
        .await
        .unwrap();
    assert_eq!(
        store.step_node(&task.id, m1.id).await.unwrap().as_deref(),
        Some("node-b")
    );
    let refs =
        |v: Vec<octo_store::StepRef>| -> Vec<i64> { v.into_iter().map(|r| r.machine_id).collect() };
    assert_eq!(
        refs(store.steps_assigned_to("node-b").await.unwrap()),
        [m1.id, m2.id]
    );
    // A finished step is no longer work for its node.
    let mut done = store
        .task_steps(&task.id)
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.machine_id == m2.id)
        .unwrap();
    done.state = TaskState::Success;
    done.completed_at = Some(now);
    store.update_step(&done).await.unwrap();
    assert_eq!(
        refs(store.steps_assigned_to("node-b").await.unwrap()),
        [m1.id]
    );
    store.assign_step(&task.id, m1.id, None).await.unwrap();
    assert!(store.steps_assigned_to("node-b").await.unwrap().is_empty());
    assert_eq!(placement(task.id.clone(), m1.id).await.1, None);
    assert_eq!(
        store
            .task_step(&task.id, m2.id)
            .await
            .unwrap()
            .unwrap()
            .state,
        TaskState::Success
    );
    assert!(store.task_step(&task.id, 999_999).await.unwrap().is_none());

    // Adoptable: unclaimed and old enough, or claimed by an offline node.
    let ids = |v: Vec<octo_store::Task>| -> Vec<String> { v.into_iter().map(|t| t.id).collect() };
    assert!(ids(store.adoptable_tasks(now, now - 1).await.unwrap()).is_empty());
    assert_eq!(
        ids(store.adoptable_tasks(now, now + 1).await.unwrap()),
        std::slice::from_ref(&task.id)
    );
    assert!(store.claim_task(&task.id, "node-b", now).await.unwrap());
    assert!(store
        .adoptable_tasks(now, now + 1)
        .await
        .unwrap()
        .is_empty());
    let later = now + octo_store::NODE_OFFLINE_AFTER_MS + 1_000;
    assert_eq!(
        ids(store.adoptable_tasks(later, now + 1).await.unwrap()),
        std::slice::from_ref(&task.id)
    );

    // Events: on a shared store a listener hears what is published.
    let listener = store.listen().await.unwrap();
    assert_eq!(listener.is_some(), store.shared());
    let event = octo_store::ClusterEvent::StepAssigned {
        task_id: task.id.clone(),
        machine_id: m1.id,
        node: "node-a".into(),
    };
    store.publish(&event).await.unwrap();
    if let Some(mut rx) = listener {
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
            .await
            .expect("the event within 10 s");
        // Published through this store: heard as its own.
        assert_eq!(got, Some(octo_store::Heard { event, own: true }));
    }
    // Several at once: each, in order; none is nothing.
    let many: Vec<octo_store::ClusterEvent> = ["a", "b", "c"]
        .iter()
        .map(|t| octo_store::ClusterEvent::LogAppended {
            task_id: format!("ServerTasks-{t}"),
        })
        .collect();
    let listener = store.listen().await.unwrap();
    store.publish_all(&[]).await.unwrap();
    store.publish_all(&many).await.unwrap();
    store
        .publish(&octo_store::ClusterEvent::TrustChanged)
        .await
        .unwrap();
    if let Some(mut rx) = listener {
        let mut got = Vec::new();
        for _ in 0..4 {
            let heard = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
                .await
                .expect("each event within 10 s")
                .expect("the listener runs");
            got.push(heard.event);
        }
        let mut expected = many;
        expected.push(octo_store::ClusterEvent::TrustChanged);
        assert_eq!(got, expected);
    }
}

pub async fn policies_are_added_and_changed_with_their_tentacle_update(s: &dyn Store) {
    // Left out: the default policy's settings.
    let p = s
        .create_policy(1, "Fast", &PolicySettings::default())
        .await
        .unwrap();
    assert_eq!(
        (
            p.name.as_str(),
            p.health_check_interval_s,
            p.health_check_timeout_s,
            p.polling_wait_s,
            p.tentacle_update
        ),
        ("Fast", 3600, 60, 120, TentacleUpdate::Manual)
    );
    assert!(matches!(
        s.create_policy(1, "FAST", &PolicySettings::default()).await,
        Err(StoreError::Conflict { .. })
    ));
    // Only what is given changes.
    let changed = s
        .update_policy(
            1,
            "fast",
            &PolicySettings {
                tentacle_update: Some(TentacleUpdate::Always),
                polling_wait_s: Some(30),
                ..PolicySettings::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(changed.id, p.id);
    assert_eq!(
        (
            changed.health_check_interval_s,
            changed.polling_wait_s,
            changed.tentacle_update
        ),
        (3600, 30, TentacleUpdate::Always)
    );
    assert_eq!(s.policy(1, "Fast").await.unwrap().unwrap(), changed);
    let given = s
        .create_policy(
            1,
            "Slow",
            &PolicySettings {
                health_check_interval_s: Some(86_400),
                health_check_timeout_s: Some(300),
                polling_wait_s: Some(600),
                tentacle_update: Some(TentacleUpdate::Always),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (
            given.health_check_interval_s,
            given.health_check_timeout_s,
            given.polling_wait_s,
            given.tentacle_update
        ),
        (86_400, 300, 600, TentacleUpdate::Always)
    );
    let names: Vec<String> = s
        .list_policies(1)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, [DEFAULT_POLICY, "Fast", "Slow"]);
    assert!(matches!(
        s.update_policy(1, "Nope", &PolicySettings::default()).await,
        Err(StoreError::NotFound { .. })
    ));
    // Other spaces do not see it.
    assert!(s.policy(2, "Fast").await.unwrap().is_none());
}

// Fewer round trips per step (issue 15).

pub async fn machine_rows_reach_a_machine_without_its_lists(s: &dyn Store) {
    s.create_environment(1, "Production", "").await.unwrap();
    s.create_tenant(1, "Acme", &[]).await.unwrap();
    let mut m = new_machine("web01", &["Production"], &["web"]);
    m.tenants = strings(&["Acme"]);
    let m = s.create_machine(&m).await.unwrap();
    assert_eq!(m.roles, ["web"]);
    let row = s
        .machine_row(m.id)
        .await
        .unwrap()
        .expect("the machine's row");
    assert_eq!(
        (
            row.id,
            &row.name,
            row.kind,
            &row.uri,
            &row.thumbprint,
            &row.policy
        ),
        (m.id, &m.name, m.kind, &m.uri, &m.thumbprint, &m.policy)
    );
    assert!(
        row.environments.is_empty()
            && row.roles.is_empty()
            && row.tenants.is_empty()
            && row.tenant_tags.is_empty(),
        "a machine's row carries no lists: {row:?}"
    );
    assert_eq!(
        s.machine_by_id(m.id).await.unwrap(),
        Some(m.clone()),
        "the whole machine still has them"
    );
    assert!(s.machine_row(9_999).await.unwrap().is_none());
}

/// A machine and its lists come in one statement: by name, by id, in a
/// list and in a page alike, each list ordered ignoring case; a machine
/// without lists has empty ones.
pub async fn every_machine_read_gives_the_lists_in_the_same_order(s: &dyn Store) {
    for env in ["beta", "Alpha", "gamma"] {
        s.create_environment(1, env, "").await.unwrap();
    }
    s.create_tenant(1, "beta", &[]).await.unwrap();
    s.create_tenant(1, "Acme", &[]).await.unwrap();
    let mut new = new_machine("web01", &["gamma", "beta", "Alpha"], &["web", "Db", "app"]);
    new.tenants = strings(&["beta", "Acme"]);
    new.tenant_tags = strings(&["tier/Gold", "region/eu"]);
    let made = s.create_machine(&new).await.unwrap();
    s.create_machine(&new_machine("bare", &[], &[]))
        .await
        .unwrap();
    let by_name = s.machine(1, "WEB01").await.unwrap().expect("by name");
    assert_eq!(by_name.environments, ["Alpha", "beta", "gamma"]);
    assert_eq!(by_name.roles, ["app", "Db", "web"]);
    assert_eq!(by_name.tenants, ["Acme", "beta"]);
    assert_eq!(by_name.tenant_tags, ["region/eu", "tier/Gold"]);
    assert_eq!(made, by_name, "as created");
    assert_eq!(
        s.machine_by_id(made.id).await.unwrap().as_ref(),
        Some(&by_name)
    );
    let listed = s
        .list_machines(&MachineFilter {
            space_id: Some(1),
            ..MachineFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(names(&listed), ["bare", "web01"]);
    assert_eq!(listed[1], by_name);
    let bare = &listed[0];
    assert!(
        bare.environments.is_empty()
            && bare.roles.is_empty()
            && bare.tenants.is_empty()
            && bare.tenant_tags.is_empty(),
        "{bare:?}"
    );
    let (page, total) = s
        .machine_page(&MachineQuery {
            filter: MachineFilter {
                space_id: Some(1),
                roles: strings(&["DB"]),
                ..MachineFilter::default()
            },
            name_contains: None,
            health: Vec::new(),
            kind: None,
            workers: None,
            visible_environments: None,
            offset: 0,
            limit: 50,
        })
        .await
        .unwrap();
    assert_eq!(
        (page.as_slice(), total),
        (std::slice::from_ref(&by_name), 1)
    );
}

pub async fn large_log_batches_store_every_line_once_in_order(s: &dyn Store) {
    let m = s
        .create_machine(&new_machine("web01", &[], &[]))
        .await
        .unwrap();
    let task = s
        .create_task(&new_task("Script", "x", &json!({}), &[m.id]), 1)
        .await
        .unwrap();
    // More lines than one statement stores, then the same again with more.
    let lines: Vec<_> = (0..1_203)
        .map(|i| tentacle_line(m.id, i, &format!("line {i}")))
        .collect();
    s.append_log(&task.id, &lines).await.unwrap();
    let more: Vec<_> = (1_000..1_600)
        .map(|i| tentacle_line(m.id, i, &format!("line {i}")))
        .collect();
    s.append_log(&task.id, &more).await.unwrap();
    let stored = s.task_log(&task.id, 0, 10_000).await.unwrap();
    let texts: Vec<String> = stored.iter().map(|l| l.text.clone()).collect();
    let expected: Vec<String> = (0..1_600).map(|i| format!("line {i}")).collect();
    assert_eq!(texts, expected, "every line once, in order");
    assert!(stored.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(
        s.task_steps(&task.id).await.unwrap()[0].next_sequence,
        1_600
    );
    assert_eq!(
        s.step_log_size(&task.id, m.id).await.unwrap().0,
        1_600,
        "the step's lines are counted"
    );

    // A missing task: nothing stored, whatever the lines.
    for lines in [vec![server_line("x")], vec![tentacle_line(m.id, 0, "y")]] {
        assert!(matches!(
            s.append_log("ServerTasks-99", &lines).await,
            Err(StoreError::NotFound { kind: "task", .. })
        ));
    }
    // A task that ended cannot change state again; one that did not exist is not found.
    s.set_task_state(&task.id, TaskState::Success, None, 5)
        .await
        .unwrap();
    s.set_task_state(&task.id, TaskState::Success, None, 6)
        .await
        .unwrap();
    assert!(matches!(
        s.set_task_state(&task.id, TaskState::Failed, Some("late"), 7)
            .await,
        Err(StoreError::Invalid(_))
    ));
    let done = s.task(&task.id).await.unwrap().unwrap();
    assert_eq!(
        (done.state, done.completed_at),
        (TaskState::Success, Some(5))
    );
    assert!(matches!(
        s.set_task_state("ServerTasks-99", TaskState::Executing, None, 8)
            .await,
        Err(StoreError::NotFound { kind: "task", .. })
    ));
}

/// A task with its steps and lines after a given one, read together, is what
/// the three reads give one by one: the steps in their order, the lines after
/// `after_id` up to `limit`; a missing task is None.
pub async fn a_task_with_its_log_reads_as_its_parts_do(s: &dyn Store) {
    let mut ids = Vec::new();
    for name in ["web02", "Db01", "web01"] {
        ids.push(
            s.create_machine(&new_machine(name, &[], &[]))
                .await
                .unwrap()
                .id,
        );
    }
    let task = s
        .create_task(&new_task("Script", "x", &json!({}), &ids), 1)
        .await
        .unwrap();
    let other = s
        .create_task(&new_task("Script", "y", &json!({}), &ids[..1]), 1)
        .await
        .unwrap();
    s.append_log(&other.id, &[server_line("not this task's")])
        .await
        .unwrap();
    let lines: Vec<_> = (0..5)
        .map(|i| tentacle_line(ids[0], i, &format!("line {i}")))
        .collect();
    s.append_log(&task.id, &lines).await.unwrap();

    let whole = s
        .task_with_log(&task.id, 0, 100)
        .await
        .unwrap()
        .expect("the task");
    assert_eq!(Some(&whole.task), s.task(&task.id).await.unwrap().as_ref());
    assert_eq!(whole.steps, s.task_steps(&task.id).await.unwrap());
    let names: Vec<&str> = whole
        .steps
        .iter()
        .map(|st| st.machine_name.as_str())
        .collect();
    assert_eq!(names, ["Db01", "web01", "web02"], "ordered ignoring case");
    assert_eq!(whole.lines, s.task_log(&task.id, 0, 100).await.unwrap());
    assert_eq!(whole.lines.len(), 5, "only this task's lines");

    // After a line, at most `limit`.
    let part = s
        .task_with_log(&task.id, whole.lines[1].id, 2)
        .await
        .unwrap()
        .expect("the task");
    assert_eq!(part.lines, whole.lines[2..4].to_vec());
    assert_eq!(part.steps, whole.steps, "the steps whatever the lines");
    // After the last line: the task and its steps, no line.
    let none = s
        .task_with_log(&task.id, whole.lines[4].id, 100)
        .await
        .unwrap()
        .expect("the task");
    assert!(none.lines.is_empty());
    assert_eq!(none.task, whole.task);

    assert_eq!(
        s.task_with_log("ServerTasks-99", 0, 100).await.unwrap(),
        None
    );
}

/// A step saved with its lines: the lines first, in order, then the step; a
/// step that does not exist is NotFound, its lines stored all the same.
pub async fn a_step_is_saved_after_its_line(s: &dyn Store) {
    let m = s
        .create_machine(&new_machine("web01", &[], &[]))
        .await
        .unwrap();
    let task = s
        .create_task(&new_task("Script", "x", &json!({}), &[m.id]), 1)
        .await
        .unwrap();
    s.append_log(&task.id, &[tentacle_line(m.id, 0, "out")])
        .await
        .unwrap();
    let mut step = s.task_steps(&task.id).await.unwrap().remove(0);
    step.state = TaskState::Success;
    step.exit_code = Some(0);
    step.completed_at = Some(5);
    let lines = [
        server_line("web01: starting"),
        server_line("web01: finished"),
    ];
    s.update_step_logged(&step, &lines).await.unwrap();
    let saved = s.task_steps(&task.id).await.unwrap().remove(0);
    assert_eq!(
        (saved.state, saved.exit_code),
        (TaskState::Success, Some(0))
    );
    assert_eq!(saved.next_sequence, 1, "the resume point never moves back");
    let log = s.task_log(&task.id, 0, 10).await.unwrap();
    let texts: Vec<&str> = log.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(texts, ["out", "web01: starting", "web01: finished"]);

    let mut missing = saved.clone();
    missing.machine_id = m.id + 100;
    assert!(matches!(
        s.update_step_logged(&missing, &[server_line("nowhere")])
            .await,
        Err(StoreError::NotFound {
            kind: "task step",
            ..
        })
    ));
    assert_eq!(s.task_log(&task.id, 0, 10).await.unwrap().len(), 4);
}

/// A task's start stored with its first step's: the task's line and state,
/// then the step. Each part says how it went, and one part's failure leaves
/// the other done.
pub async fn a_task_starts_with_its_first_step(s: &dyn Store) {
    let m = s
        .create_machine(&new_machine("web01", &[], &[]))
        .await
        .unwrap();
    let new = || new_task("Script", "x", &json!({}), &[m.id]);
    let started = |mut step: octo_store::TaskStep| {
        step.state = TaskState::Executing;
        step.started_at = Some(5);
        step
    };
    let texts = |lines: Vec<octo_store::TaskLogLine>| -> Vec<String> {
        lines.into_iter().map(|l| l.text).collect()
    };

    // Both parts done.
    let task = s.create_task(&new(), 1).await.unwrap();
    let step = started(s.task_steps(&task.id).await.unwrap().remove(0));
    let (task_part, step_part) = s
        .start_task_with_step(TaskState::Executing, 5, &server_line("Task started"), &step)
        .await;
    task_part.unwrap();
    step_part.unwrap();
    let t = s.task(&task.id).await.unwrap().unwrap();
    assert_eq!((t.state, t.started_at), (TaskState::Executing, Some(5)));
    let saved = s.task_steps(&task.id).await.unwrap().remove(0);
    assert_eq!(
        (saved.state, saved.started_at),
        (TaskState::Executing, Some(5))
    );
    assert_eq!(
        texts(s.task_log(&task.id, 0, 10).await.unwrap()),
        ["Task started"]
    );

    // A task canceled meanwhile: its part says why; the step is stored.
    let task = s.create_task(&new(), 1).await.unwrap();
    s.set_task_state(&task.id, TaskState::Canceled, None, 2)
        .await
        .unwrap();
    let step = started(s.task_steps(&task.id).await.unwrap().remove(0));
    let (task_part, step_part) = s
        .start_task_with_step(TaskState::Executing, 5, &server_line("Task started"), &step)
        .await;
    assert!(
        matches!(task_part, Err(StoreError::Invalid(_))),
        "{task_part:?}"
    );
    step_part.unwrap();
    assert_eq!(
        s.task(&task.id).await.unwrap().unwrap().state,
        TaskState::Canceled
    );
    assert_eq!(
        s.task_steps(&task.id).await.unwrap()[0].state,
        TaskState::Executing
    );

    // A step that is not there: NotFound; the task starts.
    let task = s.create_task(&new(), 1).await.unwrap();
    let mut missing = started(s.task_steps(&task.id).await.unwrap().remove(0));
    missing.machine_id = m.id + 100;
    let (task_part, step_part) = s
        .start_task_with_step(
            TaskState::Executing,
            5,
            &server_line("Task started"),
            &missing,
        )
        .await;
    task_part.unwrap();
    assert!(
        matches!(
            &step_part,
            Err(StoreError::NotFound {
                kind: "task step",
                ..
            })
        ),
        "{step_part:?}"
    );
    assert_eq!(
        s.task(&task.id).await.unwrap().unwrap().state,
        TaskState::Executing
    );

    // No such task: both parts say so, and nothing is stored.
    let mut ghost = step.clone();
    ghost.task_id = "ServerTasks-99".into();
    let (task_part, step_part) = s
        .start_task_with_step(TaskState::Executing, 5, &server_line("x"), &ghost)
        .await;
    assert!(
        matches!(&task_part, Err(StoreError::NotFound { kind: "task", .. })),
        "{task_part:?}"
    );
    assert!(
        matches!(&step_part, Err(StoreError::NotFound { .. })),
        "{step_part:?}"
    );
    assert!(s
        .task_log("ServerTasks-99", 0, 10)
        .await
        .unwrap()
        .is_empty());
}

/// A task's last step's end stored with the task's: the step's lines, the
/// step, then the task's line and state, in that order. Each part says how it
/// went, and one part's failure leaves the other done.
pub async fn a_last_step_ends_with_its_task(s: &dyn Store) {
    let m = s
        .create_machine(&new_machine("web01", &[], &[]))
        .await
        .unwrap();
    let texts = |lines: Vec<octo_store::TaskLogLine>| -> Vec<String> {
        lines.into_iter().map(|l| l.text).collect()
    };
    let new = || new_task("Script", "x", &json!({}), &[m.id]);

    // Both parts done, in order.
    let task = s.create_task(&new(), 1).await.unwrap();
    s.set_task_state(&task.id, TaskState::Executing, None, 2)
        .await
        .unwrap();
    s.append_log(&task.id, &[tentacle_line(m.id, 0, "out")])
        .await
        .unwrap();
    let mut step = s.task_steps(&task.id).await.unwrap().remove(0);
    step.state = TaskState::Success;
    step.exit_code = Some(0);
    step.completed_at = Some(8);
    let lines = [
        server_line("web01: finished"),
        server_line("web01: 2 lines"),
    ];
    let (stepped, ended) = s
        .finish_step_and_task(
            &step,
            &lines,
            TaskState::Success,
            None,
            9,
            &server_line("Task finished"),
        )
        .await;
    stepped.unwrap();
    ended.unwrap();
    let saved = s.task_steps(&task.id).await.unwrap().remove(0);
    assert_eq!(
        (saved.state, saved.exit_code, saved.completed_at),
        (TaskState::Success, Some(0), Some(8))
    );
    assert_eq!(saved.next_sequence, 1, "the resume point never moves back");
    let t = s.task(&task.id).await.unwrap().unwrap();
    assert_eq!((t.state, t.completed_at), (TaskState::Success, Some(9)));
    assert_eq!(
        texts(s.task_log(&task.id, 0, 10).await.unwrap()),
        ["out", "web01: finished", "web01: 2 lines", "Task finished"]
    );

    // No lines of the step's own: the step, then the task.
    let task = s.create_task(&new(), 1).await.unwrap();
    let mut step = s.task_steps(&task.id).await.unwrap().remove(0);
    step.state = TaskState::Failed;
    step.error = Some("boom".into());
    let (stepped, ended) = s
        .finish_step_and_task(
            &step,
            &[],
            TaskState::Failed,
            Some("1 of 1 machines failed"),
            4,
            &server_line("Task finished: Failed"),
        )
        .await;
    stepped.unwrap();
    ended.unwrap();
    let saved = s.task_steps(&task.id).await.unwrap().remove(0);
    assert_eq!(
        (saved.state, saved.error.as_deref()),
        (TaskState::Failed, Some("boom"))
    );
    let t = s.task(&task.id).await.unwrap().unwrap();
    assert_eq!(
        (t.state, t.error.as_deref()),
        (TaskState::Failed, Some("1 of 1 machines failed"))
    );
    assert_eq!(
        texts(s.task_log(&task.id, 0, 10).await.unwrap()),
        ["Task finished: Failed"]
    );

    // A step that is not there: NotFound, and the task ends all the same.
    let task = s.create_task(&new(), 1).await.unwrap();
    let mut missing = s.task_steps(&task.id).await.unwrap().remove(0);
    missing.machine_id = m.id + 100;
    missing.state = TaskState::Success;
    let (stepped, ended) = s
        .finish_step_and_task(
            &missing,
            &[server_line("nowhere")],
            TaskState::Success,
            None,
            6,
            &server_line("Task finished"),
        )
        .await;
    assert!(
        matches!(
            &stepped,
            Err(StoreError::NotFound {
                kind: "task step",
                ..
            })
        ),
        "{stepped:?}"
    );
    ended.unwrap();
    assert_eq!(
        s.task(&task.id).await.unwrap().unwrap().state,
        TaskState::Success
    );
    assert_eq!(
        texts(s.task_log(&task.id, 0, 10).await.unwrap()),
        ["nowhere", "Task finished"]
    );

    // A task that ended already: its part says why, the step's is done.
    let task = s.create_task(&new(), 1).await.unwrap();
    s.set_task_state(&task.id, TaskState::Canceled, None, 2)
        .await
        .unwrap();
    let mut step = s.task_steps(&task.id).await.unwrap().remove(0);
    step.state = TaskState::Canceled;
    let (stepped, ended) = s
        .finish_step_and_task(
            &step,
            &[server_line("web01: canceled")],
            TaskState::Success,
            None,
            7,
            &server_line("late"),
        )
        .await;
    stepped.unwrap();
    assert!(matches!(ended, Err(StoreError::Invalid(_))), "{ended:?}");
    assert_eq!(
        s.task(&task.id).await.unwrap().unwrap().state,
        TaskState::Canceled
    );
    assert_eq!(
        s.task_steps(&task.id).await.unwrap()[0].state,
        TaskState::Canceled
    );

    // No such task: both parts say so, and nothing is stored.
    let mut ghost = step.clone();
    ghost.task_id = "ServerTasks-99".into();
    let (stepped, ended) = s
        .finish_step_and_task(
            &ghost,
            &[server_line("x")],
            TaskState::Success,
            None,
            7,
            &server_line("y"),
        )
        .await;
    assert!(
        matches!(&stepped, Err(StoreError::NotFound { kind: "task", .. })),
        "{stepped:?}"
    );
    assert!(
        matches!(&ended, Err(StoreError::NotFound { kind: "task", .. })),
        "{ended:?}"
    );
    assert!(s
        .task_log("ServerTasks-99", 0, 10)
        .await
        .unwrap()
        .is_empty());
}

/// The thumbprints polling tentacles may connect with: each polling
/// machine's, and the next one it offered; never a listening machine's.
pub async fn polling_thumbprints_are_each_polling_machines_current_and_next(s: &dyn Store) {
    assert!(s.polling_thumbprints().await.unwrap().is_empty());
    let polling = |name: &str, tp: char| NewMachine {
        kind: EndpointKind::Polling,
        uri: format!("poll://{name}/"),
        thumbprint: thumb(tp),
        ..new_machine(name, &[], &[])
    };
    s.create_machine(&polling("a", 'D')).await.unwrap();
    let mut listening = new_machine("b", &[], &[]);
    listening.thumbprint = thumb('F');
    s.create_machine(&listening).await.unwrap();
    s.create_machine(&polling("c", 'C')).await.unwrap();
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    assert_eq!(
        sorted(s.polling_thumbprints().await.unwrap()),
        [thumb('C'), thumb('D')]
    );
    s.offer_machine_thumbprint(&thumb('D'), &thumb('E'))
        .await
        .unwrap();
    assert_eq!(
        sorted(s.polling_thumbprints().await.unwrap()),
        [thumb('C'), thumb('D'), thumb('E')]
    );
    s.promote_machine_thumbprint(&thumb('E')).await.unwrap();
    s.delete_machine(1, "c").await.unwrap();
    assert_eq!(s.polling_thumbprints().await.unwrap(), [thumb('E')]);
}

/// A tentacle's certificate rotation: the next certificate is accepted beside
/// the current one, then replaces it when the tentacle presents it, once.
/// Every connection asks; a thumbprint that is no machine's next one changes
/// nothing.
pub async fn a_next_certificate_replaces_the_current_one_once(s: &dyn Store) {
    let mut a = new_machine("a", &[], &[]);
    a.thumbprint = thumb('D');
    let a = s.create_machine(&a).await.unwrap();
    let mut b = new_machine("b", &[], &[]);
    b.thumbprint = thumb('F');
    let b = s.create_machine(&b).await.unwrap();

    // Nothing offered yet: neither its future thumbprint nor a current one
    // promotes anything.
    for tp in [thumb('E'), thumb('D'), thumb('F')] {
        assert!(s.promote_machine_thumbprint(&tp).await.unwrap().is_empty());
    }
    assert_eq!(s.machine_by_id(a.id).await.unwrap().unwrap(), a);

    let offered = s
        .offer_machine_thumbprint(&thumb('D'), &thumb('E'))
        .await
        .unwrap();
    assert_eq!(names(&offered), ["a"]);
    assert_eq!(offered[0].next_thumbprint, Some(thumb('E')));

    // Another machine's connection promotes nothing; a's next one (in any
    // case) promotes a, returned as it was.
    assert!(s
        .promote_machine_thumbprint(&thumb('F'))
        .await
        .unwrap()
        .is_empty());
    let promoted = s.promote_machine_thumbprint(&thumb('e')).await.unwrap();
    assert_eq!(names(&promoted), ["a"]);
    assert_eq!(
        (
            promoted[0].thumbprint.as_str(),
            promoted[0].next_thumbprint.as_deref()
        ),
        (thumb('D').as_str(), Some(thumb('E').as_str()))
    );
    let now = s.machine_by_id(a.id).await.unwrap().unwrap();
    assert_eq!((now.thumbprint, now.next_thumbprint), (thumb('E'), None));
    assert_eq!(
        names(&s.machines_by_thumbprint(None, &thumb('E')).await.unwrap()),
        ["a"]
    );
    assert!(s
        .machines_by_thumbprint(None, &thumb('D'))
        .await
        .unwrap()
        .is_empty());

    // Done once: its next connections promote nothing more.
    assert!(s
        .promote_machine_thumbprint(&thumb('E'))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(s.machine_by_id(b.id).await.unwrap().unwrap(), b);
}
