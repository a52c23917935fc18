//! `octopus policy`: the space's machine policies (health check timing, and
//! whether health checks keep tentacles up to date).

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use octo_api_types::{MachinePolicy, TentacleUpdate};
use serde_json::{Map, Value};

use super::output::{cell, fields, out, out_json, table};
use super::{decode, Cx, Output};

/// `octopus policy ...`
#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum PolicyCommand {
    /// List the space's machine policies.
    #[command(after_help = "Example:\n  octopus policy list")]
    List,
    /// Show one machine policy.
    #[command(after_help = "Example:\n  octopus policy show \"Default Machine Policy\"")]
    Show {
        /// The policy's name.
        name: String,
    },
    /// Add a machine policy (settings left out: health checks every 3600 s,
    /// 60 s timeout, 120 s polling wait, tentacle updates manual).
    #[command(
        after_help = "Example:\n  octopus policy create \"Keep up to date\" --tentacle-update always\n\nMachines take a policy when added (`octopus machine add-listening --policy NAME`,\n`tentacle register-with --policy NAME`) or changed (`PUT /api/machines/NAME`, the portal)."
    )]
    Create {
        /// The policy's name (unique in the space, compared ignoring case).
        name: String,
        #[command(flatten)]
        settings: PolicyArgs,
    },
    /// Change a machine policy's settings (those given; the rest stay).
    #[command(
        after_help = "Examples:\n  octopus policy update \"Default Machine Policy\" --tentacle-update always\n  octopus policy update \"Default Machine Policy\" --health-check-interval 900"
    )]
    Update {
        /// The policy's name.
        name: String,
        #[command(flatten)]
        settings: PolicyArgs,
    },
}

// A policy's settings on the command line: not a doc comment, which clap would make the commands' about (`ClientCommand`).
#[derive(Debug, Args)]
pub struct PolicyArgs {
    /// Seconds between scheduled health checks (60 to 2678400).
    #[arg(long, value_name = "SECONDS")]
    health_check_interval: Option<u32>,
    /// Seconds a health check may take per machine (1 to 3600).
    #[arg(long, value_name = "SECONDS")]
    health_check_timeout: Option<u32>,
    /// Seconds a request waits for a polling machine to connect (1 to 3600).
    #[arg(long, value_name = "SECONDS")]
    polling_wait: Option<u32>,
    /// Tentacle update behaviour: `manual` (only `octopus tentacle upgrade`
    /// or the portal's Upgrade button upgrade; health checks warn) or
    /// `always` (a health check that finds a tentacle older than the server's
    /// starts an upgrade task for it).
    #[arg(long, value_enum, value_name = "BEHAVIOUR")]
    tentacle_update: Option<UpdateArg>,
}

/// `--tentacle-update`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum UpdateArg {
    /// Update only when asked.
    Manual,
    /// Always keep up to date.
    Always,
}

impl PolicyArgs {
    /// The request body's settings (only those given).
    fn body(&self) -> Map<String, Value> {
        let mut m = Map::new();
        let mut put = |k: &str, v: Option<u32>| {
            if let Some(v) = v {
                m.insert(k.into(), v.into());
            }
        };
        put("health_check_interval_s", self.health_check_interval);
        put("health_check_timeout_s", self.health_check_timeout);
        put("polling_wait_s", self.polling_wait);
        if let Some(u) = self.tentacle_update {
            let u = match u {
                UpdateArg::Manual => TentacleUpdate::Manual,
                UpdateArg::Always => TentacleUpdate::Always,
            };
            m.insert("tentacle_update".into(), u.name().into());
        }
        m
    }
}

/// How a policy's tentacle update behaviour reads.
fn behaviour(u: TentacleUpdate) -> &'static str {
    match u {
        TentacleUpdate::Manual => "Manual (update only when asked)",
        TentacleUpdate::Always => "Always (health checks keep tentacles up to date)",
    }
}

impl Cx {
    pub(super) async fn policy(&self, c: PolicyCommand) -> anyhow::Result<ExitCode> {
        let c_ = &self.client;
        match c {
            PolicyCommand::List => {
                let v: Value = c_
                    .get(c_.space_url(&["machine-policies"], &[]))
                    .await
                    .context("listing machine policies")?;
                if self.output == Output::Json {
                    out_json(&v);
                    return Ok(ExitCode::SUCCESS);
                }
                let policies: Vec<MachinePolicy> = decode(v, "the machine policies")?;
                let rows: Vec<Vec<String>> = policies
                    .iter()
                    .map(|p| {
                        vec![
                            cell(&p.name).into_owned(),
                            p.health_check_interval_s.to_string(),
                            p.health_check_timeout_s.to_string(),
                            p.polling_wait_s.to_string(),
                            p.tentacle_update.name().to_string(),
                        ]
                    })
                    .collect();
                out(&table(
                    &[
                        "NAME",
                        "CHECK EVERY (S)",
                        "TIMEOUT (S)",
                        "POLLING WAIT (S)",
                        "TENTACLE UPDATE",
                    ],
                    &rows,
                ));
            }
            PolicyCommand::Show { name } => {
                let v: Value = c_
                    .get(c_.space_url(&["machine-policies"], &[]))
                    .await
                    .context("listing machine policies")?;
                let policies: Vec<MachinePolicy> = decode(v, "the machine policies")?;
                let p = policies
                    .into_iter()
                    .find(|p| p.name.eq_ignore_ascii_case(name.trim()))
                    .with_context(|| {
                        format!(
                            "machine policy '{}' does not exist in this space (`octopus policy list` shows them)",
                            cell(&name)
                        )
                    })?;
                self.print_policy(&p, None);
            }
            PolicyCommand::Create { name, settings } => {
                let mut body = settings.body();
                body.insert("name".into(), name.clone().into());
                let v: Value = c_
                    .post(
                        c_.space_url(&["machine-policies"], &[]),
                        &Value::Object(body),
                    )
                    .await
                    .with_context(|| format!("creating machine policy '{}'", cell(&name)))?;
                let p: MachinePolicy = decode(v, "the new machine policy")?;
                self.print_policy(&p, Some("Created machine policy"));
            }
            PolicyCommand::Update { name, settings } => {
                let body = settings.body();
                if body.is_empty() {
                    anyhow::bail!(
                        "nothing to change: give --health-check-interval, --health-check-timeout, --polling-wait or --tentacle-update"
                    );
                }
                let v: Value = c_
                    .put(
                        c_.space_url(&["machine-policies", &name], &[]),
                        &Value::Object(body),
                    )
                    .await
                    .with_context(|| format!("changing machine policy '{}'", cell(&name)))?;
                let p: MachinePolicy = decode(v, "the machine policy")?;
                self.print_policy(&p, Some("Changed machine policy"));
            }
        }
        Ok(ExitCode::SUCCESS)
    }

    fn print_policy(&self, p: &MachinePolicy, sentence: Option<&str>) {
        if self.output == Output::Json {
            return out_json(p);
        }
        if let Some(s) = sentence {
            out(&format!("{s} '{}'.", cell(&p.name)));
        }
        out(&fields(&[
            ("Name", p.name.clone()),
            (
                "Health checks every",
                format!("{} s", p.health_check_interval_s),
            ),
            (
                "Health check timeout",
                format!("{} s", p.health_check_timeout_s),
            ),
            ("Polling wait", format!("{} s", p.polling_wait_s)),
            ("Tentacle update", behaviour(p.tentacle_update).to_string()),
        ]));
    }
}
