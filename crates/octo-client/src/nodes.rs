//! `octopus node`: the server nodes sharing the database; drain and undrain.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use octo_api_types::{Node, NodeState};
use serde_json::{json, Value};

use super::output::{cell, out, out_json, table, time};
use super::{decode, say, Cx, Output};

/// `octopus node ...`
#[derive(Debug, Subcommand)]
#[command(defer = true)]
pub enum NodeCommand {
    /// List the server nodes: state (Running, Draining, Offline), last heartbeat,
    /// task cap, and the tasks and machine steps each runs.
    #[command(after_help = "Example:\n  octopus node list")]
    List,
    /// Drain a node: it finishes what it runs and starts nothing new; its
    /// `/api/nodes/ping` answers 418, so load balancers send it no more work.
    #[command(
        after_help = "Examples:\n  octopus node drain node-2\n  octopus node drain node-2 --wait --timeout 1800   # returns once it runs nothing"
    )]
    Drain {
        /// The node's name (`octopus node list`).
        name: String,
        /// Wait until the node runs no task and no step (or is offline).
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this many seconds (exit 1).
        #[arg(
            long,
            value_name = "SECONDS",
            default_value_t = 3600,
            requires = "wait"
        )]
        timeout: u64,
    },
    /// Undrain a node: it takes tasks again, starting those that waited.
    #[command(after_help = "Example:\n  octopus node undrain node-2")]
    Undrain {
        /// The node's name (`octopus node list`).
        name: String,
    },
}

/// How often `drain --wait` asks.
const WAIT_POLL: Duration = Duration::from_secs(1);

impl Cx {
    pub(super) async fn node(&self, c: NodeCommand) -> anyhow::Result<ExitCode> {
        match c {
            NodeCommand::List => {
                let v = self.nodes().await?;
                if self.output == Output::Json {
                    out_json(&v);
                    return Ok(ExitCode::SUCCESS);
                }
                let nodes: Vec<Node> = decode(v, "the nodes")?;
                if nodes.is_empty() {
                    out("No nodes have started on this database yet.");
                } else {
                    out(&nodes_table(&nodes));
                }
                Ok(ExitCode::SUCCESS)
            }
            NodeCommand::Drain {
                name,
                wait,
                timeout,
            } => {
                let node = self.set_draining(&name, true).await?;
                if !wait {
                    self.print_node(
                        &node,
                        &format!(
                            "Node {} is draining: it finishes what it runs and starts nothing new.",
                            cell(&node.name)
                        ),
                    );
                    return Ok(ExitCode::SUCCESS);
                }
                say(
                    self.output,
                    &format!(
                        "Node {} is draining; waiting until it runs nothing...",
                        cell(&node.name)
                    ),
                );
                match self.wait_drained(&node, Duration::from_secs(timeout)).await? {
                    Some(now) => {
                        self.print_node(&now, &format!("Node {} is drained: it runs no task and no step.", cell(&now.name)));
                        Ok(ExitCode::SUCCESS)
                    }
                    None => anyhow::bail!(
                        "node {} still runs tasks after {timeout} s; it stays draining (`octopus node list` shows what it runs)",
                        cell(&node.name)
                    ),
                }
            }
            NodeCommand::Undrain { name } => {
                let node = self.set_draining(&name, false).await?;
                self.print_node(
                    &node,
                    &format!("Node {} takes tasks again.", cell(&node.name)),
                );
                Ok(ExitCode::SUCCESS)
            }
        }
    }

    async fn nodes(&self) -> anyhow::Result<Value> {
        let c_ = &self.client;
        c_.get(c_.system_url(&["nodes"], &[]))
            .await
            .context("listing the server nodes")
    }

    async fn set_draining(&self, name: &str, draining: bool) -> anyhow::Result<Node> {
        let c_ = &self.client;
        let verb = if draining { "drain" } else { "undrain" };
        let v: Value = c_
            .post(c_.system_url(&["nodes", name, verb], &[]), &json!({}))
            .await
            .with_context(|| format!("{verb}ing node '{}'", cell(name)))?;
        decode(v, "the node")
    }

    /// Polls until a heartbeat newer than `drained`'s shows no running task
    /// or step (the node applies the drain flag before it counts), or the
    /// node is offline; None after `limit`.
    async fn wait_drained(&self, drained: &Node, limit: Duration) -> anyhow::Result<Option<Node>> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let nodes: Vec<Node> = decode(self.nodes().await?, "the nodes")?;
            let now = nodes
                .into_iter()
                .find(|n| n.name.eq_ignore_ascii_case(&drained.name))
                .with_context(|| format!("node '{}' is no longer listed", cell(&drained.name)))?;
            if !now.draining {
                anyhow::bail!("node {} was undrained while waiting", cell(&now.name));
            }
            let idle = now.last_seen > drained.last_seen
                && now.running_tasks == 0
                && now.running_steps == 0;
            if idle || now.state == NodeState::Offline {
                return Ok(Some(now));
            }
            if tokio::time::Instant::now() + WAIT_POLL > deadline {
                return Ok(None);
            }
            tokio::time::sleep(WAIT_POLL).await;
        }
    }

    fn print_node(&self, node: &Node, sentence: &str) {
        if self.output == Output::Json {
            out_json(node);
        } else {
            out(sentence);
        }
    }
}

fn nodes_table(nodes: &[Node]) -> String {
    let rows: Vec<_> = nodes
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                format!("{:?}", n.state),
                time(n.last_seen),
                n.task_cap.to_string(),
                n.running_tasks.to_string(),
                n.running_steps.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "STATE",
            "LAST SEEN (UTC)",
            "TASK CAP",
            "RUNNING TASKS",
            "RUNNING STEPS",
        ],
        &rows,
    )
}
