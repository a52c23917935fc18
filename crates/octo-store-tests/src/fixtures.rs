//! Data the contract tests build their stores from, for engines' own tests too.

use octo_store::{EndpointKind, Machine, NewLogLine, NewMachine, NewPackage, NewTask, Store, User};

/// Owned strings.
pub fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// A thumbprint: `c` 64 times.
pub fn thumb(c: char) -> String {
    std::iter::repeat_n(c, 64).collect()
}

/// A listening machine in `environments` with `roles`, thumbprint `AAAA...`.
pub fn new_machine(name: &str, environments: &[&str], roles: &[&str]) -> NewMachine {
    NewMachine {
        space_id: 1,
        name: name.to_string(),
        kind: EndpointKind::Listening,
        uri: format!("https://{name}:10933/"),
        thumbprint: thumb('A'),
        environments: strings(environments),
        roles: strings(roles),
        tenants: Vec::new(),
        tenant_tags: Vec::new(),
        policy: None,
        worker_pool: None,
    }
}

/// The machines' names, in order.
pub fn names(ms: &[Machine]) -> Vec<&str> {
    ms.iter().map(|m| m.name.as_str()).collect()
}

/// A line a tentacle sent: stdout, timestamp `1_000 + sequence`.
pub fn tentacle_line(machine_id: i64, sequence: i64, text: &str) -> NewLogLine {
    NewLogLine {
        machine_id: Some(machine_id),
        sequence: Some(sequence),
        timestamp: 1_000 + sequence,
        stream: "stdout".into(),
        text: text.into(),
    }
}

/// A line the server wrote about the task as a whole.
pub fn server_line(text: &str) -> NewLogLine {
    NewLogLine {
        machine_id: None,
        sequence: None,
        timestamp: 5,
        stream: "server".into(),
        text: text.into(),
    }
}

/// A zip package of 10 bytes whose SHA-256 is `sha` 64 times.
pub fn new_package(id: &str, version: &str, sha: char) -> NewPackage {
    NewPackage {
        space_id: 1,
        package_id: id.into(),
        version: version.into(),
        format: "zip".into(),
        sha256: std::iter::repeat_n(sha, 64).collect(),
        size: 10,
        file_name: format!("{id}.{version}.zip"),
    }
}

/// A task of the default space on `machine_ids`, without secrets.
pub fn new_task(
    kind: &str,
    description: &str,
    arguments: &serde_json::Value,
    machine_ids: &[i64],
) -> NewTask {
    NewTask {
        space_id: 1,
        kind: kind.into(),
        description: description.into(),
        arguments: arguments.clone(),
        machine_ids: machine_ids.to_vec(),
        environments: Vec::new(),
        secrets: Vec::new(),
        audit: None,
    }
}

/// The user, made a member of the built-in administrators' team (team 1).
#[allow(clippy::unwrap_used)]
pub async fn make_admin(s: &dyn Store, user: &User) -> User {
    s.add_team_member(1, user.id).await.unwrap();
    s.user_by_id(user.id).await.unwrap().unwrap()
}
