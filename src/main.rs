use std::process::ExitCode;

use clap::Parser;
use edgeferry::cli::{Cli, Command, EXIT_CONFIG, EXIT_FAILURE, EXIT_USAGE};
use edgeferry::config::Config;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            // One line: clap's message (its lines joined), without the usage block.
            let text = e.render().to_string();
            let line = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more"))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            return fail(EXIT_USAGE, line.trim_start_matches("error: "));
        }
    };
    match cli.command {
        Command::Passwd {
            file,
            user,
            delete,
            password_stdin,
        } => match edgeferry::cli::passwd::run(&file, &user, delete, password_stdin) {
            Ok(()) => ExitCode::SUCCESS,
            Err(line) => fail(EXIT_FAILURE, &line),
        },
        Command::Queue { config, json, op } => {
            let config = match load(&config) {
                Ok(c) => c,
                Err(line) => return fail(EXIT_CONFIG, &line),
            };
            match edgeferry::cli::queue::run(&config.store.path, json, op) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e.exit_code(), &e.to_string()),
            }
        }
        Command::Check { config } => match load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(line) => fail(EXIT_CONFIG, &line),
        },
        Command::Run { config: path } => {
            // Validate before starting anything, exactly as `check` does.
            let config = match load(&path) {
                Ok(c) => c,
                Err(line) => return fail(EXIT_CONFIG, &line),
            };
            edgeferry::telemetry::init_logging(&config.telemetry.log_level);
            edgeferry::telemetry::install_panic_hook();
            // One thread for all async work (ingress, forwarder, serial ports, telemetry): the
            // hot path is I/O readiness and hand-offs between tasks, which on one thread are
            // plain function calls instead of cross-thread wakeups (context switches). SQLite
            // has its own thread; CPU-heavy work (PBKDF2) goes to the blocking pool.
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => return fail(EXIT_FAILURE, &format!("cannot start runtime: {e}")),
            };
            let result = runtime.block_on(async {
                // First, before anything starts: a SIGTERM from here on is a clean stop.
                let shutdown = edgeferry::service::signals();
                edgeferry::service::run(config, shutdown).await
            });
            // rumqttd's threads never end by themselves; do not wait for them.
            runtime.shutdown_timeout(std::time::Duration::from_millis(200));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e.exit_code(), &e.to_string()),
            }
        }
    }
}

/// Parse and validate, including the TLS files (so `check` catches a bad certificate).
fn load(path: &std::path::Path) -> Result<Config, String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    edgeferry::ingest::security::check_files(&config.local)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if config.upstream.tls {
        edgeferry::forward::client::tls_config(&config)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(config)
}

fn fail(code: i32, line: &str) -> ExitCode {
    eprintln!("edgeferry: {line}");
    ExitCode::from(code as u8)
}
