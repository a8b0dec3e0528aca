//! The `propd` binary: `propd serve` runs a node; the other commands drive one.

use std::process::ExitCode;

use clap::Parser as _;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = propd_node::cli::Cli::parse();
    match propd_node::cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of our output went away (`propd ... | head`): nothing is left to say.
        Err(error) if propd_node::cli::is_closed_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            // One line on stderr: the error and its causes.
            let causes: Vec<String> = error.chain().map(ToString::to_string).collect();
            #[allow(clippy::print_stderr, reason = "the CLI's error line")]
            {
                eprintln!("error: {}", causes.join(": "));
            }
            ExitCode::FAILURE
        }
    }
}
