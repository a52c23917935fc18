//! Spaces keep their things apart: what is in one space is not there in
//! another (404, never 403), names may repeat, lists are per space, ids of
//! another space's things never answer, and a space holding machines cannot be
//! deleted. Requests that name no space work in Default.
#![allow(clippy::unwrap_used)]

mod common;

use common::{thumbprint, Server};
use reqwest::Method;
use serde_json::{json, Value};

fn names(v: &Value, field: &str) -> Vec<String> {
    let mut n: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x[field].as_str().unwrap().to_string())
        .collect();
    n.sort();
    n
}

#[tokio::test]
async fn spaces_are_isolated() {
    let server = Server::start().await;
    let admin = &server.admin;
    let ops = admin
        .post(
            "/api/spaces",
            json!({ "name": "Ops", "description": "operations" }),
        )
        .await
        .expect(201);
    let ops_id = ops["id"].as_i64().unwrap();
    assert!(!ops["is_default"].as_bool().unwrap());

    // The same names in both spaces: environment, machine (even the same
    // certificate: one tentacle may serve several spaces), team, package.
    let shared_thumbprint = thumbprint();
    for space in [None, Some("Ops")] {
        server.environment(space, "Test").await;
        let mut body = common::listening("web", &["Test"], &["web"]);
        body["thumbprint"] = json!(shared_thumbprint);
        let prefix = common::space_prefix(space);
        admin
            .post(&format!("{prefix}/machines"), body)
            .await
            .expect(201);
        admin
            .post(&format!("{prefix}/teams"), json!({ "name": "Deployers" }))
            .await
            .expect(201);
        server.package(space, "Acme.Web", "1.0.0").await;
    }
    // Within one space, a second machine with that certificate is refused.
    let mut clash = common::listening("web-2", &["Test"], &[]);
    clash["thumbprint"] = json!(shared_thumbprint);
    assert_eq!(
        admin.post("/api/spaces/Ops/machines", clash).await.status,
        409
    );

    // Things only in Default.
    server.environment(None, "Production").await;
    server.machine(None, "db", &["Production"], &["db"]).await;
    admin
        .post("/api/teams", json!({ "name": "Default only" }))
        .await
        .expect(201);
    server.package(None, "Acme.Db", "2.0.0").await;
    let default_task = admin
        .script(
            None,
            json!({ "script": "echo default", "machines": ["db"] }),
        )
        .await
        .expect(201)["task"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    // And one task in Ops.
    let ops_task = admin
        .script(
            Some("Ops"),
            json!({ "script": "echo ops", "machines": ["web"] }),
        )
        .await
        .expect(201);
    assert_eq!(ops_task["task"]["space_id"], ops_id);
    let ops_task = ops_task["task"]["id"].as_str().unwrap().to_string();

    // Default's things are not there through Ops.
    for path in [
        "/api/spaces/Ops/machines/db".to_string(),
        "/api/spaces/Ops/packages/Acme.Db/2.0.0".to_string(),
        "/api/spaces/Ops/packages/Acme.Db/latest".to_string(),
        "/api/spaces/Ops/teams/Default%20only".to_string(),
        format!("/api/spaces/Ops/tasks/{default_task}"),
        format!("/api/spaces/Ops/tasks/{default_task}/log"),
        format!("/api/spaces/Ops/tasks/{default_task}/log/stream"),
    ] {
        let r = admin.head_only(Method::GET, &path).await;
        assert_eq!(r.status, 404, "GET {path}: {}", r.body);
    }
    for (method, path, body) in [
        (
            Method::POST,
            format!("/api/spaces/Ops/tasks/{default_task}/cancel"),
            json!({}),
        ),
        (
            Method::POST,
            format!("/api/spaces/Ops/tasks/{default_task}/guidance"),
            json!({ "machine": "db", "action": "fail" }),
        ),
        (
            Method::POST,
            "/api/spaces/Ops/tasks/script".to_string(),
            json!({ "script": "echo", "machines": ["db"] }),
        ),
        (
            Method::POST,
            "/api/spaces/Ops/tasks/health".to_string(),
            json!({ "machines": ["db"] }),
        ),
        (
            Method::POST,
            "/api/spaces/Ops/teams/Default%20only/members".to_string(),
            json!({ "username": "admin" }),
        ),
    ] {
        let r = admin
            .call(method.clone(), &path, common::Body::Json(body))
            .await;
        assert_eq!(r.status, 404, "{method} {path}: {}", r.body);
    }
    for path in [
        "/api/spaces/Ops/machines/db",
        "/api/spaces/Ops/packages/Acme.Db/2.0.0",
        "/api/spaces/Ops/environments/Production",
        "/api/spaces/Ops/teams/Default%20only",
    ] {
        let r = admin.delete(path).await;
        assert_eq!(r.status, 404, "DELETE {path}: {}", r.body);
    }
    // An Ops task through Default (no space in the path) is not there either.
    assert_eq!(
        admin.get(&format!("/api/tasks/{ops_task}")).await.status,
        404
    );
    admin
        .get(&format!("/api/spaces/Ops/tasks/{ops_task}"))
        .await
        .expect(200);
    // Nothing was deleted or started by the refused requests.
    admin.get("/api/machines/db").await.expect(200);
    admin.get("/api/packages/Acme.Db/2.0.0").await.expect(200);
    assert_eq!(server.task_ids(Some("Ops")).await, [ops_task.as_str()]);

    // Lists are per space; requests without a space work in Default.
    let m = admin.get("/api/machines").await.expect(200);
    assert_eq!(names(&m, "name"), ["db", "web"]);
    assert!(m.as_array().unwrap().iter().all(|x| x["space_id"] == 1));
    let m = admin.get("/api/spaces/Ops/machines").await.expect(200);
    assert_eq!(names(&m, "name"), ["web"]);
    assert_eq!(m[0]["space_id"], ops_id);
    // By id, and in any case, it is the same space.
    let m2 = admin
        .get(&format!("/api/spaces/Spaces-{ops_id}/machines"))
        .await
        .expect(200);
    assert_eq!(m, m2);
    let m3 = admin.get("/api/spaces/ops/machines").await.expect(200);
    assert_eq!(m, m3);
    assert_eq!(
        names(&admin.get("/api/environments").await.expect(200), "name"),
        ["Production", "Test"]
    );
    assert_eq!(
        names(
            &admin.get("/api/spaces/Ops/environments").await.expect(200),
            "name"
        ),
        ["Test"]
    );
    assert_eq!(
        names(&admin.get("/api/packages").await.expect(200), "package_id"),
        ["Acme.Db", "Acme.Web"]
    );
    assert_eq!(
        names(
            &admin.get("/api/spaces/Ops/packages").await.expect(200),
            "package_id"
        ),
        ["Acme.Web"]
    );
    let tasks = admin.get("/api/tasks").await.expect(200);
    assert_eq!(names(&tasks, "id"), [default_task.as_str()]);
    let tasks = admin.get("/api/spaces/Ops/tasks").await.expect(200);
    assert_eq!(names(&tasks, "id"), [ops_task.as_str()]);
    // Teams: the space's own, and those outside any space.
    let teams = admin.get("/api/teams").await.expect(200);
    assert_eq!(
        names(&teams, "name"),
        ["Default only", "Deployers", "Octopus Administrators"]
    );
    let teams = admin.get("/api/spaces/Ops/teams").await.expect(200);
    assert_eq!(
        names(&teams, "name"),
        ["Deployers", "Octopus Administrators"]
    );
    let ops_deployers = admin
        .get("/api/spaces/Ops/teams/Deployers")
        .await
        .expect(200);
    let default_deployers = admin.get("/api/teams/Deployers").await.expect(200);
    assert_ne!(ops_deployers["id"], default_deployers["id"]);
    assert_eq!(ops_deployers["space_id"], ops_id);

    // A space that does not exist answers as a space one cannot see.
    let r = admin.get("/api/spaces/Nowhere/machines").await;
    assert_eq!(r.status, 404);
    assert!(
        r.error().contains("space 'Nowhere' does not exist"),
        "{}",
        r.body
    );

    // A space holding machines cannot be deleted; the answer says how many.
    admin
        .post(
            "/api/spaces/Ops/machines",
            common::listening("web-3", &["Test"], &[]),
        )
        .await
        .expect(201);
    let r = admin.delete("/api/spaces/Ops").await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(r.error().contains("2 machine(s)"), "{}", r.body);
    admin.get("/api/spaces/Ops/machines/web").await.expect(200);
    // Nor can the default space.
    let r = admin.delete("/api/spaces/Default").await;
    assert_eq!(r.status, 422, "{}", r.body);

    // Once empty of machines, it can; then nothing of it answers.
    admin
        .post(
            &format!("/api/spaces/Ops/tasks/{ops_task}/cancel"),
            json!({}),
        )
        .await
        .expect(202);
    for m in ["web", "web-3"] {
        admin
            .delete(&format!("/api/spaces/Ops/machines/{m}"))
            .await
            .expect(204);
    }
    admin.delete("/api/spaces/Ops").await.expect(204);
    assert_eq!(admin.get("/api/spaces/Ops/machines").await.status, 404);
    assert_eq!(admin.get("/api/spaces/Ops").await.status, 404);
    // Default is untouched.
    assert_eq!(
        names(&admin.get("/api/machines").await.expect(200), "name"),
        ["db", "web"]
    );
}

#[tokio::test]
async fn a_grant_in_one_space_reaches_no_other() {
    let server = Server::start().await;
    let admin = &server.admin;
    admin
        .post("/api/spaces", json!({ "name": "Ops" }))
        .await
        .expect(201);
    server.environment(Some("Ops"), "Test").await;
    server.machine(Some("Ops"), "ops-web", &["Test"], &[]).await;
    server.environment(None, "Test").await;
    server.machine(None, "default-web", &["Test"], &[]).await;
    let dev_id = admin
        .post("/api/spaces", json!({ "name": "Dev" }))
        .await
        .expect(201)["id"]
        .as_i64()
        .unwrap();
    server.environment(Some("Dev"), "Test").await;
    server.machine(Some("Dev"), "dev-web", &["Test"], &[]).await;

    // Olga views Ops; Sam manages Ops. Neither holds anything in Default.
    server.create_user("olga", Some("olga-password")).await;
    server.create_user("sam", Some("sam-password")).await;
    server
        .team_with_role(
            Some("Ops"),
            "Ops viewers",
            &["olga"],
            "Environment viewer",
            &[],
        )
        .await;
    server
        .team_with_role(Some("Ops"), "Ops managers", &["sam"], "Space manager", &[])
        .await;
    let olga = server.login("olga", "olga-password").await;
    let sam = server.login("sam", "sam-password").await;

    // In Ops: what the role gives works, what it lacks is 403.
    let m = olga.get("/api/spaces/Ops/machines").await.expect(200);
    assert_eq!(names(&m, "name"), ["ops-web"]);
    let r = olga.get("/api/spaces/Ops/audit").await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.error().contains("EventView"), "{}", r.body);
    let r = olga
        .post("/api/spaces/Ops/environments", json!({ "name": "Dev" }))
        .await;
    assert_eq!(r.status, 403, "{}", r.body);

    // A space they hold nothing in, named in the path, is not there for them:
    // 404 as for a space that does not exist, whatever the route.
    for who in [&olga, &sam] {
        for path in [
            "/api/spaces/Dev/machines",
            "/api/spaces/Dev/machines/dev-web",
            "/api/spaces/Dev/environments",
            "/api/spaces/Dev/teams",
            "/api/spaces/Dev/audit",
            "/api/spaces/Dev/tasks",
            &format!("/api/spaces/Spaces-{dev_id}/machines"),
            "/api/spaces/Dev",
        ] {
            let r = who.get(path).await;
            assert_eq!(r.status, 404, "GET {path}: {}", r.body);
            assert!(r.error().contains("does not exist"), "{}", r.body);
        }
        let r = who
            .post(
                "/api/spaces/Dev/machines",
                common::listening("sneaky", &["Test"], &[]),
            )
            .await;
        assert_eq!(r.status, 404, "{}", r.body);
        // The default space is the exception (every server has one; commit
        // 85e523c): named or not, a route there answers 403 naming the
        // permission they lack.
        for path in ["/api/machines", "/api/spaces/Default/machines"] {
            let r = who.get(path).await;
            assert_eq!(r.status, 403, "GET {path}: {}", r.body);
            assert!(r.error().contains("MachineView"), "{}", r.body);
            assert!(r.error().contains("'Default'"), "{}", r.body);
        }
        let r = who
            .post(
                "/api/spaces/Default/machines",
                common::listening("sneaky", &["Test"], &[]),
            )
            .await;
        assert_eq!(r.status, 403, "{}", r.body);
        // They list Ops and the Default space (which every signed-in caller
        // sees, as the routes in it answer 403 rather than 404), not Dev.
        let spaces = who.get("/api/spaces").await.expect(200);
        let mut listed = names(&spaces, "name");
        listed.sort();
        assert_eq!(listed, ["Default", "Ops"]);
        who.get("/api/spaces/Default").await.expect(200);
    }
    admin.get("/api/machines/default-web").await.expect(200);
    assert_eq!(admin.get("/api/machines/sneaky").await.status, 404);
    assert_eq!(
        admin.get("/api/spaces/Dev/machines/sneaky").await.status,
        404
    );

    // A Space manager of Ops runs Ops, and cannot reach beyond it: no team
    // outside any space, no grant in every space, no joining the administrators.
    sam.post("/api/spaces/Ops/environments", json!({ "name": "Dev" }))
        .await
        .expect(201);
    sam.post("/api/spaces/Ops/teams", json!({ "name": "Ops deployers" }))
        .await
        .expect(201);
    let r = sam
        .post(
            "/api/spaces/Ops/teams",
            json!({ "name": "Everywhere", "system": true }),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = sam
        .post(
            "/api/spaces/Ops/teams/Ops%20deployers/grants",
            json!({ "role": "System administrator", "all_spaces": true }),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    let r = sam
        .post(
            "/api/spaces/Ops/teams/Octopus%20Administrators/members",
            json!({ "username": "sam" }),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let r = sam
        .post(
            "/api/spaces/Ops/teams/Octopus%20Administrators/grants",
            json!({ "role": "Space manager" }),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    // A System administrator grant in Ops gives him Ops, nothing more.
    sam.post(
        "/api/spaces/Ops/teams/Ops%20deployers/members",
        json!({ "username": "sam" }),
    )
    .await
    .expect(200);
    sam.post(
        "/api/spaces/Ops/teams/Ops%20deployers/grants",
        json!({ "role": "System administrator" }),
    )
    .await
    .expect(201);
    for path in ["/api/users", "/api/roles"] {
        assert_eq!(sam.get(path).await.status, 403, "GET {path}");
    }
    assert_eq!(
        sam.post("/api/spaces", json!({ "name": "Mine" }))
            .await
            .status,
        403
    );
    assert_eq!(sam.get("/api/spaces/Dev/machines").await.status, 404);
    let me = sam.get("/api/users/me").await.expect(200);
    assert!(!me["user"]["is_admin"].as_bool().unwrap(), "{me}");
}
