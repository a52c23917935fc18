//! The audit log: one entry per change, saying who, from where and in which
//! space; filters by user and time; and never a secret (sensitive variable
//! values, passwords, API keys).
#![allow(clippy::unwrap_used)]

mod common;

use common::Server;
use serde_json::{json, Value};

const SECRET: &str = "s3cr3t-VALUE-42";
const PASSWORD: &str = "carol-password-1";
const NEW_PASSWORD: &str = "carol-password-2";

fn events(v: &Value) -> Vec<Value> {
    v.as_array().unwrap().clone()
}

#[tokio::test]
async fn every_change_is_audited_once_without_secrets() {
    let server = Server::start().await;
    let admin = &server.admin;

    // Changes of every kind, by the admin, mostly in space Ops.
    admin
        .post("/api/spaces", json!({ "name": "Ops" }))
        .await
        .expect(201);
    server.environment(Some("Ops"), "Test").await;
    server.environment(Some("Ops"), "Gone").await;
    admin
        .delete("/api/spaces/Ops/environments/Gone")
        .await
        .expect(204);
    server.polling_machine(Some("Ops"), "p1", &["Test"]).await;
    server.machine(Some("Ops"), "l1", &["Test"], &[]).await;
    admin
        .delete("/api/spaces/Ops/machines/l1")
        .await
        .expect(204);
    // A task with a secret: the polling machine never connects, so the task
    // is still running when it is canceled.
    let task = admin
        .script(
            Some("Ops"),
            json!({
                "script": "echo $DB_PASSWORD",
                "machines": ["p1"],
                "variables": { "PLAIN": "visible" },
                "sensitive_variables": { "DB_PASSWORD": SECRET },
            }),
        )
        .await
        .expect(201);
    let task_id = task["task"]["id"].as_str().unwrap().to_string();
    assert!(!task.to_string().contains(SECRET), "{task}");
    let canceled = admin
        .post(
            &format!("/api/spaces/Ops/tasks/{task_id}/cancel"),
            json!({}),
        )
        .await
        .expect(202);
    assert!(canceled["task"]["cancel_requested"].as_bool().unwrap());
    server.package(Some("Ops"), "Acme.Web", "1.0.0").await;
    admin
        .delete("/api/spaces/Ops/packages/Acme.Web/1.0.0")
        .await
        .expect(200);
    server.create_user("carol", Some(PASSWORD)).await;
    admin
        .post("/api/users/carol/disable", json!({}))
        .await
        .expect(200);
    admin
        .post("/api/users/carol/enable", json!({}))
        .await
        .expect(200);
    admin
        .put(
            "/api/users/carol/password",
            json!({ "password": NEW_PASSWORD }),
        )
        .await
        .expect(204);
    let (new_key, new_key_id) = admin.new_key("ci").await;
    admin
        .delete(&format!("/api/api-keys/{new_key_id}"))
        .await
        .expect(204);
    admin
        .post("/api/spaces/Ops/teams", json!({ "name": "Ops team" }))
        .await
        .expect(201);
    admin
        .post(
            "/api/spaces/Ops/teams/Ops%20team/members",
            json!({ "username": "carol" }),
        )
        .await
        .expect(200);
    let grant = admin
        .post(
            "/api/spaces/Ops/teams/Ops%20team/grants",
            json!({ "role": "Space manager", "environments": ["Test"] }),
        )
        .await
        .expect(201);
    admin
        .post(
            "/api/roles",
            json!({ "name": "Auditor", "permissions": ["EventView"] }),
        )
        .await
        .expect(201);

    // Every change once, by admin from 127.0.0.1, in its space (None: outside any).
    let all = admin
        .get("/api/spaces/Ops/audit?limit=1000")
        .await
        .expect(200);
    let all = events(&all);
    let expected: &[(&str, &str, &str, Option<&str>)] = &[
        ("created", "space", "Ops", None),
        ("created", "environment", "Test", Some("Ops")),
        ("created", "environment", "Gone", Some("Ops")),
        ("deleted", "environment", "Gone", Some("Ops")),
        ("created", "machine", "p1", Some("Ops")),
        ("created", "machine", "l1", Some("Ops")),
        ("deleted", "machine", "l1", Some("Ops")),
        ("started", "task", &task_id, Some("Ops")),
        ("canceled", "task", &task_id, Some("Ops")),
        ("created", "package", "Acme.Web 1.0.0", Some("Ops")),
        ("deleted", "package", "Acme.Web 1.0.0", Some("Ops")),
        ("created", "user", "carol", None),
        ("disabled", "user", "carol", None),
        ("enabled", "user", "carol", None),
        ("changed", "password", "carol", None),
        ("created", "team", "Ops team", Some("Ops")),
        ("created", "role", "Auditor", None),
    ];
    for (action, kind, object, space) in expected {
        let found: Vec<&Value> = all
            .iter()
            .filter(|e| e["action"] == *action && e["kind"] == *kind && e["object"] == *object)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "{action} {kind} {object}: {found:?} in {all:#?}"
        );
        let e = found[0];
        assert_eq!(e["username"], "admin", "{e}");
        assert_eq!(e["source"], "127.0.0.1", "{e}");
        assert_eq!(e["space"].as_str(), *space, "{e}");
        assert!(e["at"].as_i64().unwrap() > 0);
    }
    // Keys: created and revoked, named by id (never by the key).
    let key_events: Vec<&Value> = all
        .iter()
        .filter(|e| {
            e["kind"] == "api key"
                && e["object"]
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("#{new_key_id} "))
        })
        .collect();
    let actions: Vec<&str> = key_events
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["revoked", "created"], "{key_events:?}");
    assert!(key_events.iter().all(|e| e["space"].is_null()));
    // Team changes: the member and the grant, one entry each.
    let team_changes: Vec<String> = all
        .iter()
        .filter(|e| e["kind"] == "team" && e["action"] == "changed")
        .map(|e| e["details"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(team_changes.len(), 2, "{team_changes:?}");
    assert!(team_changes.iter().any(|d| d == "added member carol"));
    assert!(
        team_changes
            .iter()
            .any(|d| d.contains("granted Space manager")
                && d.contains(&format!("#{}", grant["id"]))
                && d.contains("environments Test")),
        "{team_changes:?}"
    );
    // The task's entry names its variables, not their values.
    let started = all.iter().find(|e| e["action"] == "started").unwrap();
    let details = started["details"].as_str().unwrap();
    assert!(details.contains("DB_PASSWORD"), "{details}");
    // Newest first.
    let ats: Vec<i64> = all.iter().map(|e| e["at"].as_i64().unwrap()).collect();
    assert!(ats.windows(2).all(|w| w[0] >= w[1]), "{ats:?}");

    // No secret anywhere: not the sensitive value, the passwords, nor the key.
    let text = serde_json::to_string(&all).unwrap();
    for secret in [SECRET, PASSWORD, NEW_PASSWORD, new_key.as_str()] {
        assert!(!text.contains(secret), "'{secret}' is in the audit log");
    }
    // Nor in the task as the API shows it.
    let shown = admin
        .get(&format!("/api/spaces/Ops/tasks/{task_id}"))
        .await
        .expect(200);
    assert!(!shown.to_string().contains(SECRET), "{shown}");
    assert_eq!(
        shown["task"]["arguments"]["sensitive_variables"]["DB_PASSWORD"],
        "********"
    );

    // Per space: Default's log has the changes outside any space, not Ops's.
    let default = events(&admin.get("/api/audit?limit=1000").await.expect(200));
    assert!(default.iter().all(|e| e["space"].is_null()), "{default:#?}");
    assert!(default
        .iter()
        .any(|e| e["kind"] == "role" && e["object"] == "Auditor"));

    // Another user's changes, then the filters.
    server.create_user("dave", Some("dave-password")).await;
    server
        .team_with_role(Some("Ops"), "Ops managers", &["dave"], "Space manager", &[])
        .await;
    let dave = server.login("dave", "dave-password").await;
    dave.post(
        "/api/spaces/Ops/environments",
        json!({ "name": "Dave env" }),
    )
    .await
    .expect(201);
    dave.delete("/api/spaces/Ops/environments/Dave%20env")
        .await
        .expect(204);
    let all = events(
        &admin
            .get("/api/spaces/Ops/audit?limit=1000")
            .await
            .expect(200),
    );
    let by_dave = events(
        &admin
            .get("/api/spaces/Ops/audit?user=dave&limit=1000")
            .await
            .expect(200),
    );
    let expected: Vec<&Value> = all.iter().filter(|e| e["username"] == "dave").collect();
    assert_eq!(by_dave.iter().collect::<Vec<_>>(), expected);
    assert_eq!(by_dave.len(), 2, "{by_dave:#?}");
    assert!(by_dave
        .iter()
        .all(|e| e["space"] == "Ops" && e["kind"] == "environment"));
    // since: exactly the events at or after it.
    let since = all.iter().find(|e| e["kind"] == "role").unwrap()["at"]
        .as_i64()
        .unwrap();
    let recent = events(
        &admin
            .get(&format!("/api/spaces/Ops/audit?since={since}&limit=1000"))
            .await
            .expect(200),
    );
    let expected: Vec<&Value> = all
        .iter()
        .filter(|e| e["at"].as_i64().unwrap() >= since)
        .collect();
    assert_eq!(recent.iter().collect::<Vec<_>>(), expected);
    assert!(recent.len() < all.len());
    assert!(recent.iter().any(|e| e["kind"] == "role"));
    let both = events(
        &admin
            .get(&format!(
                "/api/spaces/Ops/audit?user=admin&since={since}&limit=1000"
            ))
            .await
            .expect(200),
    );
    assert!(!both.is_empty());
    assert!(both
        .iter()
        .all(|e| e["username"] == "admin" && e["at"].as_i64().unwrap() >= since));
    assert_eq!(admin.get("/api/audit?limit=0").await.status, 400);
    assert_eq!(admin.get("/api/audit?since=yesterday").await.status, 400);

    // A space manager sees the space's log, not the changes outside any space.
    let seen = events(
        &dave
            .get("/api/spaces/Ops/audit?limit=1000")
            .await
            .expect(200),
    );
    assert!(!seen.is_empty());
    assert!(seen.iter().all(|e| e["space"] == "Ops"), "{seen:#?}");
}
