//! Input rules at the API (one place: `octo_api_types::validate`) and the
//! shape of every error: hostile names, folder-breaking environment names,
//! listening URIs with impossible ports and reserved variable names get a 400
//! that names the field and the rule, and nothing is stored; every error the
//! API answers is the JSON error body, axum's own rejections and 405s too.
#![allow(clippy::unwrap_used)]

mod common;

use common::{listening, Server};
use reqwest::Method;
use serde_json::json;

/// `reply` is a 400 whose JSON error names `field` and says `rule`.
fn refused(reply: &common::Reply, field: &str, rule: &str) {
    assert_eq!(reply.status, 400, "{reply:?}");
    let error = reply.body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{reply:?}"));
    assert!(error.contains(&format!("field `{field}`")), "{error}");
    assert!(error.contains(rule), "{error}");
    assert!(
        !error.contains('\u{1b}') && !error.contains('\0'),
        "{error:?}"
    );
}

#[tokio::test]
async fn names_and_numbers_are_checked_at_the_api() {
    let mut s = Server::start().await;
    let api = &s.admin;

    // Control characters, 1 MB names, folder-breaking environment names.
    let r = api
        .post("/api/environments", json!({"name": "evil\u{1b}[31m"}))
        .await;
    refused(&r, "name", "control character U+001B");
    let r = api
        .post("/api/environments", json!({"name": "nul\0"}))
        .await;
    refused(&r, "name", "U+0000");
    let big = "x".repeat(1 << 20);
    let r = api.post("/api/environments", json!({"name": big})).await;
    refused(&r, "name", "1048576 characters long; at most");
    for bad in ["a/b", "..", ".", "a\\b"] {
        let r = api.post("/api/environments", json!({"name": bad})).await;
        refused(&r, "name", "folder name on every tentacle");
    }
    let envs = api.get("/api/environments").await.expect(200);
    assert!(envs.as_array().unwrap().is_empty(), "{envs}");
    s.environment(None, "Production").await;
    let r = api
        .put("/api/environments/Production", json!({"name": "../etc"}))
        .await;
    refused(&r, "name", "`/`");
    for (field, body) in [
        (
            "description",
            json!({"name": "T", "description": "bell\u{7}"}),
        ),
        ("name", json!({"name": "  "})),
    ] {
        refused(&api.post("/api/environments", body).await, field, "");
    }

    // Machines: every list item, and the listening URI's port.
    let mut m = listening("web\u{9b}", &["Production"], &[]);
    refused(
        &api.post("/api/machines", m.clone()).await,
        "name",
        "U+009B",
    );
    m["name"] = json!("web");
    m["roles"] = json!(["ok", "bad\u{1b}"]);
    refused(
        &api.post("/api/machines", m.clone()).await,
        "roles[1]",
        "U+001B",
    );
    m["roles"] = json!([]);
    for (uri, rule) in [
        (
            "https://127.0.0.1:99999/",
            "port '99999' is not a number from 1 to 65535",
        ),
        ("https://127.0.0.1:0/", "port '0'"),
        ("https://::1:10933/", "brackets"),
        ("https://host name:1/", "spaces"),
    ] {
        m["uri"] = json!(uri);
        refused(&api.post("/api/machines", m.clone()).await, "uri", rule);
    }
    let machines = api.get("/api/machines").await.expect(200);
    assert!(machines.as_array().unwrap().is_empty(), "{machines}");
    m["uri"] = json!("https://127.0.0.1:65535");
    let created = api.post("/api/machines", m.clone()).await.expect(201);
    assert_eq!(created["uri"], "https://127.0.0.1:65535/");

    // Other bodies: users, teams, spaces, keys.
    refused(
        &api.post("/api/users", json!({"username": "a\u{1b}b"}))
            .await,
        "username",
        "U+001B",
    );
    refused(
        &api.post("/api/teams", json!({"name": "t", "description": "\u{0}"}))
            .await,
        "description",
        "U+0000",
    );
    refused(
        &api.post("/api/spaces", json!({"name": "s".repeat(201)}))
            .await,
        "name",
        "201 characters",
    );
    refused(
        &api.post("/api/api-keys", json!({"purpose": "p\u{1b}"}))
            .await,
        "purpose",
        "U+001B",
    );

    // Reserved variable names, with which and why.
    let r = api
        .script(
            None,
            json!({"script": "true", "machines": ["web"], "variables": {"PATH": "/nowhere"}}),
        )
        .await;
    refused(&r, "variables.PATH", "`PATH` is reserved");
    assert!(
        r.body["error"].as_str().unwrap().contains("every program"),
        "{r:?}"
    );
    let r = api
        .script(
            None,
            json!({"script": "true", "machines": ["web"], "sensitive_variables": {"LD_PRELOAD": "x"}}),
        )
        .await;
    refused(&r, "sensitive_variables.LD_PRELOAD", "reserved");
    let r = api
        .post(
            "/api/tasks/deploy",
            json!({"package_id": "Acme", "environment": "Production", "variables": {"IFS": ","}}),
        )
        .await;
    refused(&r, "variables.IFS", "splits every word");
    let r = api
        .post(
            "/api/tasks/deploy",
            json!({"package_id": "Acme", "environment": "Production", "variables": {"LD.LIBRARY.PATH": "x"}}),
        )
        .await;
    refused(&r, "variables.LD.LIBRARY.PATH", "as `LD_LIBRARY_PATH`");
    let r = api
        .post(
            "/api/tasks/deploy",
            json!({"package_id": "Acme", "environment": "Production", "retention": 3.0}),
        )
        .await;
    assert_ne!(r.status, 400, "3.0 is a whole number: {r:?}");
    assert!(s.task_ids(None).await.is_empty());

    s.stop().await;
}

#[tokio::test]
async fn machine_policies_are_added_and_changed_with_their_settings_checked() {
    let s = Server::start().await;
    let api = &s.admin;
    let r = api
        .post(
            "/api/machine-policies",
            json!({"name": "Keep up", "tentacle_update": "Always", "polling_wait_s": 30}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.body["tentacle_update"], "Always", "{r:?}");
    assert_eq!(r.body["health_check_interval_s"], 3600, "{r:?}");
    assert_eq!(r.body["polling_wait_s"], 30, "{r:?}");
    let r = api
        .post("/api/machine-policies", json!({"name": "keep UP"}))
        .await;
    assert_eq!(r.status, 409, "{r:?}");

    // Each setting's range, named; an unknown behaviour, named.
    for (field, body, rule) in [
        ("name", json!({"name": " "}), "must not be empty"),
        (
            "health_check_interval_s",
            json!({"name": "P", "health_check_interval_s": 5}),
            "must be from 60 to 2678400 seconds, not 5",
        ),
        (
            "health_check_timeout_s",
            json!({"name": "P", "health_check_timeout_s": 0}),
            "must be from 1 to 3600",
        ),
        (
            "polling_wait_s",
            json!({"name": "P", "polling_wait_s": 7200}),
            "not 7200",
        ),
    ] {
        refused(&api.post("/api/machine-policies", body).await, field, rule);
    }
    let r = api
        .put(
            "/api/machine-policies/Keep%20up",
            json!({"tentacle_update": "Sometimes"}),
        )
        .await;
    assert_eq!(r.status, 400, "{r:?}");
    let error = r.body["error"].as_str().unwrap();
    assert!(
        error.contains("tentacle_update") && error.contains("Always"),
        "{error}"
    );
    refused(
        &api.put(
            "/api/machine-policies/Keep%20up",
            json!({"health_check_interval_s": 59}),
        )
        .await,
        "health_check_interval_s",
        "from 60",
    );
    let r = api
        .put(
            "/api/machine-policies/Nope",
            json!({"tentacle_update": "Always"}),
        )
        .await;
    assert_eq!(r.status, 404, "{r:?}");

    // A change keeps what is not given.
    let r = api
        .put(
            "/api/machine-policies/Default%20Machine%20Policy",
            json!({"tentacle_update": "Always"}),
        )
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let listed = api.get("/api/machine-policies").await.expect(200);
    let default = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "Default Machine Policy")
        .unwrap();
    assert_eq!(default["tentacle_update"], "Always", "{listed}");
    assert_eq!(default["polling_wait_s"], 120, "{listed}");
    let audit = api.get("/api/audit").await.expect(200);
    assert!(
        audit.to_string().contains("tentacle updates Always"),
        "{audit}"
    );
}

#[tokio::test]
async fn every_error_is_the_json_error_body() {
    let mut s = Server::start().await;
    let api = &s.admin;
    let json_error = |r: &common::Reply, status: u16, says: &str| {
        assert_eq!(r.status, status, "{r:?}");
        let ct = r.headers["content-type"].to_str().unwrap();
        assert!(ct.starts_with("application/json"), "{ct}: {r:?}");
        let error = r.body["error"].as_str().unwrap_or_else(|| panic!("{r:?}"));
        assert!(error.contains(says), "{error}");
    };
    // A path parameter that does not parse (axum's own rejection).
    let r = api.delete("/api/api-keys/abc").await;
    json_error(&r, 400, "abc");
    json_error(&api.delete("/api/teams/x/grants/nope").await, 400, "nope");
    // Unknown routes, and methods a route does not serve.
    json_error(
        &api.get("/api/no-such-thing").await,
        404,
        "no such API route",
    );
    json_error(
        &s.anonymous().get("/api/no/such/thing").await,
        404,
        "no such API route",
    );
    for method in ["TRACE", "PATCH", "OPTIONS"] {
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        let r = api
            .call(m.clone(), "/api/machines", common::Body::None)
            .await;
        json_error(&r, 405, &format!("method {method} is not allowed"));
        assert_eq!(r.headers["allow"], "GET,HEAD,POST", "{r:?}");
        let r = api
            .call(m, "/api/spaces/Default/environments", common::Body::None)
            .await;
        json_error(&r, 405, "allowed: GET,HEAD,POST");
    }
    let r = api
        .call(Method::DELETE, "/api/server", common::Body::None)
        .await;
    json_error(&r, 405, "allowed: GET,HEAD");
    // Malformed JSON, a wrong content type, a body too large.
    let r = api
        .call(
            Method::POST,
            "/api/environments",
            common::Body::Bytes(b"{not json".to_vec()),
        )
        .await;
    json_error(&r, 400, "malformed request");
    let r = api
        .post("/api/environments", json!({"name": "x", "extra": 1}))
        .await;
    json_error(&r, 400, "extra");
    let r = api.post("/api/environments", json!(["x", ""])).await;
    json_error(&r, 400, "must be a JSON object");
    let r = api
        .post(
            "/api/environments",
            json!({"name": "x", "description": "d".repeat(3 << 20)}),
        )
        .await;
    json_error(&r, 413, "too large");
    // A space given by its id, as `Space.id` shows it.
    api.get("/api/spaces/1/environments").await.expect(200);
    s.stop().await;
}

#[tokio::test]
async fn the_openapi_document_says_every_status_and_the_stream_events() {
    let mut s = Server::start().await;
    let doc = s.anonymous().get("/api/openapi.json").await.expect(200);
    let op = |path: &str, method: &str| doc["paths"][path][method].clone();
    for (path, method) in [
        ("/api/packages/{id}/{version}", "get"),
        ("/api/packages/{id}/{version}", "delete"),
        ("/api/spaces/{space}/packages/{id}/{version}", "get"),
        ("/api/environments", "post"),
        ("/api/machines", "get"),
    ] {
        let responses = op(path, method)["responses"].clone();
        for status in ["400", "401", "403", "500"] {
            assert!(
                responses.get(status).is_some(),
                "{status} of {method} {path}"
            );
        }
    }
    // Routes open to every signed-in caller that check a permission inside.
    for (path, method) in [
        ("/api/users/{username}", "get"),
        ("/api/users/{username}/password", "put"),
    ] {
        assert!(
            op(path, method)["responses"].get("403").is_some(),
            "403 of {method} {path}"
        );
    }
    let with_body = op("/api/environments", "post")["responses"].clone();
    assert!(with_body.get("413").is_some());
    assert!(op("/api/spaces/{space}/machines", "get")["responses"]
        .get("404")
        .is_some());
    assert!(
        doc["paths"]["/api/packages/{id}/{version}"]["get"]["responses"]["400"]["description"]
            .as_str()
            .unwrap()
            .contains("semantic version")
    );
    // The log stream: its events, not a string.
    let stream = op("/api/tasks/{id}/log/stream", "get");
    let schema = &stream["responses"]["200"]["content"]["text/event-stream"]["schema"];
    assert_eq!(schema["type"], "array", "{schema}");
    assert_eq!(
        schema["items"]["$ref"],
        "#/components/schemas/TaskStreamEvent"
    );
    let events = doc["components"]["schemas"]["TaskStreamEvent"].to_string();
    for needle in ["\"task\"", "\"log\"", "\"end\"", "TaskView", "TaskLogLine"] {
        assert!(events.contains(needle), "{needle} in {events}");
    }
    // The input rules, as schemas.
    let name = &doc["components"]["schemas"]["Name"];
    assert_eq!(name["maxLength"], 200, "{name}");
    assert!(
        name["pattern"].as_str().unwrap().contains("\\u001F"),
        "{name}"
    );
    let env = &doc["components"]["schemas"]["NewEnvironment"]["properties"]["name"];
    assert_eq!(env["$ref"], "#/components/schemas/EnvironmentName", "{env}");
    s.stop().await;
}
