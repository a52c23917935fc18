//! Spaces, users, teams, roles, permissions and the audit log: the API's
//! security model (see the server's `authz` module for how it is enforced).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A space: a partition of environments, machines, tenants, policies,
/// packages, tasks, teams and their audit events. `Default` exists from the
/// first start; requests without a space in their path use it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Space {
    pub id: i64,
    pub name: String,
    pub description: String,
    /// The space of requests that name none.
    pub is_default: bool,
    pub created_at: i64,
}

/// `POST /api/spaces`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSpace {
    #[schema(value_type = crate::validate::Name)]
    pub name: String,
    #[serde(default)]
    #[schema(value_type = crate::validate::Text)]
    pub description: String,
}

/// What a person may do. Names follow the original product's. System
/// permissions concern the whole server (users, spaces, roles); the others
/// apply in a space, and may be narrowed to environments and tenants by the
/// grant that gives them.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
pub enum Permission {
    // System.
    /// Server administration: recovery, nodes, settings; revoke anyone's API keys.
    AdministerSystem,
    /// See every space (without it, a person sees the spaces they hold a grant in).
    SpaceView,
    SpaceCreate,
    SpaceEdit,
    SpaceDelete,
    /// See users.
    UserView,
    /// Create, disable and enable users, set others' passwords.
    UserEdit,
    /// See roles and permissions.
    UserRoleView,
    /// Create custom roles.
    UserRoleEdit,
    /// Revoke other people's API keys.
    ApiKeyEdit,
    // Space.
    /// See teams and their grants.
    TeamView,
    /// Create and delete teams, change their members and grants.
    TeamEdit,
    /// See the audit log.
    EventView,
    EnvironmentView,
    EnvironmentCreate,
    EnvironmentEdit,
    EnvironmentDelete,
    MachineView,
    MachineCreate,
    MachineEdit,
    MachineDelete,
    MachinePolicyView,
    MachinePolicyEdit,
    TenantView,
    TenantEdit,
    /// See tasks and their logs.
    TaskView,
    /// Start tasks: scripts, health checks, deployment tool upgrades.
    TaskCreate,
    TaskCancel,
    /// Decide for a step waiting under guided failure (retry, ignore, fail).
    InterruptionSubmit,
    /// Deploy packages.
    DeploymentCreate,
    /// See the variables of deployments and scripts (sensitive values are
    /// never shown to anyone).
    VariableView,
    /// See the feed's packages.
    FeedView,
    /// Push packages to the built-in feed.
    BuiltInFeedPush,
    /// Replace and delete packages of the built-in feed.
    BuiltInFeedAdminister,
}

impl Permission {
    /// Every permission, system ones first.
    pub const ALL: [Permission; 34] = [
        Permission::AdministerSystem,
        Permission::SpaceView,
        Permission::SpaceCreate,
        Permission::SpaceEdit,
        Permission::SpaceDelete,
        Permission::UserView,
        Permission::UserEdit,
        Permission::UserRoleView,
        Permission::UserRoleEdit,
        Permission::ApiKeyEdit,
        Permission::TeamView,
        Permission::TeamEdit,
        Permission::EventView,
        Permission::EnvironmentView,
        Permission::EnvironmentCreate,
        Permission::EnvironmentEdit,
        Permission::EnvironmentDelete,
        Permission::MachineView,
        Permission::MachineCreate,
        Permission::MachineEdit,
        Permission::MachineDelete,
        Permission::MachinePolicyView,
        Permission::MachinePolicyEdit,
        Permission::TenantView,
        Permission::TenantEdit,
        Permission::TaskView,
        Permission::TaskCreate,
        Permission::TaskCancel,
        Permission::InterruptionSubmit,
        Permission::DeploymentCreate,
        Permission::VariableView,
        Permission::FeedView,
        Permission::BuiltInFeedPush,
        Permission::BuiltInFeedAdminister,
    ];

    /// Whether it concerns the whole server rather than one space.
    pub fn is_system(self) -> bool {
        matches!(
            self,
            Permission::AdministerSystem
                | Permission::SpaceView
                | Permission::SpaceCreate
                | Permission::SpaceEdit
                | Permission::SpaceDelete
                | Permission::UserView
                | Permission::UserEdit
                | Permission::UserRoleView
                | Permission::UserRoleEdit
                | Permission::ApiKeyEdit
        )
    }

    /// Its name, as the API and the command line spell it (e.g. "MachineView").
    pub fn name(self) -> &'static str {
        match self {
            Permission::AdministerSystem => "AdministerSystem",
            Permission::SpaceView => "SpaceView",
            Permission::SpaceCreate => "SpaceCreate",
            Permission::SpaceEdit => "SpaceEdit",
            Permission::SpaceDelete => "SpaceDelete",
            Permission::UserView => "UserView",
            Permission::UserEdit => "UserEdit",
            Permission::UserRoleView => "UserRoleView",
            Permission::UserRoleEdit => "UserRoleEdit",
            Permission::ApiKeyEdit => "ApiKeyEdit",
            Permission::TeamView => "TeamView",
            Permission::TeamEdit => "TeamEdit",
            Permission::EventView => "EventView",
            Permission::EnvironmentView => "EnvironmentView",
            Permission::EnvironmentCreate => "EnvironmentCreate",
            Permission::EnvironmentEdit => "EnvironmentEdit",
            Permission::EnvironmentDelete => "EnvironmentDelete",
            Permission::MachineView => "MachineView",
            Permission::MachineCreate => "MachineCreate",
            Permission::MachineEdit => "MachineEdit",
            Permission::MachineDelete => "MachineDelete",
            Permission::MachinePolicyView => "MachinePolicyView",
            Permission::MachinePolicyEdit => "MachinePolicyEdit",
            Permission::TenantView => "TenantView",
            Permission::TenantEdit => "TenantEdit",
            Permission::TaskView => "TaskView",
            Permission::TaskCreate => "TaskCreate",
            Permission::TaskCancel => "TaskCancel",
            Permission::InterruptionSubmit => "InterruptionSubmit",
            Permission::DeploymentCreate => "DeploymentCreate",
            Permission::VariableView => "VariableView",
            Permission::FeedView => "FeedView",
            Permission::BuiltInFeedPush => "BuiltInFeedPush",
            Permission::BuiltInFeedAdminister => "BuiltInFeedAdminister",
        }
    }

    /// The permission of this name (ignoring case), if any.
    pub fn parse(name: &str) -> Option<Permission> {
        Permission::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(name.trim()))
    }
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A user role: a named set of permissions. Built-in roles cannot change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Role {
    pub name: String,
    pub description: String,
    pub built_in: bool,
    pub permissions: Vec<Permission>,
}

/// `POST /api/roles`: a custom role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewRole {
    #[schema(value_type = crate::validate::Name)]
    pub name: String,
    #[serde(default)]
    #[schema(value_type = crate::validate::Text)]
    pub description: String,
    pub permissions: Vec<Permission>,
}

/// A role given to a team, in one space or in all, optionally narrowed to
/// environments and tenants (empty: all of them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Grant {
    pub id: i64,
    pub role: String,
    /// None: every space (only a team outside any space can hold such a grant).
    pub space_id: Option<i64>,
    pub space: Option<String>,
    pub environments: Vec<String>,
    pub tenants: Vec<String>,
}

/// `POST /api/teams/{name}/grants`. The grant applies in the request's space,
/// or in every space with `all_spaces` (teams outside any space only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewGrant {
    #[schema(value_type = crate::validate::Name)]
    pub role: String,
    #[serde(default)]
    #[schema(value_type = Vec<crate::validate::Name>)]
    pub environments: Vec<String>,
    #[serde(default)]
    #[schema(value_type = Vec<crate::validate::Name>)]
    pub tenants: Vec<String>,
    #[serde(default)]
    pub all_spaces: bool,
}

/// A team: users and the roles they hold together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Team {
    pub id: i64,
    pub name: String,
    pub description: String,
    /// None: a team outside any space (its grants may cover every space).
    pub space_id: Option<i64>,
    pub space: Option<String>,
    /// Built-in teams ("Octopus Administrators") cannot be deleted.
    pub built_in: bool,
    /// User names.
    pub members: Vec<String>,
    pub grants: Vec<Grant>,
}

/// `POST /api/teams`: a team in the request's space, or outside any space with
/// `system`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewTeam {
    #[schema(value_type = crate::validate::Name)]
    pub name: String,
    #[serde(default)]
    #[schema(value_type = crate::validate::Text)]
    pub description: String,
    #[serde(default)]
    pub system: bool,
}

/// `POST /api/teams/{name}/members`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewMember {
    #[schema(value_type = crate::validate::Name)]
    pub username: String,
}

/// `PUT /api/users/{username}/password`. Changing one's own password needs
/// the current one (when there is one); a holder of `UserEdit` may set
/// another's without it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetPassword {
    pub password: String,
    #[serde(default)]
    pub current_password: Option<String>,
}

/// What the caller may do: `GET /api/users/me`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct WhoAmI {
    pub user: crate::model::User,
    /// The grants of every team the caller is in.
    pub grants: Vec<Grant>,
    /// Permissions in the request's space (any environment).
    pub permissions: Vec<Permission>,
}

/// One change, as the audit log keeps it. Secrets never appear here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditEvent {
    pub id: i64,
    /// Unix milliseconds.
    pub at: i64,
    pub user_id: Option<i64>,
    /// Who did it ("system" for the server itself).
    pub username: String,
    /// The caller's address ("local" for commands run on the server's machine).
    pub source: String,
    /// "created", "changed", "deleted", "revoked", "started", "canceled", ...
    pub action: String,
    /// "machine", "environment", "user", "team", "api key", "task", ...
    pub kind: String,
    /// Which one: a name or an id.
    pub object: String,
    /// None: a change outside any space (users, roles, spaces).
    pub space_id: Option<i64>,
    pub space: Option<String>,
    /// More about the change, in words.
    pub details: String,
}
