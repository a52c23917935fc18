//! `GET /api/openapi.json`: served without a key, OpenAPI 3, and describing every
//! route the router serves, with the API key scheme on the authenticated ones.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use octo_server_core::{start, RunArgs};
use serde_json::Value;

/// Every route of the API: (path, methods), whether it needs the API key, and
/// whether it works in a space (then it is also served, and documented, under
/// `/api/spaces/{space}`).
const ROUTES: &[(&str, &[&str], bool, bool)] = &[
    ("/api", &["get"], false, false),
    ("/api/openapi.json", &["get"], false, false),
    ("/api/users/login", &["post"], false, false),
    ("/api/server", &["get"], true, false),
    ("/api/server/rotate-certificate", &["post"], true, false),
    ("/api/spaces", &["get", "post"], true, false),
    ("/api/spaces/{space}", &["get", "delete"], true, false),
    ("/api/environments", &["get", "post"], true, true),
    ("/api/environments/{name}", &["put", "delete"], true, true),
    ("/api/machines", &["get", "post"], true, true),
    ("/api/machines/register", &["post"], true, true),
    (
        "/api/machines/{name}",
        &["get", "put", "delete"],
        true,
        true,
    ),
    ("/api/machines/discover", &["post"], true, true),
    ("/api/worker-pools", &["get"], true, true),
    ("/api/tenants", &["get"], true, true),
    ("/api/machine-policies", &["get", "post"], true, true),
    ("/api/machine-policies/{name}", &["put"], true, true),
    ("/api/api-keys", &["get", "post"], true, false),
    ("/api/api-keys/{id}", &["delete"], true, false),
    ("/api/users", &["get", "post"], true, false),
    ("/api/users/me", &["get"], true, false),
    ("/api/users/logout", &["post"], true, false),
    ("/api/users/{username}", &["get"], true, false),
    ("/api/users/{username}/disable", &["post"], true, false),
    ("/api/users/{username}/enable", &["post"], true, false),
    ("/api/users/{username}/password", &["put"], true, false),
    ("/api/teams", &["get", "post"], true, true),
    ("/api/teams/{name}", &["get", "delete"], true, true),
    ("/api/teams/{name}/members", &["post"], true, true),
    (
        "/api/teams/{name}/members/{username}",
        &["delete"],
        true,
        true,
    ),
    ("/api/teams/{name}/grants", &["post"], true, true),
    ("/api/teams/{name}/grants/{id}", &["delete"], true, true),
    ("/api/roles", &["get", "post"], true, false),
    ("/api/roles/{name}", &["get"], true, false),
    ("/api/audit", &["get"], true, true),
    ("/api/tasks", &["get"], true, true),
    ("/api/tasks/script", &["post"], true, true),
    ("/api/tasks/health", &["post"], true, true),
    ("/api/tasks/{id}", &["get"], true, true),
    ("/api/tasks/{id}/log", &["get"], true, true),
    ("/api/tasks/{id}/log/stream", &["get"], true, true),
    ("/api/tasks/{id}/cancel", &["post"], true, true),
    ("/api/tasks/deploy", &["post"], true, true),
    ("/api/tasks/upgrade", &["post"], true, true),
    ("/api/tasks/tentacle-upgrade", &["post"], true, true),
    ("/api/tasks/{id}/guidance", &["post"], true, true),
    ("/api/packages", &["get", "post"], true, true),
    (
        "/api/packages/{id}/{version}/download",
        &["get"],
        true,
        true,
    ),
    ("/api/nodes", &["get"], true, false),
    ("/api/nodes/ping", &["get"], false, false),
    ("/api/nodes/{name}/drain", &["post"], true, false),
    ("/api/nodes/{name}/undrain", &["post"], true, false),
    (
        "/api/packages/{id}/{version}",
        &["get", "delete"],
        true,
        true,
    ),
];

/// The path of a route in a space.
fn in_space(path: &str) -> String {
    format!("/api/spaces/{{space}}{}", &path["/api".len()..])
}

const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

#[tokio::test]
async fn openapi_document_describes_every_route() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(&RunArgs {
        data: dir.path().join("data"),
        listen: "127.0.0.1:0".parse().unwrap(),
        comms_listen_port: 0,
        comms_listen_address: "127.0.0.1".into(),
        ..RunArgs::default()
    })
    .await
    .unwrap();
    let base = format!("http://{}", server.api_addr);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();

    // No key.
    let resp = http
        .get(format!("{base}/api/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let doc: Value = resp.json().await.unwrap();
    let version = doc["openapi"].as_str().unwrap();
    assert!(version.starts_with("3."), "openapi version {version}");
    assert!(doc["info"]["title"].is_string());

    // The key scheme.
    let scheme = &doc["components"]["securitySchemes"]["api_key"];
    assert_eq!(scheme["type"], "apiKey", "{scheme}");
    assert_eq!(scheme["in"], "header");
    assert_eq!(scheme["name"], "X-Octopus-ApiKey");

    // Exactly the routes, with their methods and security.
    let paths = doc["paths"].as_object().unwrap();
    let mut expected: Vec<(String, &[&str], bool)> = Vec::new();
    for (path, methods, authenticated, spaced) in ROUTES {
        expected.push((path.to_string(), methods, *authenticated));
        if *spaced {
            expected.push((in_space(path), methods, *authenticated));
        }
    }
    for (path, methods, authenticated) in &expected {
        let item = paths
            .get(path.as_str())
            .unwrap_or_else(|| panic!("{path} is missing from the document"));
        let documented: Vec<&str> = METHODS
            .iter()
            .copied()
            .filter(|m| item.get(*m).is_some())
            .collect();
        assert_eq!(&documented, methods, "methods of {path}");
        for m in *methods {
            let op = &item[*m];
            let responses = op["responses"].as_object().unwrap();
            assert!(!responses.is_empty());
            let secured = op["security"]
                .as_array()
                .is_some_and(|s| s.iter().any(|r| r.get("api_key").is_some()));
            assert_eq!(secured, *authenticated, "security of {m} {path}");
            if *authenticated {
                // What it needs, and the answers when that is missing.
                assert!(
                    op["x-octopus-permission"].is_string(),
                    "permission of {m} {path}"
                );
                assert!(responses.contains_key("401"), "401 of {m} {path}");
                assert!(
                    op["description"]
                        .as_str()
                        .is_some_and(|d| d.contains("Needs: ")),
                    "description of {m} {path}"
                );
            }
            if path.starts_with("/api/spaces/{space}/") {
                assert_eq!(op["parameters"][0]["name"], "space", "{m} {path}");
            }
        }
    }
    let mut extra: Vec<&String> = paths
        .keys()
        .filter(|p| !expected.iter().any(|(r, _, _)| r == *p))
        .collect();
    extra.sort();
    assert!(
        extra.is_empty(),
        "paths the router does not serve: {extra:?}"
    );

    // Every documented route is really served: without a key, an authenticated
    // route answers 401, not the fallback's 404.
    for (path, methods, authenticated) in &expected {
        if !authenticated {
            continue;
        }
        let url = format!(
            "{base}{}",
            path.replace("{name}", "x")
                .replace("{id}", "1")
                .replace("{space}", "Default")
                .replace("{username}", "u")
                .replace("{version}", "1.0.0")
        );
        let method: reqwest::Method = methods[0].to_uppercase().parse().unwrap();
        let status = http.request(method, &url).send().await.unwrap().status();
        assert_eq!(status, 401, "{} {url}", methods[0]);
    }

    // Schemas, and the references to them resolve.
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for name in [
        "Machine",
        "Task",
        "TaskLogLine",
        "TaskStep",
        "TaskView",
        "Environment",
        "ApiKey",
        "User",
        "MachineRequest",
        "ScriptRequest",
        "ErrorBody",
        "Space",
        "Team",
        "Grant",
        "Role",
        "Permission",
        "AuditEvent",
        "WhoAmI",
    ] {
        assert!(schemas.contains_key(name), "schema {name} is missing");
    }
    assert_eq!(schemas["Task"]["properties"]["arguments"]["type"], "object");
    let text = doc.to_string();
    for piece in text.split("\"#/components/schemas/").skip(1) {
        let name = &piece[..piece.find('"').unwrap()];
        assert!(schemas.contains_key(name), "dangling reference to {name}");
    }

    // A typed response, for one route.
    let get_machine = &paths["/api/machines/{name}"]["get"];
    assert_eq!(
        get_machine["responses"]["200"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/Machine"
    );
    assert_eq!(get_machine["parameters"][0]["name"], "name");
    assert_eq!(get_machine["parameters"][0]["in"], "path");

    server.stop().await;
}
