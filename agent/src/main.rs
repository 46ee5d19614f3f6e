//! `cloudpass-agent`: the injected credential sidecar. Without a subcommand it runs until
//! SIGTERM; `cloudpass-agent probe --wait` is its postStart hook.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use cloudpass_agent::{
    health, run,
    settings::{Args, Command},
};
use cloudpass_cli::termination;
use tracing::error;

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Probe { port, timeout, wait }) = &args.command {
        let port = match port {
            Some(p) => *p,
            None => match args.run.agent_config() {
                Ok(config) => config.health_port,
                Err(e) => {
                    eprintln!("probe: {e}");
                    return ExitCode::FAILURE;
                }
            },
        };
        return match health::wait_ready(port, timeout.as_std(), wait.as_std()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("probe: not ready: {e}");
                ExitCode::FAILURE
            }
        };
    }

    args.log.init();
    let settings = match args.run.into_settings() {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    // One thread is plenty for a sidecar serving loopback clients, and keeps memory low.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(settings, termination())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "agent failed");
            ExitCode::FAILURE
        }
    }
}
