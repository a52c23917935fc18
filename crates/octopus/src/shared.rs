//! What both programs, `octopus` (`cli.rs`) and `octopus-server` (`main.rs`),
//! say the same way: the top-level help and the last error line.

/// The examples under `octopus --help`.
pub(crate) const EXAMPLES: &str = "Examples:\n  octopus server run --data /var/lib/octopus\n  export OCTOPUS_URL=http://127.0.0.1:8080 OCTOPUS_API_KEY=$(cat /var/lib/octopus/admin-api-key)\n  octopus environment create Production\n  octopus run-script --script 'uname -a' --environment Production";

/// `quickstart` in the list of commands.
pub(crate) const QUICKSTART: &str = "Start a server and two real tentacles (one listening, one polling) on 127.0.0.1, register them, run a health check and a script on both, and stop";

/// `demo` in the list of commands.
pub(crate) const DEMO: &str = "Run a server and two tentacles (one listening, one polling) in this process and show them exchanging calls over pinned mutual TLS on 127.0.0.1";

/// Prints the error that ends the program. Errors carry the server's text: no
/// control character reaches the terminal.
pub(crate) fn print_error(e: &anyhow::Error) {
    #[allow(clippy::print_stderr)]
    {
        eprintln!("error: {}", octo_client::terminal_text(&format!("{e:#}")));
    }
}
