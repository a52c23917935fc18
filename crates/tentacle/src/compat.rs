//! The original Tentacle's command-line conventions, mapped onto this parser.
//!
//! Automation written for the original (its documented Linux scripts, its
//! command-line reference, its container) runs unchanged because the
//! arguments are rewritten before clap sees them:
//!
//! - command names in any letter case (`Register-With`), and option names in
//!   any letter case (`--workerPool` = `--workerpool` = `--worker-pool`'s
//!   alias, `--apikey` = `--apiKey`), with `--name=value`, `--name:value` or
//!   `--name value`, and a single dash for long names (`-instance X`);
//! - values of options with a fixed set of values in any case
//!   (`--format="JSON"`, `--comms-style tentacleactive`);
//! - the original's host options, accepted on every command and dropped:
//!   `--console`, `--noninteractive`, `--nologo`, `--noconsolelogging`,
//!   `--monitorMutex VALUE`;
//! - `--` ends the options; what follows is passed on untouched.
//!
//! Boolean options that take a value (`--noListen True|False`,
//! `--proxyEnable "true"`) are declared so in the command definitions with
//! [`parse_bool`]. The command definitions are read from clap, so a command or
//! option added later gets the same treatment without a change here.

use std::ffi::OsString;

use clap::{Arg, Command};

/// Host options of the original that change nothing here.
const DROPPED_SWITCHES: &[&str] = &["console", "noninteractive", "nologo", "noconsolelogging"];
/// The same, with a value.
const DROPPED_WITH_VALUE: &[&str] = &["monitormutex"];

/// A boolean value as the original accepts it (`True`/`False` in any case,
/// surrounding blanks ignored), plus the usual `yes`/`no`, `on`/`off`, `1`/`0`.
pub(crate) fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "y" | "on" | "1" => Ok(true),
        "false" | "no" | "n" | "off" | "0" => Ok(false),
        _ => Err(format!("'{s}' is not a boolean: use True or False")),
    }
}

/// The option of `cmd` (or, failing that, of `root`: global options) whose long
/// name or alias equals `name` ignoring case; with the spelling to pass on.
fn find_long<'c>(cmd: &'c Command, root: &'c Command, name: &str) -> Option<(&'c Arg, String)> {
    for c in [cmd, root] {
        for arg in c.get_arguments() {
            let Some(long) = arg.get_long() else {
                continue;
            };
            if long.eq_ignore_ascii_case(name) {
                return Some((arg, long.to_string()));
            }
            if let Some(alias) = arg
                .get_all_aliases()
                .into_iter()
                .flatten()
                .find(|a| a.eq_ignore_ascii_case(name))
            {
                return Some((arg, alias.to_string()));
            }
        }
    }
    None
}

/// The subcommand of `root` named (or aliased) `name`, ignoring case.
fn find_command<'c>(root: &'c Command, name: &str) -> Option<&'c Command> {
    root.get_subcommands().find(|c| {
        c.get_name().eq_ignore_ascii_case(name)
            || c.get_all_aliases().any(|a| a.eq_ignore_ascii_case(name))
    })
}

/// `value` as the option's listed value it equals ignoring case, else unchanged.
fn canonical_value(arg: &Arg, value: &str) -> String {
    arg.get_possible_values()
        .iter()
        .find(|p| p.matches(value.trim(), true))
        .map_or_else(|| value.to_string(), |p| p.get_name().to_string())
}

/// Whether the option always takes the next argument as its value (when no
/// value came inline).
fn needs_value(arg: &Arg) -> bool {
    arg.get_action().takes_values() && arg.get_num_args().is_none_or(|n| n.min_values() > 0)
}

/// Rewrites `args` (program name first) into the spellings `root` declares
/// (see the module documentation). Arguments it does not recognise are passed
/// on unchanged, for clap to report.
pub(crate) fn normalise(args: Vec<OsString>, root: &Command) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut args = args.into_iter();
    out.extend(args.next());
    let mut sub: Option<&Command> = None;
    // The option before takes this argument as its value.
    let mut value_of: Option<&Arg> = None;
    let mut skip_value = false;
    while let Some(arg) = args.next() {
        let Some(text) = arg.to_str() else {
            out.push(arg);
            value_of = None;
            continue;
        };
        if skip_value {
            skip_value = false;
            continue;
        }
        if let Some(of) = value_of.take() {
            out.push(canonical_value(of, text).into());
            continue;
        }
        if text == "--" {
            out.push(arg);
            out.extend(args.by_ref());
            break;
        }
        let body = text
            .strip_prefix("--")
            .or_else(|| text.strip_prefix('-').filter(|b| b.len() > 1));
        if let Some(body) = body {
            let cmd = sub.unwrap_or(root);
            // NAME=VALUE, or NAME:VALUE when NAME is an option here.
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => match body.split_once(':') {
                    Some((n, v)) if find_long(cmd, root, n).is_some() => (n, Some(v)),
                    _ => (body, None),
                },
            };
            let lower = name.to_ascii_lowercase();
            if DROPPED_SWITCHES.contains(&lower.as_str()) {
                continue;
            }
            if DROPPED_WITH_VALUE.contains(&lower.as_str()) {
                skip_value = inline.is_none();
                continue;
            }
            let single_dash = !text.starts_with("--");
            match find_long(cmd, root, name) {
                Some((def, spelling)) => {
                    let mut rewritten = format!("--{spelling}");
                    match inline {
                        Some(v) => {
                            rewritten.push('=');
                            rewritten.push_str(&canonical_value(def, v));
                        }
                        None if needs_value(def) => value_of = Some(def),
                        None => {
                            // An optional value (`--noListen False`) follows
                            // unless the next argument is an option.
                        }
                    }
                    out.push(rewritten.into());
                }
                // A short option (`-b`, `-uadmin`) or something unknown.
                None if single_dash => out.push(arg),
                None => out.push(arg),
            }
            continue;
        }
        if sub.is_none() {
            if let Some(c) = find_command(root, text) {
                out.push(c.get_name().into());
                sub = Some(c);
                continue;
            }
        }
        out.push(arg);
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::{ArgAction, CommandFactory, Parser, Subcommand, ValueEnum};

    #[derive(Parser, Debug)]
    struct Cli {
        #[arg(long, global = true, default_value = "Tentacle")]
        instance: String,
        #[command(subcommand)]
        command: Sub,
    }

    #[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
    enum Format {
        Text,
        Json,
    }

    #[derive(Subcommand, Debug)]
    enum Sub {
        RegisterWorker {
            #[arg(long, alias = "workerpool")]
            worker_pool: Vec<String>,
            #[arg(long, alias = "apiKey")]
            api_key: Option<String>,
        },
        Configure {
            #[arg(long, alias = "noListen", num_args = 0..=1, default_missing_value = "true", value_parser = parse_bool)]
            no_listen: Option<bool>,
            #[arg(long, alias = "resetTrust", action = ArgAction::SetTrue)]
            reset_trust: bool,
            #[arg(long)]
            port: Option<u16>,
        },
        Version {
            #[arg(long, value_enum)]
            format: Option<Format>,
        },
    }

    fn parse(args: &[&str]) -> Cli {
        let cmd = Cli::command();
        let mut all: Vec<OsString> = vec!["tentacle".into()];
        all.extend(args.iter().map(OsString::from));
        let n = normalise(all, &cmd);
        Cli::try_parse_from(n).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    #[test]
    fn original_spellings_parse() {
        let c = parse(&[
            "Register-Worker",
            "--workerPool",
            "Default Worker Pool",
            "--WorkerPool=Second",
            "--apikey:API-1",
            "--console",
            "-instance",
            "Web",
            "--monitorMutex",
            "x",
            "--noninteractive",
        ]);
        assert_eq!(c.instance, "Web");
        match c.command {
            Sub::RegisterWorker {
                worker_pool,
                api_key,
            } => {
                assert_eq!(worker_pool, ["Default Worker Pool", "Second"]);
                assert_eq!(api_key.as_deref(), Some("API-1"));
            }
            other => panic!("{other:?}"),
        }
        for (args, want) in [
            (
                &["configure", "--noListen", "False", "--reset-trust"][..],
                Some(false),
            ),
            (
                &["configure", "--noListen", " True ", "--port", "10933"][..],
                Some(true),
            ),
            (&["configure", "--nolisten=true"][..], Some(true)),
            (
                &["configure", "--noListen", "--reset-trust"][..],
                Some(true),
            ),
            (&["configure", "--reset-trust"][..], None),
        ] {
            match parse(args).command {
                Sub::Configure { no_listen, .. } => assert_eq!(no_listen, want, "{args:?}"),
                other => panic!("{other:?}"),
            }
        }
        match parse(&["version", "--format=JSON"]).command {
            Sub::Version { format } => assert_eq!(format, Some(Format::Json)),
            other => panic!("{other:?}"),
        }
        match parse(&["VERSION", "--format", "Json"]).command {
            Sub::Version { format } => assert_eq!(format, Some(Format::Json)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn values_and_the_end_of_options_are_left_alone() {
        let cmd = Cli::command();
        let args: Vec<OsString> = [
            "tentacle",
            "register-worker",
            "--workerpool",
            "--Console",
            "--",
            "--APIKEY",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let n: Vec<String> = normalise(args, &cmd)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            n,
            [
                "tentacle",
                "register-worker",
                "--workerpool",
                "--Console",
                "--",
                "--APIKEY"
            ]
        );
    }

    #[test]
    fn booleans() {
        for t in ["True", "true", " TRUE ", "yes", "1"] {
            assert_eq!(parse_bool(t), Ok(true), "{t}");
        }
        for f in ["False", "false", "\tfalse", "no", "0"] {
            assert_eq!(parse_bool(f), Ok(false), "{f}");
        }
        assert!(parse_bool("maybe").unwrap_err().contains("True or False"));
    }
}
