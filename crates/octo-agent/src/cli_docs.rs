//! Man pages and shell completions generated from a command-line definition
//! (both binaries' hidden `generate-docs` command, which `scripts/package.sh`
//! runs): `man/NAME.1` and one page per subcommand (`NAME-SUB.1`), and
//! `completions/NAME.bash`, `_NAME` (zsh) and `NAME.fish`.

use std::path::Path;

/// Writes the man pages and completions of `cmd` under `out`.
pub fn generate(cmd: clap::Command, out: &Path) -> std::io::Result<()> {
    let man = out.join("man");
    let completions = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    let mut cmd = cmd;
    cmd.build();
    write_man(&cmd, cmd.get_name(), &man)?;
    let name = cmd.get_name().to_string();
    for (shell, file) in [
        (clap_complete::Shell::Bash, format!("{name}.bash")),
        (clap_complete::Shell::Zsh, format!("_{name}")),
        (clap_complete::Shell::Fish, format!("{name}.fish")),
    ] {
        let mut f = std::fs::File::create(completions.join(file))?;
        clap_complete::generate(shell, &mut cmd, name.clone(), &mut f);
    }
    Ok(())
}

/// The page of `cmd` (named `page`), then of each visible subcommand.
fn write_man(cmd: &clap::Command, page: &str, dir: &Path) -> std::io::Result<()> {
    let named = cmd.clone().name(page.to_string());
    let mut buf = Vec::new();
    clap_mangen::Man::new(named).render(&mut buf)?;
    std::fs::write(dir.join(format!("{page}.1")), buf)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        write_man(sub, &format!("{page}-{}", sub.get_name()), dir)?;
    }
    Ok(())
}
