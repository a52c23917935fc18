//! `tentacle setup`: the interactive wizard. Reads one answer per line, so it works
//! at a terminal and with answers piped in. An empty answer takes the default.

use std::io::{BufRead, Write};

use anyhow::{bail, Context};
use octo_agent::config::{PollingServer, DEFAULT_PORT};
use octo_agent::instances::{Registry, DEFAULT_INSTANCE};
use octo_tls::Thumbprint;

use crate::{
    create_instance, load_identity, new_certificate, new_subscription_id, normalise_server_address,
    Target,
};

struct Prompter<R, W> {
    input: R,
    out: W,
}

impl<R: BufRead, W: Write> Prompter<R, W> {
    /// Asks until `parse` accepts an answer (3 tries).
    fn ask<T>(
        &mut self,
        question: &str,
        default: Option<&str>,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> anyhow::Result<T> {
        for _ in 0..3 {
            match default {
                Some(d) => write!(self.out, "{question} [{d}]: ")?,
                None => write!(self.out, "{question}: ")?,
            }
            self.out.flush()?;
            let mut line = String::new();
            if self.input.read_line(&mut line)? == 0 {
                writeln!(self.out)?;
                bail!("setup needs an answer to \"{question}\" but the input ended");
            }
            let answer = line.trim();
            let answer = if answer.is_empty() {
                default.unwrap_or("")
            } else {
                answer
            };
            match parse(answer) {
                Ok(v) => return Ok(v),
                Err(e) => writeln!(self.out, "  {e}")?,
            }
        }
        bail!("no valid answer to \"{question}\" after 3 tries")
    }
}

enum Style {
    Listening,
    Polling,
}

pub(crate) fn run<R: BufRead, W: Write>(input: R, out: &mut W) -> anyhow::Result<()> {
    let mut p = Prompter { input, out };
    writeln!(p.out, "Tentacle setup. Press Enter to take the [default].")?;
    let name = p.ask("Instance name", Some(DEFAULT_INSTANCE), |a| {
        Registry::check_name(a)
            .map(|()| a.to_string())
            .map_err(|e| e.to_string())
    })?;
    let style = p.ask(
        "Communication style: 'listening' (the server connects to this machine) or 'polling' (this machine connects to the server)",
        Some("listening"),
        |a| match a.to_ascii_lowercase().as_str() {
            "l" | "listen" | "listening" | "1" => Ok(Style::Listening),
            "p" | "poll" | "polling" | "2" => Ok(Style::Polling),
            _ => Err("answer 'listening' or 'polling'".into()),
        },
    )?;
    let (port, listen_ip, server) = match style {
        Style::Listening => {
            let port = p.ask("Port to listen on", Some(&DEFAULT_PORT.to_string()), |a| {
                a.parse::<u16>()
                    .map_err(|_| format!("'{a}' is not a port number (1-65535)"))
            })?;
            let ip = p.ask("Address to listen on", Some("0.0.0.0"), |a| {
                a.parse::<std::net::IpAddr>()
                    .map(|_| a.to_string())
                    .map_err(|_| format!("'{a}' is not an IP address"))
            })?;
            (Some(port), Some(ip), None)
        }
        Style::Polling => {
            let server = p.ask(
                "Octopus server's polling address (HOST[:PORT], default port 10943)",
                None,
                |a| normalise_server_address(a).map_err(|e| e.to_string()),
            )?;
            (None, None, Some(server))
        }
    };
    let thumbprint = p.ask(
        "Thumbprint of the Octopus server to trust (`octopus server show-thumbprint` prints it)",
        None,
        |a| a.parse::<Thumbprint>().map_err(|e| e.to_string()),
    )?;

    let registry = Registry::locate();
    let target = match registry.get(&name) {
        Ok(inst) => {
            writeln!(p.out, "Instance '{name}' exists; reconfiguring it.")?;
            Target {
                name: inst.name,
                config_path: inst.config,
                explicit_config: false,
            }
        }
        Err(_) => create_instance(&name, None, None, None)?,
    };
    new_certificate(&target, true)?;
    let mut cfg = target.load()?;
    match &style {
        Style::Listening => {
            cfg.listen.enabled = true;
            cfg.listen.port = port.unwrap_or(DEFAULT_PORT);
            cfg.listen.address = listen_ip.unwrap_or_else(|| "0.0.0.0".into());
            cfg.trust(thumbprint);
        }
        Style::Polling => {
            let address = server.context("server address")?;
            cfg.listen.enabled = false;
            let subscription_id = cfg
                .polling_servers
                .iter()
                .find(|s| s.address == address)
                .map_or_else(new_subscription_id, |s| s.subscription_id.clone());
            cfg.polling_servers.retain(|s| s.address != address);
            cfg.polling_servers.push(PollingServer {
                address,
                thumbprint: thumbprint.to_string(),
                subscription_id,
                connections: 1,
                connect_to: None,
                rotating_to: None,
            });
        }
    }
    cfg.save(&target.config_path)?;
    let identity = load_identity(&cfg)?;

    writeln!(p.out)?;
    writeln!(
        p.out,
        "Done. Instance '{name}' ({})",
        target.config_path.display()
    )?;
    writeln!(
        p.out,
        "  this tentacle's thumbprint: {}",
        identity.thumbprint()
    )?;
    writeln!(p.out, "  trusts server:              {thumbprint}")?;
    match style {
        Style::Listening => {
            writeln!(
                p.out,
                "  listens on:                 {}:{}",
                cfg.listen.address, cfg.listen.port
            )?;
            writeln!(
                p.out,
                "On the server, add it with: octopus machine add-listening --url https://THIS-HOST:{}/ --thumbprint {} ...",
                cfg.listen.port,
                identity.thumbprint()
            )?;
        }
        Style::Polling => {
            if let Some(s) = cfg.polling_servers.last() {
                writeln!(
                    p.out,
                    "  polls:                      {} as poll://{}/",
                    s.address, s.subscription_id
                )?;
            }
            writeln!(
                p.out,
                "The server must trust thumbprint {} for this subscription.",
                identity.thumbprint()
            )?;
        }
    }
    writeln!(p.out, "Next: tentacle service --instance {name} --install   (or run it in the foreground: tentacle run --instance {name})")?;
    Ok(())
}
