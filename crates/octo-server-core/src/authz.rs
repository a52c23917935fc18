//! Authorization: who may do what, where. The one layer every API route and
//! portal page goes through.
//!
//! - Every route declares its [`Access`] in the route table (`api::route_table`);
//!   the guard (`api::guard`) authenticates the caller, resolves the request's
//!   space and checks the route's access before the handler runs. A route
//!   without an entry is refused (fail closed).
//! - Handlers then check the thing they act on with [`Caller::require_on`] /
//!   [`Caller::sees`]: a grant narrowed to environments or tenants covers a
//!   machine or task only when it is in them.
//!
//! Rules:
//! - A caller holds the permissions of the roles granted to the teams they are
//!   in. A grant is in one space or in every space.
//! - System permissions (users, spaces, roles, API keys of others, server
//!   administration) count only from grants in every space, so a role given in
//!   one space can never reach beyond it.
//! - Space permissions count in the grant's space (or every space), for the
//!   environments and tenants it is narrowed to. To see a machine or task, one
//!   of its environments must be in scope; to act on it, all of them.
//! - Something of another space, or out of the caller's sight, answers 404 as if
//!   it did not exist; something in sight that the caller may not change
//!   answers 403 naming the permission.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use octo_api_types::{ApiKey, Grant, Permission, Role, Space, User};

use crate::api::ApiError;

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Nothing: no credentials needed.
    Public,
    /// A valid API key or session (the handler limits the caller to their own things).
    Authenticated,
    /// A system permission (from a grant in every space).
    System(Permission),
    /// A permission in the request's space, for some environments at least (the
    /// handler checks the thing acted on).
    Space(Permission),
}

impl Access {
    /// In words, for the OpenAPI document.
    pub fn describe(self) -> String {
        match self {
            Access::Public => "no credentials needed".into(),
            Access::Authenticated => "any signed-in caller".into(),
            Access::System(p) => format!("permission {p} (in every space)"),
            Access::Space(p) => format!("permission {p} in the space"),
        }
    }

    /// The permission it names, if any.
    pub fn permission(self) -> Option<Permission> {
        match self {
            Access::System(p) | Access::Space(p) => Some(p),
            _ => None,
        }
    }
}

/// A built-in role.
#[derive(Debug)]
pub struct BuiltInRole {
    pub name: &'static str,
    pub description: &'static str,
    pub permissions: &'static [Permission],
}

use Permission as P;

/// Every space permission.
const SPACE_PERMISSIONS: &[Permission] = &[
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

/// The built-in roles (their permissions follow the original product's where
/// it has the same things).
pub const BUILT_IN_ROLES: &[BuiltInRole] = &[
    BuiltInRole {
        name: octo_store::SYSTEM_ADMINISTRATOR,
        description: "Everything, in every space it is granted in; the system permissions too when granted in every space",
        permissions: &Permission::ALL,
    },
    BuiltInRole {
        name: "Space manager",
        description: "Everything inside a space: its environments, machines, tasks, packages, teams and audit log",
        permissions: SPACE_MANAGER,
    },
    BuiltInRole {
        name: "Environment manager",
        description: "View and edit environments and their machines, run health checks and scripts, see tasks",
        permissions: &[
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
    },
    BuiltInRole {
        name: "Environment viewer",
        description: "View environments, machines and tasks",
        permissions: &[
            P::EnvironmentView,
            P::MachineView,
            P::MachinePolicyView,
            P::TenantView,
            P::TaskView,
            P::TeamView,
        ],
    },
    BuiltInRole {
        name: "Project deployer",
        description: "Deploy, run scripts and health checks, cancel and guide tasks, see task logs",
        permissions: &[
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
    },
    BuiltInRole {
        name: "Package publisher",
        description: "Push, replace and delete packages in the built-in feed",
        permissions: &[P::FeedView, P::BuiltInFeedPush, P::BuiltInFeedAdminister],
    },
];

/// Space manager: every space permission, and seeing users and roles.
const SPACE_MANAGER: &[Permission] = &[
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
];

/// The built-in roles as the API shows them.
pub fn built_in_roles() -> Vec<Role> {
    BUILT_IN_ROLES
        .iter()
        .map(|r| Role {
            name: r.name.into(),
            description: r.description.into(),
            built_in: true,
            permissions: r.permissions.to_vec(),
        })
        .collect()
}

/// The built-in role of this name (ignoring case).
pub fn built_in_role(name: &str) -> Option<&'static BuiltInRole> {
    BUILT_IN_ROLES
        .iter()
        .find(|r| r.name.eq_ignore_ascii_case(name.trim()))
}

/// Whether every space permission is in the list (a test helper for the tables above).
pub fn is_space_permission(p: Permission) -> bool {
    SPACE_PERMISSIONS.contains(&p)
}

/// How much of a thing's environments (or tenants) a grant must cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cover {
    /// One of them (to see it).
    Any,
    /// All of them (to act on it).
    All,
}

/// One grant, resolved: its permissions and where they apply.
#[derive(Debug, Clone)]
struct Resolved {
    role: String,
    permissions: BTreeSet<Permission>,
    space_id: Option<i64>,
    /// Lower-case names; empty: every environment.
    environments: Vec<String>,
    /// Lower-case names; empty: every tenant (and untenanted things).
    tenants: Vec<String>,
}

impl Resolved {
    fn in_space(&self, space_id: i64) -> bool {
        self.space_id.is_none_or(|s| s == space_id)
    }

    fn unnarrowed(&self) -> bool {
        self.environments.is_empty() && self.tenants.is_empty()
    }

    fn covers(&self, environments: &[String], tenants: &[String], cover: Cover) -> bool {
        fn check(scope: &[String], values: &[String], cover: Cover) -> bool {
            if scope.is_empty() {
                return true;
            }
            let inside = |v: &String| scope.contains(&v.to_lowercase());
            match cover {
                Cover::Any => values.iter().any(inside),
                Cover::All => !values.is_empty() && values.iter().all(inside),
            }
        }
        check(&self.environments, environments, cover) && check(&self.tenants, tenants, cover)
    }
}

/// A caller's grants, resolved.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    items: Vec<Resolved>,
}

impl Grants {
    /// Resolves grants with the custom roles (unknown role names grant nothing).
    pub fn resolve(grants: &[Grant], custom_roles: &[Role]) -> Grants {
        let items = grants
            .iter()
            .filter_map(|g| {
                let permissions: BTreeSet<Permission> = match built_in_role(&g.role) {
                    Some(r) => r.permissions.iter().copied().collect(),
                    None => custom_roles
                        .iter()
                        .find(|r| r.name.eq_ignore_ascii_case(&g.role))?
                        .permissions
                        .iter()
                        .copied()
                        .collect(),
                };
                Some(Resolved {
                    role: g.role.clone(),
                    permissions,
                    space_id: g.space_id,
                    environments: g.environments.iter().map(|e| e.to_lowercase()).collect(),
                    tenants: g.tenants.iter().map(|t| t.to_lowercase()).collect(),
                })
            })
            .collect();
        Grants { items }
    }

    /// A system permission: from an unnarrowed grant in every space.
    pub fn has_system(&self, p: Permission) -> bool {
        self.items
            .iter()
            .any(|g| g.space_id.is_none() && g.unnarrowed() && g.permissions.contains(&p))
    }

    /// The permission in the space, for some environments at least.
    pub fn has_in_space(&self, p: Permission, space_id: i64) -> bool {
        if p.is_system() {
            return self.has_system(p);
        }
        self.items
            .iter()
            .any(|g| g.in_space(space_id) && g.permissions.contains(&p))
    }

    /// The permission in the whole space (every environment and tenant).
    pub fn has_throughout(&self, p: Permission, space_id: i64) -> bool {
        self.items
            .iter()
            .any(|g| g.in_space(space_id) && g.unnarrowed() && g.permissions.contains(&p))
    }

    /// The permission on a thing in the space that is in `environments` and of `tenants`.
    pub fn covers(
        &self,
        p: Permission,
        space_id: i64,
        environments: &[String],
        tenants: &[String],
        cover: Cover,
    ) -> bool {
        self.items.iter().any(|g| {
            g.in_space(space_id)
                && g.permissions.contains(&p)
                && g.covers(environments, tenants, cover)
        })
    }

    /// The environments in which the caller holds `p` in the space: None when
    /// some grant holds it unnarrowed by environment (then all of them).
    pub fn environments_with(&self, p: Permission, space_id: i64) -> Option<Vec<String>> {
        let relevant: Vec<&Resolved> = self
            .items
            .iter()
            .filter(|g| g.in_space(space_id) && g.permissions.contains(&p))
            .collect();
        if relevant.iter().any(|g| g.environments.is_empty()) {
            return None;
        }
        let mut envs: Vec<String> = relevant
            .iter()
            .flat_map(|g| g.environments.iter().cloned())
            .collect();
        envs.sort();
        envs.dedup();
        Some(envs)
    }

    /// Whether any grant reaches the space.
    pub fn reaches(&self, space_id: i64) -> bool {
        self.items.iter().any(|g| g.in_space(space_id)) || self.has_system(P::SpaceView)
    }

    /// Every permission held in the space (for some environments at least).
    pub fn permissions_in(&self, space_id: i64) -> Vec<Permission> {
        Permission::ALL
            .into_iter()
            .filter(|p| self.has_in_space(*p, space_id))
            .collect()
    }

    /// The roles held, for messages ("Environment viewer in Default").
    fn roles(&self) -> Vec<String> {
        let mut roles: Vec<String> = self.items.iter().map(|g| g.role.clone()).collect();
        roles.sort();
        roles.dedup();
        roles
    }
}

/// The caller of a request, once authenticated.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: User,
    /// The key or session the request came with.
    pub key: ApiKey,
    pub grants: Arc<Grants>,
    /// The caller's address, for the audit log.
    pub source: String,
}

/// The space of a request (from its path, or the default space).
#[derive(Debug, Clone)]
pub struct RequestSpace(pub Space);

impl Caller {
    fn denied(&self, p: Permission, where_: &str) -> ApiError {
        let roles = self.grants.roles();
        let held = if roles.is_empty() {
            "you hold no role".to_string()
        } else {
            format!("your roles: {}", roles.join(", "))
        };
        ApiError::forbidden(format!(
            "permission {p} is needed {where_} ({held}); ask an administrator for a role that has it"
        ))
    }

    /// Checks a route's access in `space`.
    pub fn require(&self, access: Access, space: &Space) -> Result<(), ApiError> {
        match access {
            Access::Public | Access::Authenticated => Ok(()),
            Access::System(p) if self.grants.has_system(p) => Ok(()),
            Access::System(p) => Err(self.denied(p, "in every space")),
            Access::Space(p) if self.grants.has_in_space(p, space.id) => Ok(()),
            Access::Space(p) => Err(self.denied(p, &format!("in space '{}'", space.name))),
        }
    }

    /// A system permission.
    pub fn require_system(&self, p: Permission) -> Result<(), ApiError> {
        if self.grants.has_system(p) {
            Ok(())
        } else {
            Err(self.denied(p, "in every space"))
        }
    }

    /// The permission on the whole space (e.g. to create something new in it).
    pub fn require_throughout(&self, p: Permission, space: &Space) -> Result<(), ApiError> {
        if self.grants.has_throughout(p, space.id) {
            Ok(())
        } else {
            Err(self.denied(
                p,
                &format!(
                    "for all of space '{}' (not only some environments)",
                    space.name
                ),
            ))
        }
    }

    /// The permission on a thing (`what`, e.g. "machine 'web-1'") in its
    /// environments and tenants, all of them.
    pub fn require_on(
        &self,
        p: Permission,
        space: &Space,
        environments: &[String],
        tenants: &[String],
        what: &str,
    ) -> Result<(), ApiError> {
        if self
            .grants
            .covers(p, space.id, environments, tenants, Cover::All)
        {
            return Ok(());
        }
        let envs = if environments.is_empty() {
            "no environment".to_string()
        } else {
            format!("environments {}", environments.join(", "))
        };
        Err(self.denied(p, &format!("on {what} ({envs}, space '{}')", space.name)))
    }

    /// Whether the caller may see a thing in these environments and tenants.
    pub fn sees(
        &self,
        p: Permission,
        space: &Space,
        environments: &[String],
        tenants: &[String],
    ) -> bool {
        self.grants
            .covers(p, space.id, environments, tenants, Cover::Any)
    }
}

/// Resolved grants per user, kept briefly so that a request does not reload
/// them; any change to teams, grants or roles clears it.
#[derive(Debug, Default)]
pub struct GrantCache {
    entries: Mutex<HashMap<i64, (Instant, Arc<Grants>)>>,
}

/// How long resolved grants are reused (another node's change shows within this).
const GRANT_CACHE_TTL: Duration = Duration::from_secs(5);

impl GrantCache {
    pub fn get(&self, user_id: i64) -> Option<Arc<Grants>> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(&user_id)
            .filter(|(at, _)| at.elapsed() < GRANT_CACHE_TTL)
            .map(|(_, g)| g.clone())
    }

    pub fn put(&self, user_id: i64, grants: Arc<Grants>) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.insert(user_id, (Instant::now(), grants));
    }

    /// Forgets everything (after a change to teams, members, grants or roles).
    pub fn clear(&self) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

/// Spaces by id and by name, reused briefly: every request resolves its
/// space, and a space never changes once created (it is only ever deleted).
/// A space deleted here is forgotten at once ([`SpaceCache::forget`]); one
/// deleted through another node of a cluster is forgotten here within
/// [`SPACE_CACHE_TTL`], as grants are.
#[derive(Debug, Default)]
pub struct SpaceCache {
    entries: Mutex<Entries>,
}

#[derive(Debug, Default)]
struct Entries {
    by_id: HashMap<i64, (Instant, Space)>,
    /// Names folded as the store compares them (ASCII case): a name found
    /// here is the store's match for it too.
    ids_by_name: HashMap<String, i64>,
}

/// How long a space read is reused.
const SPACE_CACHE_TTL: Duration = Duration::from_secs(5);

impl SpaceCache {
    pub fn get(&self, id: i64) -> Option<Space> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .by_id
            .get(&id)
            .filter(|(at, _)| at.elapsed() < SPACE_CACHE_TTL)
            .map(|(_, s)| s.clone())
    }

    /// The space named `name` (any ASCII case), if read lately.
    pub fn get_by_name(&self, name: &str) -> Option<Space> {
        let id = {
            let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            *entries.ids_by_name.get(&name.to_ascii_lowercase())?
        };
        self.get(id).filter(|s| s.name.eq_ignore_ascii_case(name))
    }

    pub fn put(&self, space: &Space) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .by_id
            .insert(space.id, (Instant::now(), space.clone()));
        entries
            .ids_by_name
            .insert(space.name.to_ascii_lowercase(), space.id);
    }

    /// The space was deleted.
    pub fn forget(&self, id: i64) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.by_id.remove(&id);
        entries.ids_by_name.retain(|_, i| *i != id);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn grant(role: &str, space: Option<i64>, envs: &[&str]) -> Grant {
        Grant {
            id: 1,
            role: role.into(),
            space_id: space,
            space: None,
            environments: envs.iter().map(|s| s.to_string()).collect(),
            tenants: vec![],
        }
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn system_permissions_come_only_from_grants_in_every_space() {
        let in_one = Grants::resolve(
            &[grant(octo_store::SYSTEM_ADMINISTRATOR, Some(2), &[])],
            &[],
        );
        assert!(in_one.has_in_space(P::MachineEdit, 2));
        assert!(!in_one.has_in_space(P::MachineEdit, 1));
        assert!(
            !in_one.has_system(P::UserEdit),
            "a role in one space stays in it"
        );
        assert!(!in_one.has_in_space(P::UserEdit, 2));
        let everywhere =
            Grants::resolve(&[grant(octo_store::SYSTEM_ADMINISTRATOR, None, &[])], &[]);
        assert!(everywhere.has_system(P::UserEdit));
        assert!(everywhere.has_in_space(P::MachineEdit, 7));
    }

    #[test]
    fn environment_scopes_cover_any_to_see_and_all_to_act() {
        let g = Grants::resolve(&[grant("Project deployer", Some(1), &["Test"])], &[]);
        let test = strings(&["test"]);
        let both = strings(&["Test", "Production"]);
        assert!(g.covers(P::TaskCreate, 1, &test, &[], Cover::All));
        assert!(!g.covers(P::TaskCreate, 1, &both, &[], Cover::All));
        assert!(g.covers(P::TaskView, 1, &both, &[], Cover::Any));
        assert!(
            !g.covers(P::TaskCreate, 1, &[], &[], Cover::All),
            "a worker is in no environment"
        );
        assert!(!g.has_throughout(P::TaskCreate, 1));
        assert!(g.has_in_space(P::TaskCreate, 1));
        assert!(!g.has_in_space(P::MachineDelete, 1));
    }

    #[test]
    fn spaces_are_found_by_name_in_any_ascii_case_until_forgotten() {
        let cache = SpaceCache::default();
        let ops = Space {
            id: 2,
            name: "Ops".into(),
            description: String::new(),
            is_default: false,
            created_at: 0,
        };
        assert!(cache.get_by_name("Ops").is_none());
        cache.put(&ops);
        assert_eq!(cache.get_by_name("oPS").map(|s| s.id), Some(2));
        assert_eq!(cache.get(2).map(|s| s.name), Some("Ops".into()));
        assert!(cache.get_by_name("Ops2").is_none());
        cache.forget(2);
        assert!(cache.get_by_name("Ops").is_none());
        assert!(cache.get(2).is_none());
        // Deleted and made again under the same name: the new one.
        cache.put(&ops);
        cache.forget(2);
        cache.put(&Space { id: 3, ..ops });
        assert_eq!(cache.get_by_name("ops").map(|s| s.id), Some(3));
    }

    #[test]
    fn custom_roles_and_unknown_roles() {
        let custom = Role {
            name: "Auditor".into(),
            description: String::new(),
            built_in: false,
            permissions: vec![P::EventView],
        };
        let g = Grants::resolve(
            &[grant("auditor", Some(1), &[]), grant("Gone", None, &[])],
            &[custom],
        );
        assert_eq!(g.permissions_in(1), vec![P::EventView]);
    }

    #[test]
    fn built_in_roles_are_consistent() {
        for r in BUILT_IN_ROLES {
            if r.name == "Space manager" {
                for p in SPACE_PERMISSIONS {
                    assert!(r.permissions.contains(p), "{} lacks {p}", r.name);
                }
            }
        }
        for p in Permission::ALL {
            assert_eq!(p.is_system(), !is_space_permission(p), "{p}");
            assert_eq!(Permission::parse(p.name()), Some(p));
        }
        assert!(built_in_role("project DEPLOYER").is_some());
    }
}
