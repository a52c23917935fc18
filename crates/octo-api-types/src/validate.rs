//! The rules every request body is checked against, in one place: the server's
//! API checks each body it reads ([`Validate`], called by its JSON extractor and
//! by the service functions the portal shares), and the store checks names
//! again before it writes.
//!
//! A broken rule is an [`Invalid`]: the field (`name`, `environments[2]`,
//! `variables.PATH`) and the rule, never the offending value itself (which may
//! hold control characters or be a megabyte long).

use std::collections::BTreeMap;
use std::fmt;

use crate::messages::{
    DeployRequest, DiscoverRequest, EnvironmentUpdate, GuidanceRequest, HealthRequest, Login,
    MachineRequest, MachineUpdate, NewApiKey, NewEnvironment, NewPolicy, NewUser, PolicySettings,
    ScriptRequest, TentacleUpgradeRequest,
};
use crate::security::{NewGrant, NewMember, NewRole, NewSpace, NewTeam, SetPassword};

/// The longest name (of anything), in characters.
pub const MAX_NAME_CHARS: usize = 200;
/// The longest name that becomes a folder on a tentacle, in characters: 63
/// characters are at most 252 bytes in UTF-8, within every file system's 255.
pub const MAX_FOLDER_NAME_CHARS: usize = 63;
/// The longest description, in characters.
pub const MAX_DESCRIPTION_CHARS: usize = 4000;
/// The longest URI, in characters.
pub const MAX_URI_CHARS: usize = 1000;
/// The longest password, in bytes.
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// The most items in one list (environments, roles, machines, variables...).
pub const MAX_ITEMS: usize = 1000;
/// The longest variable value, in bytes (1 MiB).
pub const MAX_VALUE_BYTES: usize = 1 << 20;

/// A string schema of the OpenAPI document, for a rule of this module.
macro_rules! string_schema {
    ($ty:ident, $description:expr, $min:expr, $max:expr, $pattern:expr) => {
        impl utoipa::PartialSchema for $ty {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::schema::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .description(Some($description))
                    .min_length(($min > 0).then_some($min))
                    .max_length(Some($max))
                    .pattern(Some($pattern))
                    .into()
            }
        }

        impl utoipa::ToSchema for $ty {
            fn name() -> std::borrow::Cow<'static, str> {
                std::borrow::Cow::Borrowed(stringify!($ty))
            }
        }
    };
}

/// The schema of a [`name`] in the OpenAPI document (the type itself is
/// not used in requests: fields are `String`s that name this as their schema).
#[derive(Debug, Clone)]
pub struct Name(pub String);

string_schema!(Name, "A name: at most 200 characters, not only spaces (spaces around it are trimmed), no control characters (U+0000-U+001F, U+007F-U+009F).", 1, 200, r"^[^\u0000-\u001F\u007F-\u009F]*[^\u0000-\u0020\u007F-\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000][^\u0000-\u001F\u007F-\u009F]*$");

/// The schema of an [`environment_name`] in the OpenAPI document.
#[derive(Debug, Clone)]
pub struct EnvironmentName(pub String);

string_schema!(EnvironmentName, "An environment's name, which becomes a folder on every tentacle deployed to: at most 63 characters, a character other than `.` and spaces, no `/`, `\\` or control characters, not starting with `.calamari-`.", 1, 63, r"^[^\u0000-\u001F\u007F-\u009F/\\]*[^\u0000-\u0020\u007F-\u00A0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000/\\.][^\u0000-\u001F\u007F-\u009F/\\]*$");

/// The schema of free [`text`] (a description) in the OpenAPI document.
#[derive(Debug, Clone)]
pub struct Text(pub String);

string_schema!(
    Text,
    "Free text: at most 4000 characters; line breaks and tabs but no other control characters.",
    0,
    4000,
    r"^[^\u0000-\u0008\u000B\u000C\u000E-\u001F\u007F-\u009F]*$"
);

/// The schema of a [`package_id`] in the OpenAPI document.
#[derive(Debug, Clone)]
pub struct PackageId(pub String);

string_schema!(PackageId, "A package ID: letters, digits, `.`, `-` and `_`, at most 100, not starting with `.`, without `..`.", 1, 100, r"^[A-Za-z0-9_-](\.?[A-Za-z0-9_-])*\.?$");

/// A field of a request that breaks a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The field, as the request names it (`name`, `roles[1]`, `variables.PATH`).
    pub field: String,
    /// The rule it breaks, and what to do.
    pub rule: String,
}

impl Invalid {
    pub fn new(field: impl Into<String>, rule: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            rule: rule.into(),
        }
    }
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "field `{}`: {}", self.field, self.rule)
    }
}

impl std::error::Error for Invalid {}

/// What every check answers.
pub type Checked = Result<(), Invalid>;

/// A request body that can check itself.
pub trait Validate {
    /// The first rule the body breaks, if any.
    fn validate(&self) -> Checked;
}

/// The first control character in `s` (NUL, ESC, DEL, the C1 range, ...) and
/// its position (in characters), when there is one.
fn first_control(s: &str) -> Option<(usize, char)> {
    s.chars().enumerate().find(|(_, c)| c.is_control())
}

fn control_rule(at: usize, c: char) -> String {
    format!(
        "contains the control character U+{:04X} at position {}; control characters (NUL, ESC, newlines, ...) are not allowed",
        u32::from(c),
        at + 1
    )
}

/// A name: something but spaces in it (spaces around it are trimmed where it
/// is stored), at most [`MAX_NAME_CHARS`] characters, no control characters.
pub fn name(field: &str, value: &str) -> Checked {
    if value.trim().is_empty() {
        return Err(Invalid::new(field, "must not be empty"));
    }
    optional_name(field, value)
}

/// As [`name`], but may be empty (a display name).
pub fn optional_name(field: &str, value: &str) -> Checked {
    let chars = value.chars().count();
    if chars > MAX_NAME_CHARS {
        return Err(Invalid::new(
            field,
            format!("is {chars} characters long; at most {MAX_NAME_CHARS} are allowed"),
        ));
    }
    if let Some((at, c)) = first_control(value) {
        return Err(Invalid::new(field, control_rule(at, c)));
    }
    Ok(())
}

/// A name that becomes one folder on every tentacle it is deployed to
/// (`Applications/ENVIRONMENT/PACKAGE/VERSION`): a [`name`] of at most
/// [`MAX_FOLDER_NAME_CHARS`] characters, with a character other than `.` and
/// spaces (so never `.` or `..`), without `/` or `\`, not starting with
/// `.calamari-` (the deployment tool's own).
pub fn folder_name(field: &str, value: &str) -> Checked {
    name(field, value)?;
    let chars = value.chars().count();
    let trimmed = value.trim();
    let why = if !trimmed.chars().any(|c| c != '.' && !c.is_whitespace()) {
        Some(
            "must have a character other than `.` and spaces (`.` and `..` are not folder names)"
                .to_string(),
        )
    } else if value.contains('/') || value.contains('\\') {
        Some("cannot contain `/` or `\\`".to_string())
    } else if trimmed.starts_with(".calamari-") {
        Some("cannot start with `.calamari-` (reserved by the deployment tool)".to_string())
    } else if chars > MAX_FOLDER_NAME_CHARS {
        Some(format!(
            "is {chars} characters long; at most {MAX_FOLDER_NAME_CHARS} are allowed"
        ))
    } else {
        None
    };
    match why {
        Some(rule) => Err(Invalid::new(
            field,
            format!("{rule}: it becomes a folder name on every tentacle deployed to"),
        )),
        None => Ok(()),
    }
}

/// An environment's name: a [`folder_name`] (deployments extract to
/// `Applications/ENVIRONMENT/...` on the tentacle).
pub fn environment_name(field: &str, value: &str) -> Checked {
    folder_name(field, value)
}

/// Free text (a description): at most [`MAX_DESCRIPTION_CHARS`] characters;
/// line breaks and tabs are allowed, other control characters are not.
pub fn text(field: &str, value: &str) -> Checked {
    let chars = value.chars().count();
    if chars > MAX_DESCRIPTION_CHARS {
        return Err(Invalid::new(
            field,
            format!("is {chars} characters long; at most {MAX_DESCRIPTION_CHARS} are allowed"),
        ));
    }
    if let Some((at, c)) = value
        .chars()
        .enumerate()
        .find(|(_, c)| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
    {
        return Err(Invalid::new(
            field,
            format!(
                "contains the control character U+{:04X} at position {}; only line breaks and tabs are allowed",
                u32::from(c),
                at + 1
            ),
        ));
    }
    Ok(())
}

/// A URI: something in it, at most [`MAX_URI_CHARS`] characters, no control
/// characters or spaces (its form is the endpoint parser's business).
pub fn uri(field: &str, value: &str) -> Checked {
    if value.trim().is_empty() {
        return Err(Invalid::new(field, "must not be empty"));
    }
    let chars = value.chars().count();
    if chars > MAX_URI_CHARS {
        return Err(Invalid::new(
            field,
            format!("is {chars} characters long; at most {MAX_URI_CHARS} are allowed"),
        ));
    }
    if let Some((at, c)) = first_control(value) {
        return Err(Invalid::new(field, control_rule(at, c)));
    }
    if value.trim().contains(char::is_whitespace) {
        return Err(Invalid::new(field, "must not contain spaces"));
    }
    Ok(())
}

/// A password: at most [`MAX_PASSWORD_BYTES`] bytes and no NUL (every other
/// character is the person's choice).
pub fn password(field: &str, value: &str) -> Checked {
    if value.len() > MAX_PASSWORD_BYTES {
        return Err(Invalid::new(
            field,
            format!(
                "is {} bytes long; at most {MAX_PASSWORD_BYTES} are allowed",
                value.len()
            ),
        ));
    }
    if value.contains('\0') {
        return Err(Invalid::new(field, "must not contain NUL"));
    }
    Ok(())
}

/// A list: at most [`MAX_ITEMS`] items, each passing `each` (its field is
/// `field[i]`).
pub fn list(field: &str, items: &[String], each: fn(&str, &str) -> Checked) -> Checked {
    if items.len() > MAX_ITEMS {
        return Err(Invalid::new(
            field,
            format!("has {} items; at most {MAX_ITEMS} are allowed", items.len()),
        ));
    }
    for (i, item) in items.iter().enumerate() {
        each(&format!("{field}[{i}]"), item)?;
    }
    Ok(())
}

/// An optional name.
fn some_name(field: &str, value: Option<&String>) -> Checked {
    value.map_or(Ok(()), |v| name(field, v))
}

/// A package ID: usable as one folder name on every target, and in the cache's
/// file names: letters, digits, `.`, `-` and `_`, at most 100, not starting
/// with `.` and without `..`.
pub fn package_id(field: &str, id: &str) -> Checked {
    let ok = !id.is_empty()
        && id.len() <= 100
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        && !id.starts_with('.')
        && !id.contains("..");
    if ok {
        Ok(())
    } else {
        Err(Invalid::new(
            field,
            "is not a package ID: use letters, digits, '.', '-' and '_' (at most 100, not starting with '.', no '..')",
        ))
    }
}

/// Environment variable names a script's shell or its interpreter needs, and
/// those the tentacle sets itself, with why each is refused.
const RESERVED_NAMES: &[(&str, &str)] = &[
    ("PATH", "the shell finds every program through it"),
    (
        "HOME",
        "the shell and many programs find their files through it",
    ),
    ("SHELL", "programs start the user's shell through it"),
    ("IFS", "the shell splits every word with it"),
    ("ENV", "sh runs the file it names before every script"),
    (
        "BASH_ENV",
        "bash runs the file it names before every script",
    ),
    ("CDPATH", "it changes where every `cd` goes"),
    ("PS4", "bash evaluates it for every traced line"),
    ("SHELLOPTS", "it turns bash options on in every script"),
    ("BASHOPTS", "it turns bash options on in every script"),
    ("GLOBIGNORE", "it changes what every glob matches"),
    (
        "POSIXLY_CORRECT",
        "it changes how bash and the tools behave",
    ),
    ("PWD", "the shell keeps the working directory in it"),
    ("OLDPWD", "the shell keeps the previous directory in it"),
    (
        "TMPDIR",
        "programs make their temporary files where it says",
    ),
    (
        "PYTHONHOME",
        "python3 finds its standard library through it",
    ),
    ("TentacleHome", "the tentacle sets it for every script"),
    (
        "TentacleApplications",
        "the tentacle sets it for every script",
    ),
    (
        "TentacleInstanceName",
        "the tentacle sets it for every script",
    ),
    ("TentacleVersion", "the tentacle sets it for every script"),
    (
        "TentacleScriptTicket",
        "the tentacle sets it for every script",
    ),
    (
        "OCTOPUS_SENSITIVE_VARIABLES",
        "the server passes a deployment's secret values in it",
    ),
];

/// Prefixes of reserved names, with why.
const RESERVED_PREFIXES: &[(&str, &str)] = &[
    (
        "LD_",
        "the dynamic loader reads it for every program started",
    ),
    (
        "BASH_FUNC_",
        "bash defines a function from it in every script",
    ),
];

/// Why `name` may not be an environment variable of a script, if it may not.
pub fn reserved_variable(name: &str) -> Option<&'static str> {
    RESERVED_NAMES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, why)| *why)
        .or_else(|| {
            RESERVED_PREFIXES
                .iter()
                .find(|(p, _)| name.starts_with(p))
                .map(|(_, why)| *why)
        })
}

/// A variable name as a deployment's scripts also get it: every character
/// not in `[A-Za-z0-9_]` becomes `_` (the deployment tool does the same).
pub fn sanitized_variable_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A map of variables: at most [`MAX_ITEMS`], each name a [`name`] without
/// `=` that is not [`reserved_variable`] (nor, when `sanitized`, its
/// [`sanitized_variable_name`]), each value at most [`MAX_VALUE_BYTES`] and
/// without NUL.
pub fn variables(field: &str, vars: &BTreeMap<String, String>, sanitized: bool) -> Checked {
    if vars.len() > MAX_ITEMS {
        return Err(Invalid::new(
            field,
            format!(
                "has {} variables; at most {MAX_ITEMS} are allowed",
                vars.len()
            ),
        ));
    }
    for (n, value) in vars {
        let safe: String = n
            .chars()
            .take(60)
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        let at = format!("{field}.{safe}");
        name(&at, n).map_err(|e| Invalid::new(format!("{field} (a name)"), e.rule))?;
        if n.contains('=') {
            return Err(Invalid::new(
                at,
                "a variable's name cannot contain `=` (it becomes an environment variable)",
            ));
        }
        let clean = sanitized_variable_name(n);
        let reserved = reserved_variable(n)
            .map(|why| (n.as_str(), why))
            .or_else(|| {
                if sanitized {
                    reserved_variable(&clean).map(|why| (clean.as_str(), why))
                } else {
                    None
                }
            });
        if let Some((env, why)) = reserved {
            let also = if env == n {
                String::new()
            } else {
                format!(" (scripts get it as `{env}`)")
            };
            return Err(Invalid::new(
                at,
                format!(
                    "`{env}` is reserved{also}: {why}, so setting it would break every script; rename the variable"
                ),
            ));
        }
        if value.len() > MAX_VALUE_BYTES {
            return Err(Invalid::new(
                at,
                format!(
                    "the value is {} bytes long; at most {MAX_VALUE_BYTES} are allowed",
                    value.len()
                ),
            ));
        }
        if value.contains('\0') {
            return Err(Invalid::new(
                at,
                "the value contains NUL, which an environment variable cannot hold",
            ));
        }
    }
    Ok(())
}

impl Validate for NewEnvironment {
    fn validate(&self) -> Checked {
        environment_name("name", &self.name)?;
        text("description", &self.description)
    }
}

/// The limits of a machine policy's settings: field, least, most.
pub const POLICY_LIMITS: [(&str, u32, u32); 3] = [
    ("health_check_interval_s", 60, 2_678_400),
    ("health_check_timeout_s", 1, 3600),
    ("polling_wait_s", 1, 3600),
];

impl Validate for PolicySettings {
    fn validate(&self) -> Checked {
        let values = [
            self.health_check_interval_s,
            self.health_check_timeout_s,
            self.polling_wait_s,
        ];
        for ((field, least, most), value) in POLICY_LIMITS.into_iter().zip(values) {
            if let Some(v) = value.filter(|v| !(least..=most).contains(v)) {
                return Err(Invalid::new(
                    field,
                    format!("must be from {least} to {most} seconds, not {v}"),
                ));
            }
        }
        Ok(())
    }
}

impl Validate for NewPolicy {
    fn validate(&self) -> Checked {
        name("name", &self.name)?;
        self.settings().validate()
    }
}

impl Validate for EnvironmentUpdate {
    fn validate(&self) -> Checked {
        if let Some(n) = &self.name {
            environment_name("name", n)?;
        }
        if let Some(d) = &self.description {
            text("description", d)?;
        }
        if self.position.is_some_and(|p| p > 1_000_000) {
            return Err(Invalid::new("position", "must be from 0 to 1000000"));
        }
        Ok(())
    }
}

impl Validate for MachineRequest {
    fn validate(&self) -> Checked {
        name("name", &self.name)?;
        name("comms_style", &self.comms_style)?;
        uri("uri", &self.uri)?;
        name("thumbprint", &self.thumbprint)?;
        list("environments", &self.environments, name)?;
        list("roles", &self.roles, name)?;
        list("tenants", &self.tenants, name)?;
        list("tenant_tags", &self.tenant_tags, name)?;
        some_name("policy", self.policy.as_ref())?;
        some_name("worker_pool", self.worker_pool.as_ref())
    }
}

impl Validate for MachineUpdate {
    fn validate(&self) -> Checked {
        for (field, items) in [
            ("environments", &self.environments),
            ("roles", &self.roles),
            ("tenants", &self.tenants),
            ("tenant_tags", &self.tenant_tags),
        ] {
            if let Some(items) = items {
                list(field, items, name)?;
            }
        }
        some_name("policy", self.policy.as_ref())
    }
}

impl Validate for DiscoverRequest {
    fn validate(&self) -> Checked {
        uri("uri", &self.uri)
    }
}

impl Validate for NewApiKey {
    fn validate(&self) -> Checked {
        optional_name("purpose", &self.purpose)
    }
}

impl Validate for NewUser {
    fn validate(&self) -> Checked {
        name("username", &self.username)?;
        if let Some(p) = &self.password {
            password("password", p)?;
        }
        optional_name("display_name", &self.display_name)
    }
}

impl Validate for Login {
    fn validate(&self) -> Checked {
        name("username", &self.username)?;
        password("password", &self.password)
    }
}

impl Validate for ScriptRequest {
    fn validate(&self) -> Checked {
        if self.script.contains('\0') {
            return Err(Invalid::new("script", "must not contain NUL"));
        }
        list("machines", &self.machines, name)?;
        some_name("environment", self.environment.as_ref())?;
        some_name("role", self.role.as_ref())?;
        some_name("tenant", self.tenant.as_ref())?;
        variables("variables", &self.variables, false)?;
        variables("sensitive_variables", &self.sensitive_variables, false)
    }
}

impl Validate for HealthRequest {
    fn validate(&self) -> Checked {
        list("machines", &self.machines, name)?;
        some_name("environment", self.environment.as_ref())
    }
}

impl Validate for TentacleUpgradeRequest {
    fn validate(&self) -> Checked {
        list("machines", &self.machines, name)?;
        some_name("environment", self.environment.as_ref())
    }
}

impl Validate for DeployRequest {
    fn validate(&self) -> Checked {
        package_id("package_id", &self.package_id)?;
        if let Some(v) = &self.version {
            folder_name("version", v)?;
        }
        name("environment", &self.environment)?;
        some_name("role", self.role.as_ref())?;
        some_name("tenant", self.tenant.as_ref())?;
        variables("variables", &self.variables, true)?;
        variables("sensitive_variables", &self.sensitive_variables, true)?;
        if let Some(r) = self.retention {
            if !(1..=1000).contains(&r) {
                return Err(Invalid::new(
                    "retention",
                    "must be from 1 to 1000 (the versions kept on each machine)",
                ));
            }
        }
        Ok(())
    }
}

impl Validate for GuidanceRequest {
    fn validate(&self) -> Checked {
        name("machine", &self.machine)
    }
}

impl Validate for NewSpace {
    fn validate(&self) -> Checked {
        name("name", &self.name)?;
        text("description", &self.description)
    }
}

impl Validate for NewRole {
    fn validate(&self) -> Checked {
        name("name", &self.name)?;
        text("description", &self.description)?;
        if self.permissions.len() > MAX_ITEMS {
            return Err(Invalid::new("permissions", "has too many items"));
        }
        Ok(())
    }
}

impl Validate for NewGrant {
    fn validate(&self) -> Checked {
        name("role", &self.role)?;
        list("environments", &self.environments, name)?;
        list("tenants", &self.tenants, name)
    }
}

impl Validate for NewTeam {
    fn validate(&self) -> Checked {
        name("name", &self.name)?;
        text("description", &self.description)
    }
}

impl Validate for NewMember {
    fn validate(&self) -> Checked {
        name("username", &self.username)
    }
}

impl Validate for SetPassword {
    fn validate(&self) -> Checked {
        password("password", &self.password)?;
        if let Some(p) = &self.current_password {
            password("current_password", p)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn names_refuse_control_characters_length_and_padding() {
        assert!(name("name", "web-01").is_ok());
        assert!(name("name", "Ünïcödé name").is_ok());
        let e = name("name", "a\u{1b}[31mred").unwrap_err();
        assert_eq!(e.field, "name");
        assert!(e.rule.contains("U+001B at position 2"), "{e}");
        assert!(name("name", "nul\0").unwrap_err().rule.contains("U+0000"));
        assert!(name("name", "line\nbreak").is_err());
        assert!(name("name", "\u{9b}c1").is_err());
        assert!(name("name", "  ").unwrap_err().rule.contains("empty"));
        assert!(name("name", " padded ").is_ok());
        let long = "x".repeat(MAX_NAME_CHARS + 1);
        assert!(name("name", &long)
            .unwrap_err()
            .rule
            .contains("201 characters"));
        assert!(name("name", &"é".repeat(MAX_NAME_CHARS)).is_ok());
        assert_eq!(
            name("roles[1]", "\u{7f}").unwrap_err().to_string(),
            "field `roles[1]`: contains the control character U+007F at position 1; control characters (NUL, ESC, newlines, ...) are not allowed"
        );
    }

    #[test]
    fn environment_names_must_be_folder_names() {
        for ok in ["Production", "Test 2", "a.b", "-x", "..a"] {
            assert!(environment_name("name", ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("a/b", "`/`"),
            ("a\\b", "`\\`"),
            ("..", "`..`"),
            (".", "`.`"),
            (". .", "`.`"),
            (".calamari-staging", "reserved"),
        ] {
            let e = environment_name("name", bad).unwrap_err();
            assert!(e.rule.contains(why), "{bad}: {e}");
            assert!(e.rule.contains("folder name"), "{bad}: {e}");
        }
        assert!(environment_name("name", &"é".repeat(63)).is_ok());
        let e = environment_name("name", &"é".repeat(64)).unwrap_err();
        assert!(e.rule.contains("64 characters"), "{e}");
    }

    #[test]
    fn descriptions_allow_line_breaks_only() {
        assert!(text("description", "two\nlines\tand a tab").is_ok());
        assert!(text("description", "").is_ok());
        assert!(text("description", "bell\u{7}").is_err());
        assert!(text("description", &"x".repeat(MAX_DESCRIPTION_CHARS + 1)).is_err());
    }

    #[test]
    fn uris_are_bounded_and_clean() {
        assert!(uri("uri", "https://a:10933/").is_ok());
        assert!(uri("uri", "").is_err());
        assert!(uri("uri", "https://a b/")
            .unwrap_err()
            .rule
            .contains("spaces"));
        assert!(uri("uri", "https://a\u{1b}/").is_err());
    }

    #[test]
    fn reserved_variables_are_refused_with_the_reason() {
        let vars = |n: &str| BTreeMap::from([(n.to_string(), "x".to_string())]);
        let e = variables("variables", &vars("PATH"), false).unwrap_err();
        assert_eq!(e.field, "variables.PATH");
        assert!(e.rule.contains("`PATH` is reserved"), "{e}");
        assert!(e.rule.contains("finds every program"), "{e}");
        assert!(variables("variables", &vars("LD_PRELOAD"), false).is_err());
        assert!(variables("variables", &vars("BASH_FUNC_ls%%"), false).is_err());
        assert!(variables("variables", &vars("Path"), false).is_ok());
        assert!(variables("variables", &vars("Octopus.Action.X"), true).is_ok());
        // A deployment's scripts also get the sanitized name.
        let e = variables("variables", &vars("LD.PRELOAD"), true).unwrap_err();
        assert!(e.rule.contains("as `LD_PRELOAD`"), "{e}");
        assert!(variables("variables", &vars("LD.PRELOAD"), false).is_ok());
        assert!(variables("variables", &vars("A=B"), false)
            .unwrap_err()
            .rule
            .contains("`=`"));
        let e = variables("variables", &vars("bad\u{1b}"), false).unwrap_err();
        assert!(!e.to_string().contains('\u{1b}'), "{e}");
        let nul = BTreeMap::from([("A".to_string(), "a\0b".to_string())]);
        assert!(variables("variables", &nul, false)
            .unwrap_err()
            .rule
            .contains("NUL"));
    }

    #[test]
    fn request_bodies_name_the_field() {
        let m = MachineRequest {
            name: "web".into(),
            comms_style: "TentaclePassive".into(),
            uri: "https://h:10933/".into(),
            thumbprint: "AB".into(),
            environments: vec!["Prod".into(), "x\0".into()],
            roles: vec![],
            tenants: vec![],
            tenant_tags: vec![],
            policy: None,
            worker_pool: None,
            force: false,
        };
        assert_eq!(m.validate().unwrap_err().field, "environments[1]");
        let d = DeployRequest {
            package_id: "Acme.Web".into(),
            version: Some("1.0.0".into()),
            environment: "Prod".into(),
            role: None,
            tenant: None,
            variables: BTreeMap::new(),
            sensitive_variables: BTreeMap::from([("HOME".into(), "/".into())]),
            retention: Some(3),
            guided_failure: false,
            max_parallel_steps: None,
        };
        assert_eq!(d.validate().unwrap_err().field, "sensitive_variables.HOME");
        let d = DeployRequest {
            sensitive_variables: BTreeMap::new(),
            retention: Some(0),
            ..d
        };
        assert_eq!(d.validate().unwrap_err().field, "retention");
        assert!(package_id("package_id", "Acme.Web_2-x").is_ok());
        for bad in ["", ".a", "a..b", "a/b", "a b", "a\u{1b}"] {
            assert!(package_id("package_id", bad).is_err(), "{bad}");
        }
    }
}
