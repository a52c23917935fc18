//! The permission matrix and environment scopes, over real sockets.
//!
//! `permission_matrix_of_every_built_in_role` walks every route of
//! `octo_server_core::api::route_table()` as a user holding one built-in role
//! and checks the answer's class against the tables below, which are written
//! here by hand (from the issue), not read from the server's `authz` module: if
//! the code's tables or a route's permission drift, this test fails. A route
//! missing from [`COVERED`] fails it too, so no new route can be forgotten.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;

use common::{listening, Api, Body, Server};
use octo_api_types::Permission as P;
use reqwest::Method;
use serde_json::json;

// ---------------------------------------------------------------------------
// The expected tables (transcribed from the issue; keep them independent of
// `authz.rs`).

/// Permissions that concern the whole server; they count only from a grant
/// in every space.
const SYSTEM: &[P] = &[
    P::AdministerSystem,
    P::SpaceView,
    P::SpaceCreate,
    P::SpaceEdit,
    P::SpaceDelete,
    P::UserView,
    P::UserEdit,
    P::UserRoleView,
    P::UserRoleEdit,
    P::ApiKeyEdit,
];

/// Permissions that apply in a space.
const SPACE: &[P] = &[
    P::TeamView,
    P::TeamEdit,
    P::EventView,
    P::EnvironmentView,
    P::EnvironmentCreate,
    P::EnvironmentEdit,
    P::EnvironmentDelete,
    P::MachineView,
    P::MachineCreate,
    P::MachineEdit,
    P::MachineDelete,
    P::MachinePolicyView,
    P::MachinePolicyEdit,
    P::TenantView,
    P::TenantEdit,
    P::TaskView,
    P::TaskCreate,
    P::TaskCancel,
    P::InterruptionSubmit,
    P::DeploymentCreate,
    P::VariableView,
    P::FeedView,
    P::BuiltInFeedPush,
    P::BuiltInFeedAdminister,
];

const SYSTEM_ADMINISTRATOR: &str = "System administrator";
const SPACE_MANAGER: &str = "Space manager";
const ENVIRONMENT_MANAGER: &str = "Environment manager";
const ENVIRONMENT_VIEWER: &str = "Environment viewer";
const PROJECT_DEPLOYER: &str = "Project deployer";
const PACKAGE_PUBLISHER: &str = "Package publisher";

/// The permissions of each built-in role.
fn role_permissions(role: &str) -> BTreeSet<P> {
    let list: Vec<P> = match role {
        SYSTEM_ADMINISTRATOR => SYSTEM.iter().chain(SPACE).copied().collect(),
        SPACE_MANAGER => vec![
            P::UserView,
            P::UserRoleView,
            P::TeamView,
            P::TeamEdit,
            P::EventView,
            P::EnvironmentView,
            P::EnvironmentCreate,
            P::EnvironmentEdit,
            P::EnvironmentDelete,
            P::MachineView,
            P::MachineCreate,
            P::MachineEdit,
            P::MachineDelete,
            P::MachinePolicyView,
            P::MachinePolicyEdit,
            P::TenantView,
            P::TenantEdit,
            P::TaskView,
            P::TaskCreate,
            P::TaskCancel,
            P::InterruptionSubmit,
            P::DeploymentCreate,
            P::VariableView,
            P::FeedView,
            P::BuiltInFeedPush,
            P::BuiltInFeedAdminister,
        ],
        ENVIRONMENT_MANAGER => vec![
            P::EnvironmentView,
            P::EnvironmentCreate,
            P::EnvironmentEdit,
            P::EnvironmentDelete,
            P::MachineView,
            P::MachineCreate,
            P::MachineEdit,
            P::MachineDelete,
            P::MachinePolicyView,
            P::MachinePolicyEdit,
            P::TenantView,
            P::TaskView,
            P::TaskCreate,
            P::TaskCancel,
            P::TeamView,
            P::EventView,
        ],
        ENVIRONMENT_VIEWER => vec![
            P::EnvironmentView,
            P::MachineView,
            P::MachinePolicyView,
            P::TenantView,
            P::TaskView,
            P::TeamView,
        ],
        PROJECT_DEPLOYER => vec![
            P::DeploymentCreate,
            P::TaskCreate,
            P::TaskCancel,
            P::InterruptionSubmit,
            P::TaskView,
            P::VariableView,
            P::MachineView,
            P::EnvironmentView,
            P::TenantView,
            P::FeedView,
            P::TeamView,
            P::EventView,
        ],
        PACKAGE_PUBLISHER => vec![P::FeedView, P::BuiltInFeedPush, P::BuiltInFeedAdminister],
        other => panic!("no such built-in role in the test's table: {other}"),
    };
    list.into_iter().collect()
}

/// Who walks the routes: a user holding one role, in Default (a team of
/// Default, a grant without environment scope) or in every space (a team
/// outside any space).
struct Subject {
    role: &'static str,
    everywhere: bool,
}

const SUBJECTS: &[Subject] = &[
    Subject {
        role: SYSTEM_ADMINISTRATOR,
        everywhere: false,
    },
    Subject {
        role: SYSTEM_ADMINISTRATOR,
        everywhere: true,
    },
    Subject {
        role: SPACE_MANAGER,
        everywhere: false,
    },
    Subject {
        role: SPACE_MANAGER,
        everywhere: true,
    },
    Subject {
        role: ENVIRONMENT_MANAGER,
        everywhere: false,
    },
    Subject {
        role: ENVIRONMENT_VIEWER,
        everywhere: false,
    },
    Subject {
        role: PROJECT_DEPLOYER,
        everywhere: false,
    },
    Subject {
        role: PACKAGE_PUBLISHER,
        everywhere: false,
    },
];

impl Subject {
    fn label(&self) -> String {
        let where_ = if self.everywhere {
            "every space"
        } else {
            "Default"
        };
        format!("{} in {where_}", self.role)
    }

    /// The rule: system permissions count only from a grant in every space.
    fn effective(&self) -> BTreeSet<P> {
        role_permissions(self.role)
            .into_iter()
            .filter(|p| self.everywhere || !SYSTEM.contains(p))
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Every route and what it needs.

/// Every route of the API this test knows (method, path). Adding a route to
/// the server without adding it here (and to `cases`) fails the test.
const COVERED: &[(&str, &str)] = &[
    ("GET", "/api"),
    ("GET", "/api/openapi.json"),
    ("GET", "/api/server"),
    ("POST", "/api/server/rotate-certificate"),
    ("GET", "/api/nodes"),
    ("GET", "/api/nodes/ping"),
    ("POST", "/api/nodes/{name}/drain"),
    ("POST", "/api/nodes/{name}/undrain"),
    ("GET", "/api/spaces"),
    ("POST", "/api/spaces"),
    ("GET", "/api/spaces/{space}"),
    ("DELETE", "/api/spaces/{space}"),
    ("GET", "/api/environments"),
    ("POST", "/api/environments"),
    ("DELETE", "/api/environments/{name}"),
    ("PUT", "/api/environments/{name}"),
    ("GET", "/api/machines"),
    ("POST", "/api/machines"),
    ("POST", "/api/machines/register"),
    ("GET", "/api/machines/{name}"),
    ("DELETE", "/api/machines/{name}"),
    ("PUT", "/api/machines/{name}"),
    ("POST", "/api/machines/discover"),
    ("GET", "/api/worker-pools"),
    ("GET", "/api/tenants"),
    ("GET", "/api/machine-policies"),
    ("POST", "/api/machine-policies"),
    ("PUT", "/api/machine-policies/{name}"),
    ("GET", "/api/tasks"),
    ("POST", "/api/tasks/script"),
    ("POST", "/api/tasks/health"),
    ("POST", "/api/tasks/deploy"),
    ("POST", "/api/tasks/upgrade"),
    ("POST", "/api/tasks/tentacle-upgrade"),
    ("GET", "/api/tasks/{id}"),
    ("GET", "/api/tasks/{id}/log"),
    ("GET", "/api/tasks/{id}/log/stream"),
    ("POST", "/api/tasks/{id}/cancel"),
    ("POST", "/api/tasks/{id}/guidance"),
    ("GET", "/api/packages"),
    ("POST", "/api/packages"),
    ("GET", "/api/packages/{id}/{version}"),
    ("GET", "/api/packages/{id}/{version}/download"),
    ("DELETE", "/api/packages/{id}/{version}"),
    ("POST", "/api/users/login"),
    ("POST", "/api/users/logout"),
    ("GET", "/api/users/me"),
    ("GET", "/api/users"),
    ("POST", "/api/users"),
    ("GET", "/api/users/{username}"),
    ("POST", "/api/users/{username}/disable"),
    ("POST", "/api/users/{username}/enable"),
    ("PUT", "/api/users/{username}/password"),
    ("GET", "/api/api-keys"),
    ("POST", "/api/api-keys"),
    ("DELETE", "/api/api-keys/{id}"),
    ("GET", "/api/teams"),
    ("POST", "/api/teams"),
    ("GET", "/api/teams/{name}"),
    ("DELETE", "/api/teams/{name}"),
    ("POST", "/api/teams/{name}/members"),
    ("DELETE", "/api/teams/{name}/members/{username}"),
    ("POST", "/api/teams/{name}/grants"),
    ("DELETE", "/api/teams/{name}/grants/{id}"),
    ("GET", "/api/roles"),
    ("POST", "/api/roles"),
    ("GET", "/api/roles/{name}"),
    ("GET", "/api/audit"),
];

/// What a request needs.
#[derive(Debug, Clone, Copy)]
enum Need {
    /// Nothing (no key).
    Public,
    /// Any signed-in caller.
    Anyone,
    /// This permission (system ones from a grant in every space).
    Perm(P),
}

/// One request to a route, and what it should answer.
struct Case {
    what: &'static str,
    method: Method,
    path: String,
    body: Body,
    needs: Need,
    /// The answer when the caller may (all 2xx or non-403 4xx: past the gate).
    allowed: &'static [u16],
    /// The answer when the caller may not.
    denied: u16,
    /// A stream: read only the status.
    stream: bool,
    /// Send with this key instead of the subject's (a key the case uses up).
    key: Option<String>,
}

fn case(
    what: &'static str,
    method: Method,
    path: String,
    needs: Need,
    allowed: &'static [u16],
) -> Case {
    Case {
        what,
        method,
        path,
        body: Body::None,
        needs,
        allowed,
        denied: 403,
        stream: false,
        key: None,
    }
}

impl Case {
    fn json(mut self, v: serde_json::Value) -> Case {
        self.body = Body::Json(v);
        self
    }
}

/// Things made for one subject (index `i`) so that the requests it is
/// allowed to make can succeed; destructive requests each have their own target.
struct Fixture {
    i: usize,
    username: String,
    password: String,
    /// A finished or running task of Default the subject may see when it has TaskView.
    task: String,
    /// The id of a grant on team `T-grant-{i}`.
    grant: i64,
    /// An extra key of the admin's (someone else's key).
    admins_key: i64,
    /// Keys of the subject's own, to revoke and to log out with.
    own_key: i64,
    logout_key: String,
    /// The server can deploy (has the deployment tool).
    tool: bool,
    /// Whether the server carries a tentacle binary (upgrades possible).
    tentacle_build: bool,
    /// `https://ADDR/` of a listening tentacle (for discovery).
    tentacle: String,
}

/// The requests to make for a route; None for a route the table does not know.
fn cases(method: &Method, path: &str, f: &Fixture) -> Option<Vec<Case>> {
    use Method as M;
    use Need::{Anyone, Perm, Public};
    let i = f.i;
    let tool_or_none: &'static [u16] = if f.tool { &[201] } else { &[422] };
    let tentacle_or_none: &'static [u16] = if f.tentacle_build { &[201] } else { &[422] };
    let c = match (method.as_str(), path) {
        ("GET", "/api") => vec![case("api root", M::GET, "/api".into(), Public, &[200])],
        ("GET", "/api/openapi.json") => vec![case(
            "openapi",
            M::GET,
            "/api/openapi.json".into(),
            Public,
            &[200],
        )],
        ("GET", "/api/server") => vec![case("server", M::GET, path.into(), Anyone, &[200])],
        // A rotation is real: the server's certificate changes (no tentacle of
        // this test depends on it) and the answer reports each machine.
        ("POST", "/api/server/rotate-certificate") => vec![case(
            "rotate the server's certificate",
            M::POST,
            path.into(),
            Perm(P::AdministerSystem),
            &[200],
        )],
        ("GET", "/api/nodes") => vec![case(
            "nodes",
            M::GET,
            path.into(),
            Perm(P::AdministerSystem),
            &[200],
        )],
        ("GET", "/api/nodes/ping") => {
            vec![case("node ping", M::GET, path.into(), Public, &[200])]
        }
        // Another node's name: draining this one would stop the cases after it.
        ("POST", "/api/nodes/{name}/drain") => vec![case(
            "drain a node",
            M::POST,
            "/api/nodes/no-such-node/drain".into(),
            Perm(P::AdministerSystem),
            &[404],
        )],
        ("POST", "/api/nodes/{name}/undrain") => vec![case(
            "undrain a node",
            M::POST,
            "/api/nodes/no-such-node/undrain".into(),
            Perm(P::AdministerSystem),
            &[404],
        )],
        ("GET", "/api/spaces") => vec![case("spaces", M::GET, path.into(), Anyone, &[200])],
        ("POST", "/api/spaces") => vec![case(
            "create space",
            M::POST,
            path.into(),
            Perm(P::SpaceCreate),
            &[201],
        )
        .json(json!({ "name": format!("S-new-{i}") }))],
        ("GET", "/api/spaces/{space}") => vec![case(
            "a space with a grant",
            M::GET,
            "/api/spaces/Default".into(),
            Anyone,
            &[200],
        )],
        ("DELETE", "/api/spaces/{space}") => vec![case(
            "delete space",
            M::DELETE,
            format!("/api/spaces/S-del-{i}"),
            Perm(P::SpaceDelete),
            &[204],
        )],
        ("GET", "/api/environments") => vec![
            case(
                "environments",
                M::GET,
                path.into(),
                Perm(P::EnvironmentView),
                &[200],
            ),
            case(
                "environments, space named",
                M::GET,
                "/api/spaces/Default/environments".into(),
                Perm(P::EnvironmentView),
                &[200],
            ),
        ],
        ("POST", "/api/environments") => vec![case(
            "create environment",
            M::POST,
            path.into(),
            Perm(P::EnvironmentCreate),
            &[201],
        )
        .json(json!({ "name": format!("E-new-{i}") }))],
        ("DELETE", "/api/environments/{name}") => vec![case(
            "delete environment",
            M::DELETE,
            format!("/api/environments/E-del-{i}"),
            Perm(P::EnvironmentDelete),
            &[204],
        )],
        ("PUT", "/api/environments/{name}") => vec![case(
            "edit environment",
            M::PUT,
            format!("/api/environments/E-edit-{i}"),
            Perm(P::EnvironmentEdit),
            &[200],
        )
        .json(json!({ "description": format!("edited by subject {i}") }))],
        ("PUT", "/api/machines/{name}") => vec![case(
            "edit machine",
            M::PUT,
            "/api/machines/web".into(),
            Perm(P::MachineEdit),
            &[200],
        )
        .json(json!({ "roles": ["web"] }))],
        ("POST", "/api/machines/discover") => vec![case(
            "discover a tentacle",
            M::POST,
            path.into(),
            Perm(P::MachineCreate),
            &[200],
        )
        .json(json!({ "uri": f.tentacle }))],
        ("GET", "/api/worker-pools") => vec![case(
            "worker pools",
            M::GET,
            path.into(),
            Perm(P::MachineView),
            &[200],
        )],
        ("GET", "/api/tenants") => vec![case(
            "tenants",
            M::GET,
            path.into(),
            Perm(P::TenantView),
            &[200],
        )],
        ("GET", "/api/machine-policies") => vec![case(
            "machine policies",
            M::GET,
            path.into(),
            Perm(P::MachinePolicyView),
            &[200],
        )],
        ("POST", "/api/machine-policies") => vec![case(
            "add machine policy",
            M::POST,
            path.into(),
            Perm(P::MachinePolicyEdit),
            &[201],
        )
        .json(json!({ "name": format!("P-new-{i}"), "tentacle_update": "Always" }))],
        ("PUT", "/api/machine-policies/{name}") => vec![case(
            "edit machine policy",
            M::PUT,
            "/api/machine-policies/Default%20Machine%20Policy".into(),
            Perm(P::MachinePolicyEdit),
            &[200],
        )
        .json(json!({ "polling_wait_s": 100 + i }))],
        ("GET", "/api/machines") => vec![case(
            "machines",
            M::GET,
            path.into(),
            Perm(P::MachineView),
            &[200],
        )],
        ("POST", "/api/machines") => vec![case(
            "add machine",
            M::POST,
            path.into(),
            Perm(P::MachineCreate),
            &[201],
        )
        .json(listening(&format!("m-new-{i}"), &["Test"], &["web"]))],
        ("POST", "/api/machines/register") => vec![case(
            "register machine",
            M::POST,
            path.into(),
            Perm(P::MachineCreate),
            &[201],
        )
        .json(listening(&format!("m-reg-{i}"), &["Test"], &["web"]))],
        ("GET", "/api/machines/{name}") => vec![case(
            "machine",
            M::GET,
            "/api/machines/web".into(),
            Perm(P::MachineView),
            &[200],
        )],
        ("DELETE", "/api/machines/{name}") => vec![case(
            "delete machine",
            M::DELETE,
            format!("/api/machines/m-del-{i}"),
            Perm(P::MachineDelete),
            &[204],
        )],
        ("GET", "/api/tasks") => vec![case(
            "tasks",
            M::GET,
            path.into(),
            Perm(P::TaskView),
            &[200],
        )],
        ("POST", "/api/tasks/script") => vec![case(
            "run script",
            M::POST,
            path.into(),
            Perm(P::TaskCreate),
            &[201],
        )
        .json(json!({ "script": "echo hi", "machines": ["web"] }))],
        ("POST", "/api/tasks/health") => vec![case(
            "health check",
            M::POST,
            path.into(),
            Perm(P::TaskCreate),
            &[201],
        )
        .json(json!({ "machines": ["web"] }))],
        ("POST", "/api/tasks/deploy") => vec![case(
            "deploy",
            M::POST,
            path.into(),
            Perm(P::DeploymentCreate),
            tool_or_none,
        )
        .json(json!({ "package_id": "Acme.Web", "version": "1.0.0", "environment": "Test" }))],
        ("POST", "/api/tasks/upgrade") => vec![case(
            "upgrade tool",
            M::POST,
            path.into(),
            Perm(P::TaskCreate),
            tool_or_none,
        )
        .json(json!({ "machines": ["web"] }))],
        ("POST", "/api/tasks/tentacle-upgrade") => vec![case(
            "upgrade tentacle",
            M::POST,
            path.into(),
            Perm(P::MachineEdit),
            tentacle_or_none,
        )
        .json(json!({ "machines": ["web"] }))],
        ("GET", "/api/tasks/{id}") => vec![case(
            "task",
            M::GET,
            format!("/api/tasks/{}", f.task),
            Perm(P::TaskView),
            &[200],
        )],
        ("GET", "/api/tasks/{id}/log") => vec![case(
            "task log",
            M::GET,
            format!("/api/tasks/{}/log", f.task),
            Perm(P::TaskView),
            &[200],
        )],
        ("GET", "/api/tasks/{id}/log/stream") => vec![Case {
            stream: true,
            ..case(
                "task log stream",
                M::GET,
                format!("/api/tasks/{}/log/stream", f.task),
                Perm(P::TaskView),
                &[200],
            )
        }],
        ("POST", "/api/tasks/{id}/cancel") => vec![case(
            "cancel task",
            M::POST,
            format!("/api/tasks/{}/cancel", f.task),
            Perm(P::TaskCancel),
            &[202],
        )],
        ("POST", "/api/tasks/{id}/guidance") => vec![case(
            "guide task (nothing waits: 409 past the gate)",
            M::POST,
            format!("/api/tasks/{}/guidance", f.task),
            Perm(P::InterruptionSubmit),
            &[409],
        )
        .json(json!({ "machine": "web", "action": "retry" }))],
        ("GET", "/api/packages") => vec![case(
            "packages",
            M::GET,
            path.into(),
            Perm(P::FeedView),
            &[200],
        )],
        ("POST", "/api/packages") => vec![Case {
            body: Body::Bytes(common::tar_gz(&[i as u8])),
            ..case(
                "push package",
                M::POST,
                format!("/api/packages?package_id=Acme.New&version=1.0.{i}"),
                Perm(P::BuiltInFeedPush),
                &[201],
            )
        }],
        ("GET", "/api/packages/{id}/{version}") => vec![case(
            "package",
            M::GET,
            "/api/packages/Acme.Web/1.0.0".into(),
            Perm(P::FeedView),
            &[200],
        )],
        ("GET", "/api/packages/{id}/{version}/download") => vec![Case {
            stream: true,
            ..case(
                "download package",
                M::GET,
                "/api/packages/Acme.Web/1.0.0/download".into(),
                Perm(P::FeedView),
                &[200],
            )
        }],
        ("DELETE", "/api/packages/{id}/{version}") => vec![case(
            "delete package",
            M::DELETE,
            format!("/api/packages/Acme.Del/1.0.{i}"),
            Perm(P::BuiltInFeedAdminister),
            &[200],
        )],
        ("POST", "/api/users/login") => vec![case("log in", M::POST, path.into(), Public, &[200])
            .json(json!({ "username": f.username, "password": f.password }))],
        ("POST", "/api/users/logout") => vec![Case {
            key: Some(f.logout_key.clone()),
            ..case("log out", M::POST, path.into(), Anyone, &[204])
        }],
        ("GET", "/api/users/me") => vec![case("me", M::GET, path.into(), Anyone, &[200])],
        ("GET", "/api/users") => vec![case(
            "users",
            M::GET,
            path.into(),
            Perm(P::UserView),
            &[200],
        )],
        ("POST", "/api/users") => vec![case(
            "create user",
            M::POST,
            path.into(),
            Perm(P::UserEdit),
            &[201],
        )
        .json(json!({ "username": format!("u-new-{i}") }))],
        ("GET", "/api/users/{username}") => vec![
            case(
                "own user",
                M::GET,
                format!("/api/users/{}", f.username),
                Anyone,
                &[200],
            ),
            case(
                "another user",
                M::GET,
                "/api/users/admin".into(),
                Perm(P::UserView),
                &[200],
            ),
        ],
        ("POST", "/api/users/{username}/disable") => vec![case(
            "disable user",
            M::POST,
            format!("/api/users/v-{i}/disable"),
            Perm(P::UserEdit),
            &[200],
        )],
        ("POST", "/api/users/{username}/enable") => vec![case(
            "enable user",
            M::POST,
            format!("/api/users/v-{i}/enable"),
            Perm(P::UserEdit),
            &[200],
        )],
        ("PUT", "/api/users/{username}/password") => vec![
            // The same password again: the login case works in any order.
            case(
                "own password",
                M::PUT,
                format!("/api/users/{}/password", f.username),
                Anyone,
                &[204],
            )
            .json(json!({ "password": f.password, "current_password": f.password })),
            case(
                "another's password",
                M::PUT,
                format!("/api/users/v-{i}/password"),
                Perm(P::UserEdit),
                &[204],
            )
            .json(json!({ "password": "another-secret-1" })),
        ],
        ("GET", "/api/api-keys") => vec![
            case("own keys", M::GET, path.into(), Anyone, &[200]),
            case(
                "everyone's keys",
                M::GET,
                "/api/api-keys?all=true".into(),
                Perm(P::ApiKeyEdit),
                &[200],
            ),
        ],
        ("POST", "/api/api-keys") => vec![case("create key", M::POST, path.into(), Anyone, &[201])
            .json(json!({ "purpose": "matrix" }))],
        ("DELETE", "/api/api-keys/{id}") => vec![
            case(
                "revoke own key",
                M::DELETE,
                format!("/api/api-keys/{}", f.own_key),
                Anyone,
                &[204],
            ),
            // Another's key is not even there for the caller: 404, not 403.
            Case {
                denied: 404,
                ..case(
                    "revoke another's key",
                    M::DELETE,
                    format!("/api/api-keys/{}", f.admins_key),
                    Perm(P::ApiKeyEdit),
                    &[204],
                )
            },
        ],
        ("GET", "/api/teams") => vec![case(
            "teams",
            M::GET,
            path.into(),
            Perm(P::TeamView),
            &[200],
        )],
        ("POST", "/api/teams") => vec![case(
            "create team",
            M::POST,
            path.into(),
            Perm(P::TeamEdit),
            &[201],
        )
        .json(json!({ "name": format!("T-new-{i}") }))],
        ("GET", "/api/teams/{name}") => vec![case(
            "team",
            M::GET,
            format!("/api/teams/T-work-{i}"),
            Perm(P::TeamView),
            &[200],
        )],
        ("DELETE", "/api/teams/{name}") => vec![case(
            "delete team",
            M::DELETE,
            format!("/api/teams/T-del-{i}"),
            Perm(P::TeamEdit),
            &[204],
        )],
        ("POST", "/api/teams/{name}/members") => vec![case(
            "add member",
            M::POST,
            format!("/api/teams/T-work-{i}/members"),
            Perm(P::TeamEdit),
            &[200],
        )
        .json(json!({ "username": format!("v-{i}") }))],
        ("DELETE", "/api/teams/{name}/members/{username}") => vec![case(
            "remove member",
            M::DELETE,
            format!("/api/teams/T-memb-{i}/members/v-{i}"),
            Perm(P::TeamEdit),
            &[200],
        )],
        ("POST", "/api/teams/{name}/grants") => vec![case(
            "grant role",
            M::POST,
            format!("/api/teams/T-work-{i}/grants"),
            Perm(P::TeamEdit),
            &[201],
        )
        .json(json!({ "role": ENVIRONMENT_VIEWER }))],
        ("DELETE", "/api/teams/{name}/grants/{id}") => vec![case(
            "revoke grant",
            M::DELETE,
            format!("/api/teams/T-grant-{i}/grants/{}", f.grant),
            Perm(P::TeamEdit),
            &[200],
        )],
        ("GET", "/api/roles") => vec![case(
            "roles",
            M::GET,
            path.into(),
            Perm(P::UserRoleView),
            &[200],
        )],
        ("POST", "/api/roles") => vec![case(
            "create role",
            M::POST,
            path.into(),
            Perm(P::UserRoleEdit),
            &[201],
        )
        .json(json!({ "name": format!("R-{i}"), "permissions": ["EventView"] }))],
        ("GET", "/api/roles/{name}") => vec![case(
            "role",
            M::GET,
            "/api/roles/Space%20manager".into(),
            Perm(P::UserRoleView),
            &[200],
        )],
        ("GET", "/api/audit") => vec![case(
            "audit log",
            M::GET,
            path.into(),
            Perm(P::EventView),
            &[200],
        )],
        _ => return None,
    };
    Some(c)
}

/// Makes what subject `i` needs (as the admin); returns its fixture and client.
async fn prepare(
    server: &Server,
    i: usize,
    s: &Subject,
    task: &str,
    (tool, tentacle_build): (bool, bool),
    tentacle: &str,
) -> (Fixture, Api) {
    let admin = &server.admin;
    let username = format!("subject-{i}");
    let password = format!("password-of-{i}");
    server.create_user(&username, Some(&password)).await;
    let space = if s.everywhere { None } else { Some("Default") };
    server
        .team_with_role(space, &format!("Team-{i}"), &[&username], s.role, &[])
        .await;
    // Targets of the subject's destructive requests.
    admin
        .post("/api/spaces", json!({ "name": format!("S-del-{i}") }))
        .await
        .expect(201);
    server.environment(None, &format!("E-del-{i}")).await;
    server.environment(None, &format!("E-edit-{i}")).await;
    server
        .machine(None, &format!("m-del-{i}"), &["Test"], &[])
        .await;
    server.package(None, "Acme.Del", &format!("1.0.{i}")).await;
    server.create_user(&format!("v-{i}"), None).await;
    for team in ["T-work", "T-del", "T-memb", "T-grant"] {
        admin
            .post("/api/teams", json!({ "name": format!("{team}-{i}") }))
            .await
            .expect(201);
    }
    admin
        .post(
            &format!("/api/teams/T-memb-{i}/members"),
            json!({ "username": format!("v-{i}") }),
        )
        .await
        .expect(200);
    let grant = admin
        .post(
            &format!("/api/teams/T-grant-{i}/grants"),
            json!({ "role": ENVIRONMENT_VIEWER }),
        )
        .await
        .expect(201)["id"]
        .as_i64()
        .unwrap();
    let (_, admins_key) = admin.new_key(&format!("for subject {i} to revoke")).await;
    let api = server.login(&username, &password).await;
    let (_, own_key) = api.new_key("to revoke").await;
    let (logout_key, _) = api.new_key("to log out with").await;
    (
        Fixture {
            i,
            username,
            password,
            task: task.to_string(),
            grant,
            admins_key,
            own_key,
            logout_key,
            tool,
            tentacle: tentacle.to_string(),
            tentacle_build,
        },
        api,
    )
}

#[tokio::test]
async fn permission_matrix_of_every_built_in_role() {
    let server = Server::start().await;
    let admin = &server.admin;

    // The test's own tables cover every permission, each once.
    let mut classified: Vec<P> = SYSTEM.iter().chain(SPACE).copied().collect();
    classified.sort();
    let mut all = P::ALL.to_vec();
    all.sort();
    assert_eq!(
        classified, all,
        "a permission was added or removed: classify it in SYSTEM or SPACE"
    );

    // The route table and this test's list agree, in both directions.
    let table: BTreeSet<(String, String)> = octo_server_core::api::route_table()
        .into_iter()
        .map(|(m, p, _)| (m.to_string(), p.to_string()))
        .collect();
    let covered: BTreeSet<(String, String)> = COVERED
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let missing: Vec<_> = table.difference(&covered).collect();
    assert!(
        missing.is_empty(),
        "routes without a row in the test's expectation table: {missing:?}"
    );
    let stale: Vec<_> = covered.difference(&table).collect();
    assert!(
        stale.is_empty(),
        "rows for routes that no longer exist: {stale:?}"
    );

    let mut failures = Vec::new();
    // The built-in roles the server shows carry exactly the expected permissions
    // (this also covers the system permissions a grant in one space cannot use).
    for role in [
        SYSTEM_ADMINISTRATOR,
        SPACE_MANAGER,
        ENVIRONMENT_MANAGER,
        ENVIRONMENT_VIEWER,
        PROJECT_DEPLOYER,
        PACKAGE_PUBLISHER,
    ] {
        let shown = admin.get(&format!("/api/roles/{role}")).await.expect(200);
        let shown: BTreeSet<P> = serde_json::from_value(shown["permissions"].clone()).unwrap();
        let expected = role_permissions(role);
        if shown != expected {
            failures.push(format!(
                "GET /api/roles/{role}: permissions {shown:?}, expected {expected:?}"
            ));
        }
    }

    // Shared fixtures: an environment, a machine nothing answers for, a
    // package, and a task.
    server.environment(None, "Test").await;
    server.machine(None, "web", &["Test"], &["web"]).await;
    server.package(None, "Acme.Web", "1.0.0").await;
    let task = admin
        .script(None, json!({ "script": "echo hi", "machines": ["web"] }))
        .await
        .expect(201)["task"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let info = admin.get("/api/server").await.expect(200);
    let tool = !info["tool_version"].is_null();
    let tentacle_build = !info["tentacle_version"].is_null();
    // A listening tentacle to discover.
    let identity = octo_testkit::identity("discovered");
    let thumbprint = identity.thumbprint().to_string();
    let (addr, _tentacle, _guard) = octo_testkit::listening_tentacle(identity, &[]).await;
    let tentacle = format!("https://{addr}/");
    let found = admin
        .post("/api/machines/discover", json!({ "uri": tentacle }))
        .await
        .expect(200);
    assert_eq!(found["thumbprint"], thumbprint.as_str());

    let mut checked = 0;
    for (i, subject) in SUBJECTS.iter().enumerate() {
        let (fixture, api) = prepare(
            &server,
            i,
            subject,
            &task,
            (tool, tentacle_build),
            &tentacle,
        )
        .await;
        let effective = subject.effective();
        let label = subject.label();

        // What the server says the subject holds in Default is the rule applied
        // to the table.
        let me = api.get("/api/users/me").await.expect(200);
        let held: BTreeSet<P> = serde_json::from_value(me["permissions"].clone()).unwrap();
        if held != effective {
            failures.push(format!(
                "{label}: GET /api/users/me permissions {held:?}, expected {effective:?}"
            ));
        }

        for (method, path, _) in octo_server_core::api::route_table() {
            let Some(cases) = cases(&method, path, &fixture) else {
                panic!("{method} {path} has no row in the test's expectation table");
            };
            for c in cases {
                let may = match c.needs {
                    Need::Public | Need::Anyone => true,
                    Need::Perm(p) => effective.contains(&p),
                };
                let caller = match &c.key {
                    Some(k) => api.with_key(k),
                    None => api.clone(),
                };
                let reply = if c.stream {
                    caller.head_only(c.method.clone(), &c.path).await
                } else {
                    caller.call(c.method.clone(), &c.path, c.body.clone()).await
                };
                checked += 1;
                let ok = if may {
                    c.allowed.contains(&reply.status)
                } else {
                    reply.status == c.denied
                };
                if !ok {
                    let expected = if may {
                        format!("{:?} (allowed)", c.allowed)
                    } else {
                        format!("{} (denied)", c.denied)
                    };
                    failures.push(format!(
                        "{label}: {} {} ({}, needs {:?}): got {}, expected {expected}: {}",
                        c.method, c.path, c.what, c.needs, reply.status, reply.body
                    ));
                }
                // A refusal names the permission it needs.
                if !may && reply.status == 403 {
                    if let Need::Perm(p) = c.needs {
                        let msg = reply.error();
                        if !msg.contains(p.name()) {
                            failures.push(format!(
                                "{label}: {} {}: the 403 does not name {p}: {msg}",
                                c.method, c.path
                            ));
                        }
                    }
                }
            }
        }
    }

    // Without credentials, every route but the public ones answers 401.
    let anonymous = server.anonymous();
    let fixture = Fixture {
        i: 99,
        username: "nobody".into(),
        password: "nobody-password".into(),
        task: task.clone(),
        grant: 1,
        admins_key: 1,
        own_key: 1,
        logout_key: "API-NOTAKEY".into(),
        tool,
        tentacle_build,
        tentacle: tentacle.clone(),
    };
    for (method, path, _) in octo_server_core::api::route_table() {
        for c in cases(&method, path, &fixture).unwrap() {
            if c.what == "log in" {
                continue; // Public, and it would count a failed login.
            }
            let reply = if c.stream {
                anonymous.head_only(c.method.clone(), &c.path).await
            } else {
                anonymous
                    .call(c.method.clone(), &c.path, c.body.clone())
                    .await
            };
            let expected = if matches!(c.needs, Need::Public) {
                200
            } else {
                401
            };
            if reply.status != expected {
                failures.push(format!(
                    "no key: {} {}: got {}, expected {expected}: {}",
                    c.method, c.path, reply.status, reply.body
                ));
            }
        }
    }

    assert!(
        failures.is_empty(),
        "{} of {checked} checks failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------
// Environment scopes.

#[tokio::test]
async fn environment_scoped_deployer_acts_and_sees_only_its_environment() {
    let server = Server::start().await;
    let admin = &server.admin;
    server.environment(None, "Test").await;
    server.environment(None, "Production").await;
    server.machine(None, "test-1", &["Test"], &["web"]).await;
    server
        .machine(None, "prod-1", &["Production"], &["web"])
        .await;
    let prod_task = admin
        .script(
            None,
            json!({ "script": "echo prod", "machines": ["prod-1"] }),
        )
        .await
        .expect(201)["task"]["id"]
        .as_str()
        .unwrap()
        .to_string();

    // A Project deployer narrowed to Test, and nothing else.
    server.create_user("dora", Some("dora-password")).await;
    server
        .team_with_role(
            Some("Default"),
            "Test deployers",
            &["dora"],
            PROJECT_DEPLOYER,
            &["Test"],
        )
        .await;
    let dora = server.login("dora", "dora-password").await;

    // A script on a Test machine runs (the machine cannot be reached; that is fine).
    let v = dora
        .script(
            None,
            json!({ "script": "echo test", "machines": ["test-1"] }),
        )
        .await
        .expect(201);
    let test_task = v["task"]["id"].as_str().unwrap().to_string();
    assert_eq!(v["task"]["environments"], json!(["Test"]));

    // A Production machine: out of her sight, so it is not there for her (404,
    // see the report: the issue expected 403), and nothing is queued.
    let before = server.task_ids(None).await;
    let r = dora
        .script(
            None,
            json!({ "script": "echo prod", "machines": ["prod-1"] }),
        )
        .await;
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(!r.error().contains("Production"), "{}", r.body);
    // Selected by role, the task includes the Production machine: refused as a
    // whole (403), nothing queued, and the machine she cannot see is counted,
    // not named.
    let r = dora
        .script(None, json!({ "script": "echo all", "role": "web" }))
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let msg = r.error();
    assert!(msg.contains("TaskCreate"), "{msg}");
    assert!(msg.contains("1 machine(s) you cannot see"), "{msg}");
    assert!(!msg.contains("prod-1"), "an unseen machine is named: {msg}");
    assert!(msg.contains("Nothing was started"), "{msg}");
    // Health checks and upgrades are refused the same way.
    let r = dora
        .post("/api/tasks/health", json!({ "environment": "Production" }))
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(
        server.task_ids(None).await,
        before,
        "a refused task was queued"
    );

    // She lists only Test machines and Test tasks.
    let machines = dora.get("/api/machines").await.expect(200);
    let names: Vec<&str> = machines
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["test-1"]);
    assert_eq!(dora.get("/api/machines/prod-1").await.status, 404);
    let tasks = dora.get("/api/tasks").await.expect(200);
    let ids: Vec<&str> = tasks
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [test_task.as_str()]);
    let envs = dora.get("/api/environments").await.expect(200);
    assert_eq!(envs.as_array().unwrap().len(), 1, "{envs}");
    assert_eq!(envs[0]["name"], "Test");

    // A Production task is not there for her, whatever she asks of it.
    for path in [
        format!("/api/tasks/{prod_task}"),
        format!("/api/tasks/{prod_task}/log"),
        format!("/api/tasks/{prod_task}/log/stream"),
    ] {
        let r = dora.head_only(Method::GET, &path).await;
        assert_eq!(r.status, 404, "GET {path}");
    }
    let r = dora
        .post(&format!("/api/tasks/{prod_task}/cancel"), json!({}))
        .await;
    assert_eq!(r.status, 404, "{}", r.body);
    let r = dora
        .post(
            &format!("/api/tasks/{prod_task}/guidance"),
            json!({ "machine": "prod-1", "action": "fail" }),
        )
        .await;
    assert_eq!(r.status, 404, "{}", r.body);
    // ... and the same answer as a task that does not exist.
    let none = dora.get("/api/tasks/ServerTasks-999999").await;
    assert_eq!(none.status, 404);

    // Her own task she may cancel.
    dora.post(&format!("/api/tasks/{test_task}/cancel"), json!({}))
        .await
        .expect(202);
    // A new environment is outside her grant: deployers cannot create one anyway.
    assert_eq!(
        dora.post("/api/environments", json!({ "name": "Dev" }))
            .await
            .status,
        403
    );
}

#[tokio::test]
async fn scoped_deployer_who_sees_production_is_refused_naming_the_machine() {
    let server = Server::start().await;
    server.environment(None, "Test").await;
    server.environment(None, "Production").await;
    server.machine(None, "test-1", &["Test"], &["web"]).await;
    server
        .machine(None, "prod-1", &["Production"], &["web"])
        .await;

    // Deployer in Test, viewer everywhere in Default: she sees Production but
    // may not run anything there.
    server.create_user("vera", Some("vera-password")).await;
    server
        .team_with_role(
            Some("Default"),
            "Test deployers",
            &["vera"],
            PROJECT_DEPLOYER,
            &["Test"],
        )
        .await;
    server
        .team_with_role(
            Some("Default"),
            "Viewers",
            &["vera"],
            ENVIRONMENT_VIEWER,
            &[],
        )
        .await;
    let vera = server.login("vera", "vera-password").await;
    let before = server.task_ids(None).await;

    let r = vera
        .script(
            None,
            json!({ "script": "echo prod", "machines": ["prod-1"] }),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.error().contains("prod-1 (Production)"), "{}", r.body);

    // By role: refused as a whole, naming the Production machine.
    let r = vera
        .script(None, json!({ "script": "echo all", "role": "web" }))
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    let msg = r.error();
    assert!(msg.contains("prod-1 (Production)"), "{msg}");
    assert!(!msg.contains("test-1"), "{msg}");
    // And by name, one Test machine with one Production machine.
    let r = vera
        .script(
            None,
            json!({ "script": "echo both", "machines": ["test-1", "prod-1"] }),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(
        server.task_ids(None).await,
        before,
        "a refused task was queued"
    );

    // She sees both machines, and may run on the Test one.
    assert_eq!(
        vera.get("/api/machines")
            .await
            .expect(200)
            .as_array()
            .unwrap()
            .len(),
        2
    );
    vera.script(
        None,
        json!({ "script": "echo test", "machines": ["test-1"] }),
    )
    .await
    .expect(201);
}
