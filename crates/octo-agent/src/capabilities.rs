//! The capabilities service: ping, and what this tentacle is and can do
//! (versions, platform, services, free space, installed deployment tool).

use std::cmp::Ordering;
use std::fs;
use std::path::Path;
use std::sync::Arc;

use octo_proto::service_names;
use octo_proto::v1::capabilities_server::Capabilities;
use octo_proto::v1::{
    CapabilitiesReply, GetCapabilitiesRequest, PingReply, PingRequest, ServiceVersion,
};
use tonic::{Request, Response, Status};
use tracing::{debug, warn};

use crate::AgentContext;

/// Contract version of every service this build implements.
const SERVICE_VERSION: u32 = 1;

/// The real capabilities service of a tentacle.
#[derive(Debug, Clone)]
pub struct CapabilitiesImpl {
    ctx: Arc<AgentContext>,
}

impl CapabilitiesImpl {
    /// The capabilities service of the instance described by `ctx`.
    pub fn new(ctx: AgentContext) -> Self {
        Self { ctx: Arc::new(ctx) }
    }
}

/// Directory holding the deployment tool, one sub-directory per version.
fn calamari_root(ctx: &AgentContext) -> std::path::PathBuf {
    ctx.tools_root().join("calamari")
}

/// Installed deployment tool version: the highest version directory under
/// `HOME/Tools/calamari/` that contains a `.complete` marker file (versions
/// compared numerically, component by component; a pre-release such as
/// `1.2.0-beta` ranks below `1.2.0`). `None` when none is installed.
pub fn installed_tool_version(ctx: &AgentContext) -> Option<String> {
    let root = calamari_root(ctx);
    let entries = match fs::read_dir(&root) {
        Ok(e) => e,
        Err(e) => {
            debug!("no deployment tool in {}: {e}", root.display());
            return None;
        }
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let key = VersionKey::parse(&name)?;
            let complete = entry.path().join(".complete").is_file();
            if !complete {
                debug!(
                    "deployment tool {name} in {} has no .complete marker; ignoring it",
                    root.display()
                );
                return None;
            }
            Some((key, name))
        })
        .max_by(|(a, an), (b, bn)| a.cmp(b).then_with(|| an.cmp(bn)))
        .map(|(_, name)| name)
}

/// A version name ordered numerically: `1.10.0` > `1.9.0`, `1.2` == `1.2.0`,
/// `1.2.0-beta` < `1.2.0` (pre-releases compared as strings).
#[derive(Debug, PartialEq, Eq)]
struct VersionKey {
    numbers: Vec<u64>,
    pre_release: Option<String>,
}

impl VersionKey {
    fn parse(name: &str) -> Option<Self> {
        let (core, pre) = match name.split_once(['-', '+']) {
            Some((core, rest)) => (core, Some(rest.to_string())),
            None => (name, None),
        };
        let numbers = core
            .split('.')
            .map(|part| {
                if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                    None
                } else {
                    part.parse::<u64>().ok()
                }
            })
            .collect::<Option<Vec<_>>>()?;
        Some(Self {
            numbers,
            pre_release: pre,
        })
    }
}

impl Ord for VersionKey {
    fn cmp(&self, other: &Self) -> Ordering {
        let len = self.numbers.len().max(other.numbers.len());
        for i in 0..len {
            let a = self.numbers.get(i).copied().unwrap_or(0);
            let b = other.numbers.get(i).copied().unwrap_or(0);
            match a.cmp(&b) {
                Ordering::Equal => {}
                o => return o,
            }
        }
        match (&self.pre_release, &other.pre_release) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
            (Some(a), Some(b)) => a.cmp(b),
        }
    }
}

impl PartialOrd for VersionKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// `PRETTY_NAME` from an os-release file's text.
fn pretty_name(os_release: &str) -> Option<String> {
    os_release.lines().find_map(|line| {
        let value = line.trim().strip_prefix("PRETTY_NAME=")?;
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(value);
        let value = value.replace("\\\"", "\"").replace("\\\\", "\\");
        (!value.is_empty()).then_some(value)
    })
}

fn os_version() -> String {
    ["/etc/os-release", "/usr/lib/os-release"]
        .iter()
        .find_map(|p| fs::read_to_string(p).ok())
        .and_then(|text| pretty_name(&text))
        .unwrap_or_default()
}

fn home_free_bytes(home: &Path) -> u64 {
    if !home.is_dir() {
        warn!(
            "the tentacle's home directory {} does not exist; reporting 0 free bytes",
            home.display()
        );
        return 0;
    }
    match crate::files::free_bytes(home) {
        Ok(free) => free,
        Err(e) => {
            warn!("cannot read the free space of {}: {e}", home.display());
            0
        }
    }
}

fn describe(ctx: &AgentContext) -> CapabilitiesReply {
    let hostname = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|e| {
            warn!("cannot read the host name: {e}");
            String::new()
        });
    let services = [
        service_names::SESSION,
        service_names::CAPABILITIES,
        service_names::SCRIPT,
        service_names::FILE,
        service_names::UPGRADE,
    ]
    .into_iter()
    .map(|name| ServiceVersion {
        name: name.to_string(),
        version: SERVICE_VERSION,
    })
    .collect();
    CapabilitiesReply {
        tentacle_version: crate::version().to_string(),
        os: std::env::consts::OS.to_string(),
        os_version: os_version(),
        arch: std::env::consts::ARCH.to_string(),
        hostname,
        services,
        home_free_bytes: home_free_bytes(&ctx.home),
        tool_version: installed_tool_version(ctx).unwrap_or_default(),
        instance_name: ctx.instance_name.clone(),
        boot_id: boot_id().to_string(),
    }
}

/// Random, fixed for the life of this process: a tentacle that restarted
/// (e.g. after an upgrade) reports another one.
pub fn boot_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let mut bytes = [0u8; 12];
        if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
            // Unique enough: this process and when it started.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            return format!("{}-{nanos}", std::process::id());
        }
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    })
}

#[tonic::async_trait]
impl Capabilities for CapabilitiesImpl {
    async fn ping(&self, request: Request<PingRequest>) -> Result<Response<PingReply>, Status> {
        Ok(Response::new(PingReply {
            payload: request.into_inner().payload,
        }))
    }

    async fn get_capabilities(
        &self,
        _request: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<CapabilitiesReply>, Status> {
        let ctx = self.ctx.clone();
        // Reads files and directories: keep it off the async workers.
        let reply = tokio::task::spawn_blocking(move || describe(&ctx))
            .await
            .map_err(|e| Status::internal(format!("capabilities worker failed: {e}")))?;
        Ok(Response::new(reply))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        let k = |s: &str| VersionKey::parse(s).unwrap();
        assert!(k("1.10.0") > k("1.9.0"));
        assert!(k("2.0") > k("1.99.99"));
        assert_eq!(k("1.2").cmp(&k("1.2.0")), Ordering::Equal);
        assert!(k("1.2.0-beta") < k("1.2.0"));
        assert!(VersionKey::parse("latest").is_none());
        assert!(VersionKey::parse("1..2").is_none());
    }

    #[test]
    fn pretty_name_is_unquoted() {
        let text = "NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n";
        assert_eq!(
            pretty_name(text).as_deref(),
            Some("Debian GNU/Linux 12 (bookworm)")
        );
        assert_eq!(pretty_name("PRETTY_NAME=Arch\n").as_deref(), Some("Arch"));
        assert_eq!(pretty_name("NAME=x\n"), None);
    }
}
