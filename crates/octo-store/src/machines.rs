//! A machine's lists (environments, roles, tenants, tenant tags), each in a
//! join table of its own: how to read them into [`Machine`]s and what to write
//! for a [`NewMachine`].

#[cfg(doc)]
use crate::rows::MachineRow;
use crate::rows::{group, ListRow, MachineListRow};
use crate::{Machine, NewMachine};

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

    /// Its number in [`MachineList::select_all`]'s `list` column.
    fn number(self) -> i64 {
        match self {
            Self::Environments => 0,
            Self::Roles => 1,
            Self::Tenants => 2,
            Self::TenantTags => 3,
        }
    }

    /// The query for every list of the machines whose ids `ids` yields (`ids`
    /// is the engine's way of passing a list of ids, e.g. `SELECT value FROM
    /// json_each(?)`, repeated once a list: bind the ids four times):
    /// [`MachineListRow`]s, by list, then machine, then value. One query
    /// rather than one a list: each is a round trip to the database.
    pub fn select_all(ids: &str) -> String {
        let parts: Vec<String> = Self::ALL
            .iter()
            .map(|l| {
                let (value, join) = l.value_and_join();
                format!(
                    "SELECT CAST({} AS BIGINT) AS list, l.machine_id AS owner, {value} AS value FROM {} l {join} \
                     WHERE l.machine_id IN ({ids})",
                    l.number(),
                    l.table()
                )
            })
            .collect();
        format!("{} ORDER BY list, owner, value", parts.join(" UNION ALL "))
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

/// Machines read from their rows, their lists to be filled in.
#[derive(Debug)]
pub struct Machines {
    machines: Vec<Machine>,
}

impl Machines {
    /// The machines as read from [`MachineRow`]s, in order, with empty lists.
    pub fn new(machines: Vec<Machine>) -> Self {
        Self { machines }
    }

    /// Their ids.
    pub fn ids(&self) -> Vec<i64> {
        self.machines.iter().map(|m| m.id).collect()
    }

    /// Whether there are none (then there are no lists to read).
    pub fn is_empty(&self) -> bool {
        self.machines.is_empty()
    }

    /// Fills in `list` from its rows (owner, value), in their order.
    pub fn fill(&mut self, list: MachineList, rows: Vec<ListRow>) {
        let mut values = group(rows);
        for m in &mut self.machines {
            if let Some(v) = values.remove(&m.id) {
                *list.of(m) = v;
            }
        }
    }

    /// Fills in every list from the rows of [`MachineList::select_all`].
    pub fn fill_all(&mut self, rows: Vec<MachineListRow>) {
        let mut by_list: [Vec<ListRow>; 4] = Default::default();
        for r in rows {
            if let Some(list) = MachineList::ALL.iter().position(|l| l.number() == r.list) {
                by_list[list].push(ListRow {
                    owner: r.owner,
                    value: r.value,
                });
            }
        }
        for (list, rows) in MachineList::ALL.into_iter().zip(by_list) {
            self.fill(list, rows);
        }
    }

    /// The machines.
    pub fn into_vec(self) -> Vec<Machine> {
        self.machines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_list_is_read_by_one_query_from_its_join_table() {
        let sql = MachineList::select_all("1");
        assert_eq!(sql.matches("UNION ALL").count(), 3);
        assert!(sql.starts_with(
            "SELECT CAST(0 AS BIGINT) AS list, l.machine_id AS owner, e.name AS value FROM machine_environments l \
             JOIN environments e ON e.id = l.environment_id WHERE l.machine_id IN (1) UNION ALL \
             SELECT CAST(1 AS BIGINT) AS list, l.machine_id AS owner, l.role AS value FROM machine_roles l  \
             WHERE l.machine_id IN (1) UNION ALL"
        ));
        assert!(sql.ends_with(" ORDER BY list, owner, value"));
    }

    #[test]
    fn machines_get_the_lists_of_their_ids() {
        let machine = |id: i64| Machine {
            id,
            space_id: 1,
            name: format!("m{id}"),
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
        let mut ms = Machines::new(vec![machine(2), machine(1)]);
        assert_eq!(ms.ids(), [2, 1]);
        let row = |owner: i64, value: &str| ListRow {
            owner,
            value: value.into(),
        };
        ms.fill(
            MachineList::Roles,
            vec![row(1, "db"), row(2, "app"), row(2, "web"), row(3, "gone")],
        );
        let ms = ms.into_vec();
        assert_eq!(
            (ms[0].id, &ms[0].roles),
            (2, &vec!["app".to_string(), "web".into()])
        );
        assert_eq!(ms[1].roles, ["db"]);
        assert!(ms[1].environments.is_empty());
    }
}
