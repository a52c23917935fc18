//! A machine's lists (environments, roles, tenants, tenant tags), each in a
//! join table of its own: how to read them into [`Machine`]s and what to write
//! for a [`NewMachine`].

#[cfg(doc)]
use crate::rows::MachineRow;
use crate::{Machine, NewMachine, Result, StoreError};

/// One of a machine's lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineList {
    /// Environment names (`machine_environments`, by environment id).
    Environments,
    /// Roles (`machine_roles`).
    Roles,
    /// Tenant names (`machine_tenants`, by tenant id).
    Tenants,
    /// Tenant tags (`machine_tenant_tags`).
    TenantTags,
}

impl MachineList {
    /// Every list.
    pub const ALL: [MachineList; 4] = [
        MachineList::Environments,
        MachineList::Roles,
        MachineList::Tenants,
        MachineList::TenantTags,
    ];

    /// The join table.
    pub fn table(self) -> &'static str {
        match self {
            Self::Environments => "machine_environments",
            Self::Roles => "machine_roles",
            Self::Tenants => "machine_tenants",
            Self::TenantTags => "machine_tenant_tags",
        }
    }

    /// The join table's column beside `machine_id`.
    pub fn column(self) -> &'static str {
        match self {
            Self::Environments => "environment_id",
            Self::Roles => "role",
            Self::Tenants => "tenant_id",
            Self::TenantTags => "tag",
        }
    }

    /// The column that brings this list with a machine's row.
    pub fn column_name(self) -> &'static str {
        match self {
            Self::Environments => "list_environments",
            Self::Roles => "list_roles",
            Self::Tenants => "list_tenants",
            Self::TenantTags => "list_tenant_tags",
        }
    }

    /// The columns that bring every list of machine `m` with its row (after
    /// [`MachineRow`]'s): for each list, a JSON array of its values in order,
    /// made by `json_array_of` (the engine's aggregate). One statement for
    /// machines and their lists, so one round trip to the database and one
    /// snapshot of it.
    pub fn columns(json_array_of: fn(&str) -> String) -> String {
        let parts: Vec<String> = Self::ALL
            .iter()
            .map(|l| {
                let (value, join) = l.value_and_join();
                format!(
                    "(SELECT {} FROM {} l {join} WHERE l.machine_id = m.id) AS {}",
                    json_array_of(value),
                    l.table(),
                    l.column_name()
                )
            })
            .collect();
        parts.join(", ")
    }

    /// Sets this list of `m` from `json`, as read from [`MachineList::column_name`].
    pub fn set(self, m: &mut Machine, json: &str) -> Result<()> {
        *self.of(m) = serde_json::from_str(json).map_err(|e| {
            StoreError::Database(format!(
                "reading the {} of machine '{}': {e}",
                self.column_name(),
                m.name
            ))
        })?;
        Ok(())
    }

    /// The value, read from the join table `l` or the table it joins.
    fn value_and_join(self) -> (&'static str, &'static str) {
        match self {
            Self::Environments => ("e.name", "JOIN environments e ON e.id = l.environment_id"),
            Self::Roles => ("l.role", ""),
            Self::Tenants => ("t.name", "JOIN tenants t ON t.id = l.tenant_id"),
            Self::TenantTags => ("l.tag", ""),
        }
    }

    /// What a new machine's rows of this list hold: row ids for environments
    /// and tenants (resolved in `refs`), the text itself for roles and tags.
    pub fn values<'a>(self, m: &'a NewMachine, refs: &'a MachineRefs) -> ListValues<'a> {
        match self {
            Self::Environments => ListValues::Ids(&refs.environment_ids),
            Self::Roles => ListValues::Texts(&m.roles),
            Self::Tenants => ListValues::Ids(&refs.tenant_ids),
            Self::TenantTags => ListValues::Texts(&m.tenant_tags),
        }
    }

    fn of(self, m: &mut Machine) -> &mut Vec<String> {
        match self {
            Self::Environments => &mut m.environments,
            Self::Roles => &mut m.roles,
            Self::Tenants => &mut m.tenants,
            Self::TenantTags => &mut m.tenant_tags,
        }
    }
}

/// The values of one list of a new machine.
#[derive(Debug, Clone, Copy)]
pub enum ListValues<'a> {
    /// Row ids.
    Ids(&'a [i64]),
    /// Text.
    Texts(&'a [String]),
}

/// What a new machine refers to, resolved to row ids by the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineRefs {
    /// Its policy.
    pub policy_id: i64,
    /// Its environments, each once, in the order given.
    pub environment_ids: Vec<i64>,
    /// Its tenants, each once, in the order given.
    pub tenant_ids: Vec<i64>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_list_comes_with_the_machine_from_its_join_table() {
        let sql = MachineList::columns(|e| format!("agg({e})"));
        assert_eq!(
            sql,
            "(SELECT agg(e.name) FROM machine_environments l JOIN environments e ON e.id = l.environment_id \
             WHERE l.machine_id = m.id) AS list_environments, \
             (SELECT agg(l.role) FROM machine_roles l  WHERE l.machine_id = m.id) AS list_roles, \
             (SELECT agg(t.name) FROM machine_tenants l JOIN tenants t ON t.id = l.tenant_id \
             WHERE l.machine_id = m.id) AS list_tenants, \
             (SELECT agg(l.tag) FROM machine_tenant_tags l  WHERE l.machine_id = m.id) AS list_tenant_tags"
        );
    }

    #[test]
    fn lists_are_read_from_json_and_unreadable_ones_say_which() {
        let mut m = Machine {
            id: 1,
            space_id: 1,
            name: "web01".into(),
            kind: crate::EndpointKind::Listening,
            uri: String::new(),
            thumbprint: String::new(),
            next_thumbprint: None,
            environments: Vec::new(),
            roles: Vec::new(),
            tenants: Vec::new(),
            tenant_tags: Vec::new(),
            policy: String::new(),
            worker_pool: None,
            status: crate::HealthStatus::Unknown,
            status_reason: String::new(),
            last_health_at: None,
            tentacle_version: None,
            tool_version: None,
            os: None,
            free_bytes: None,
            disabled: false,
            created_at: 0,
        };
        MachineList::Roles.set(&mut m, r#"["app","web"]"#).unwrap();
        MachineList::Environments.set(&mut m, "[]").unwrap();
        assert_eq!(m.roles, ["app", "web"]);
        assert!(m.environments.is_empty());
        let err = MachineList::Tenants
            .set(&mut m, "[1")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("list_tenants") && err.contains("web01"),
            "{err}"
        );
    }
}
