//! Certificate rotation: `tentacle rotate-certificate` (stages a new certificate
//! and watches the agent carry it out) and the agent's half, [`AgentRotation`]
//! (offers it to every server, records acceptances, switches). The rules live in
//! `octo_agent::rotation`; this is the IO.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use octo_agent::config::TentacleConfig;
use octo_agent::rotation::{staged_paths, RotationState};
use octo_comms::{TentacleComms, TentacleRotation};
use octo_tls::{Identity, Thumbprint, TrustStore};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::{load_identity, Target};

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Read-modify-write of the state under an exclusive lock shared by the
/// command and the agent, so neither loses the other's change.
pub(crate) fn update_state<T>(
    home: &Path,
    f: impl FnOnce(&mut Option<RotationState>) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let lock_path = home.join(".certificate-rotation.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    let _lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", lock_path.display()))?;
    let mut state = RotationState::load(home).map_err(anyhow::Error::msg)?;
    let before = state.clone();
    let out = f(&mut state)?;
    if state != before {
        if let Some(s) = &state {
            s.save(home).map_err(anyhow::Error::msg)?;
        }
    }
    Ok(out)
}

/// `tentacle rotate-certificate`.
pub(crate) fn rotate_certificate(target: &Target, wait: u64, force: bool) -> anyhow::Result<()> {
    let cfg = target.load()?;
    let current = load_identity(&cfg)?;
    let home = cfg.tentacle.home.clone();
    std::fs::create_dir_all(&home).with_context(|| format!("creating {}", home.display()))?;
    let name = &target.name;
    let state = update_state(&home, |state| {
        match state {
            Some(s)
                if !s.switched() && s.previous_thumbprint == current.thumbprint().to_string() =>
            {
                println!(
                    "A rotation to {} is staged already (since {}); carrying on with it.",
                    s.next_thumbprint,
                    crate::rotate::ago(s.started_at_ms)
                );
            }
            _ => {
                let next = Identity::generate(&format!("Octopus Tentacle {name}"))?;
                let (cert, key) = staged_paths(&cfg.tentacle.certificate, &next.thumbprint());
                next.save(&cert, &key)?;
                *state = Some(RotationState {
                    previous_thumbprint: current.thumbprint().to_string(),
                    next_thumbprint: next.thumbprint().to_string(),
                    next_certificate: cert,
                    next_private_key: key,
                    started_at_ms: now_ms(),
                    accepted_by: Default::default(),
                    force: false,
                    switched_at_ms: None,
                });
                println!(
                    "Staged a new certificate {} to replace {}.",
                    next.thumbprint(),
                    current.thumbprint()
                );
            }
        }
        let s = state.as_mut().context("no rotation staged")?;
        if force {
            s.force = true;
        }
        Ok(s.clone())
    })?;
    let trusted = cfg.trusted_thumbprints();
    println!(
        "The running agent offers it to every server it trusts ({}) over their connections, and switches once all have accepted{}.",
        trusted.len(),
        if force { " (--force: at once)" } else { "" }
    );
    let deadline = Instant::now() + Duration::from_secs(wait);
    let mut shown = state.accepted_by;
    loop {
        let Some(s) = RotationState::load(&home).map_err(anyhow::Error::msg)? else {
            bail!(
                "the rotation state {} disappeared",
                RotationState::path(&home).display()
            );
        };
        for a in s.accepted_by.difference(&shown) {
            println!("  accepted by the server with thumbprint {a}");
        }
        shown = s.accepted_by.clone();
        if s.switched() {
            println!(
                "Switched: instance '{name}' now presents {} (was {}). Servers that accepted it forget the old one when the tentacle reconnects.",
                s.next_thumbprint, s.previous_thumbprint
            );
            return Ok(());
        }
        if Instant::now() >= deadline {
            let waiting = s.waiting_for(&trusted);
            let list = waiting
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            bail!(
                "not switched yet after {wait} s: waiting for the server(s) {list} to accept {next}. The rotation stays staged and completes by itself once they have (is the agent running? `tentacle service --instance {name} --status`; a server reaches a listening tentacle at its next health check: `octopus health-check --machine NAME`). To switch now anyway, run `tentacle rotate-certificate --instance {name} --force`; a server that did not accept then needs the new thumbprint by hand: `octopus machine ... --thumbprint {next}`",
                next = s.next_thumbprint
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// "3 s ago" / "5 min ago" from milliseconds since the epoch.
pub(crate) fn ago(ms: u64) -> String {
    let secs = now_ms().saturating_sub(ms) / 1000;
    match secs {
        s if s < 120 => format!("{s} s ago"),
        s if s < 7200 => format!("{} min ago", s / 60),
        s => format!("{} h ago", s / 3600),
    }
}

/// What `show-thumbprint` adds about a rotation, if any.
pub(crate) fn describe(cfg: &TentacleConfig) -> Option<(String, serde_json::Value)> {
    let s = RotationState::load(&cfg.tentacle.home).ok().flatten()?;
    let trusted = cfg.trusted_thumbprints();
    let waiting: Vec<String> = s
        .waiting_for(&trusted)
        .iter()
        .map(ToString::to_string)
        .collect();
    let text = if s.switched() {
        format!(
            "rotated from {} {} ({} server(s) accepted)",
            s.previous_thumbprint,
            ago(s.switched_at_ms.unwrap_or_default()),
            s.accepted_by.len()
        )
    } else {
        format!(
            "rotating to {} (staged {}); accepted by {} server(s), waiting for {}",
            s.next_thumbprint,
            ago(s.started_at_ms),
            s.accepted_by.len(),
            if waiting.is_empty() {
                "none".to_string()
            } else {
                waiting.join(", ")
            }
        )
    };
    let json = serde_json::json!({
        "previous_thumbprint": s.previous_thumbprint,
        "next_thumbprint": s.next_thumbprint,
        "switched": s.switched(),
        "accepted_by": s.accepted_by,
        "waiting_for": if s.switched() { Vec::new() } else { waiting },
    });
    Some((text, json))
}

/// The agent's half of rotation.
pub(crate) struct AgentRotation {
    home: PathBuf,
    config_path: PathBuf,
    trust: TrustStore,
    staged: watch::Sender<Option<Thumbprint>>,
    comms: std::sync::OnceLock<TentacleComms>,
    /// One acceptance or switch at a time.
    busy: tokio::sync::Mutex<()>,
}

impl AgentRotation {
    pub(crate) fn new(home: &Path, config_path: &Path, trust: TrustStore) -> Arc<Self> {
        Arc::new(Self {
            home: home.to_path_buf(),
            config_path: config_path.to_path_buf(),
            trust,
            staged: watch::Sender::new(None),
            comms: std::sync::OnceLock::new(),
            busy: tokio::sync::Mutex::new(()),
        })
    }

    /// The comms to switch when the time comes (set once, after they exist).
    pub(crate) fn attach(&self, comms: TentacleComms) {
        let _ = self.comms.set(comms);
    }

    /// Reads the state file and acts on it: offers a staged certificate,
    /// switches when it may (e.g. forced, or the last acceptance came while
    /// the agent was stopped), and makes the configuration name the new
    /// certificate after a switch (again, if something overwrote it).
    pub(crate) async fn sync(&self) {
        let _busy = self.busy.lock().await;
        if let Err(e) = self.sync_locked() {
            error!("certificate rotation: {e:#}");
        }
    }

    fn sync_locked(&self) -> anyhow::Result<()> {
        let Some(comms) = self.comms.get() else {
            return Ok(());
        };
        let state = RotationState::load(&self.home).map_err(anyhow::Error::msg)?;
        let Some(state) = state else {
            self.staged.send_replace(None);
            return Ok(());
        };
        let Some(next) = state.next() else {
            bail!(
                "the staged thumbprint {} is not a thumbprint",
                state.next_thumbprint
            );
        };
        if state.switched() {
            self.staged.send_replace(None);
            return self.point_config_at(&state, comms);
        }
        if comms.thumbprint() == next {
            // The configuration was switched, the state not (a stop between).
            self.staged.send_replace(None);
            return self.mark_switched();
        }
        if comms.thumbprint().to_string() != state.previous_thumbprint {
            // Staged for another certificate than the one presented (replaced
            // by hand meanwhile): nothing to offer.
            self.staged.send_replace(None);
            return Ok(());
        }
        if self.staged.send_if_modified(|s| {
            let changed = *s != Some(next);
            *s = Some(next);
            changed
        }) {
            info!(
                "offering certificate {next} to every connected server (rotation from {})",
                state.previous_thumbprint
            );
        }
        if state.should_switch(&self.trust.snapshot()) {
            self.switch(comms)?;
        }
        Ok(())
    }

    /// Presents the staged certificate from now on.
    /// The configuration names the new certificate before the state says
    /// "switched", so whoever sees the switch (the command, `show-thumbprint`)
    /// finds the new certificate configured; a stop between the two is
    /// finished by [`Self::sync`] at the next start.
    fn switch(&self, comms: &TentacleComms) -> anyhow::Result<()> {
        let state = RotationState::load(&self.home)
            .map_err(anyhow::Error::msg)?
            .context("no rotation staged")?;
        let next = Identity::load(&state.next_certificate, &state.next_private_key)
            .context("loading the staged certificate")?;
        self.point_config_at(&state, comms)?;
        self.mark_switched()?;
        self.staged.send_replace(None);
        comms.switch_identity(next);
        Ok(())
    }

    fn mark_switched(&self) -> anyhow::Result<()> {
        update_state(&self.home, |state| {
            let s = state.as_mut().context("no rotation staged")?;
            if s.switched_at_ms.is_none() {
                s.switched_at_ms = Some(now_ms());
            }
            Ok(())
        })
    }

    /// Makes the configuration file name the new certificate (unless someone
    /// has since put yet another one there) and removes the old files.
    fn point_config_at(&self, state: &RotationState, comms: &TentacleComms) -> anyhow::Result<()> {
        let mut cfg = TentacleConfig::load(&self.config_path)?;
        if cfg.tentacle.certificate == state.next_certificate {
            return Ok(());
        }
        let configured = Identity::load(&cfg.tentacle.certificate, &cfg.tentacle.private_key).ok();
        if configured.map(|i| i.thumbprint().to_string()).as_deref()
            != Some(state.previous_thumbprint.as_str())
        {
            // Replaced by hand (`new-certificate`, `import-certificate`): theirs wins.
            return Ok(());
        }
        let (old_cert, old_key) = (
            cfg.tentacle.certificate.clone(),
            cfg.tentacle.private_key.clone(),
        );
        cfg.tentacle.certificate = state.next_certificate.clone();
        cfg.tentacle.private_key = state.next_private_key.clone();
        cfg.save(&self.config_path)?;
        for old in [old_cert, old_key] {
            if let Err(e) = std::fs::remove_file(&old) {
                warn!("removing the old certificate file {}: {e}", old.display());
            }
        }
        info!(
            "configuration {} now names certificate {} ({})",
            self.config_path.display(),
            state.next_thumbprint,
            state.next_certificate.display()
        );
        let _ = comms;
        Ok(())
    }
}

#[tonic::async_trait]
impl TentacleRotation for AgentRotation {
    fn staged(&self) -> watch::Receiver<Option<Thumbprint>> {
        self.staged.subscribe()
    }

    async fn accepted(
        &self,
        next: Thumbprint,
        server: Vec<Thumbprint>,
    ) -> Result<Vec<Thumbprint>, String> {
        let _busy = self.busy.lock().await;
        let trusted = self.trust.snapshot();
        let state = update_state(&self.home, |state| {
            let s = state
                .as_mut()
                .context("this tentacle has no certificate rotation staged")?;
            if s.switched() {
                return Ok(s.clone());
            }
            if s.record_acceptance(&next, &server)
                .map_err(anyhow::Error::msg)?
            {
                info!(
                    "the server {} accepted certificate {next}",
                    server.first().map(ToString::to_string).unwrap_or_default()
                );
            }
            Ok(s.clone())
        })
        .map_err(|e| format!("{e:#}"))?;
        if state.should_switch(&trusted) {
            if let Some(comms) = self.comms.get() {
                self.switch(comms).map_err(|e| format!("{e:#}"))?;
            }
            return Ok(Vec::new());
        }
        Ok(if state.switched() {
            Vec::new()
        } else {
            state.waiting_for(&trusted)
        })
    }

    async fn trust_server(&self, current: Thumbprint, next: Thumbprint) -> Result<bool, String> {
        let _busy = self.busy.lock().await;
        let mut cfg = TentacleConfig::load(&self.config_path).map_err(|e| e.to_string())?;
        let added = cfg.trust(next);
        let mut pinned = false;
        for p in &mut cfg.polling_servers {
            if p.thumbprint == current.to_string() {
                p.rotating_to = Some(next.to_string());
                pinned = true;
            }
        }
        if added || pinned {
            cfg.save(&self.config_path).map_err(|e| e.to_string())?;
        }
        self.trust.trust(next);
        info!("trusting server certificate {next} beside {current}, as that server asked");
        Ok(added)
    }
}
