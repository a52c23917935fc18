//! `GET /api/openapi.json`: served without a key, OpenAPI 3, and describing every
//! route the router serves, with the API key scheme on the authenticated ones.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use octo_server_core::{start, RunArgs};
use serde_json::Value;

/// Every route of the API: (path, methods), and whether it needs the API key.
const ROUTES: &[(&str, &[&str], bool)] = &[
    ("/api", &["get"], false),
    ("/api/openapi.json", &["get"], false),
    ("/api/users/login", &["post"], false),
    ("/api/server", &["get"], true),
    ("/api/environments", &["get", "post"], true),
    ("/api/environments/{name}", &["delete"], true),
    ("/api/machines", &["get", "post"], true),
    ("/api/machines/register", &["post"], true),
    ("/api/machines/{name}", &["get", "delete"], true),
    ("/api/api-keys", &["get", "post"], true),
    ("/api/api-keys/{id}", &["delete"], true),
    ("/api/users", &["post"], true),
    ("/api/tasks", &["get"], true),
    ("/api/tasks/script", &["post"], true),
    ("/api/tasks/health", &["post"], true),
    ("/api/tasks/{id}", &["get"], true),
    ("/api/tasks/{id}/log", &["get"], true),
    ("/api/tasks/{id}/log/stream", &["get"], true),
    ("/api/tasks/{id}/cancel", &["post"], true),
    ("/api/tasks/deploy", &["post"], true),
    ("/api/tasks/upgrade", &["post"], true),
    ("/api/tasks/{id}/guidance", &["post"], true),
    ("/api/packages", &["get", "post"], true),
    ("/api/packages/{id}/{version}", &["get", "delete"], true),
];

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
    for (path, methods, authenticated) in ROUTES {
        let item = paths
            .get(*path)
            .unwrap_or_else(|| panic!("{path} is missing from the document"));
        let documented: Vec<&str> = METHODS
            .iter()
            .copied()
            .filter(|m| item.get(*m).is_some())
            .collect();
        assert_eq!(&documented, methods, "methods of {path}");
        for m in *methods {
            let op = &item[*m];
            assert!(op["responses"].as_object().is_some_and(|r| !r.is_empty()));
            let secured = op["security"]
                .as_array()
                .is_some_and(|s| s.iter().any(|r| r.get("api_key").is_some()));
            assert_eq!(secured, *authenticated, "security of {m} {path}");
        }
    }
    let mut extra: Vec<&String> = paths
        .keys()
        .filter(|p| !ROUTES.iter().any(|(r, _, _)| r == p))
        .collect();
    extra.sort();
    assert!(
        extra.is_empty(),
        "paths the router does not serve: {extra:?}"
    );

    // Every documented route is really served: without a key, an authenticated
    // route answers 401, not the fallback's 404.
    for (path, methods, authenticated) in ROUTES {
        if !authenticated {
            continue;
        }
        let url = format!("{base}{}", path.replace("{name}", "x").replace("{id}", "1"));
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
