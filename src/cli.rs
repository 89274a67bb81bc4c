//! Command line: `edgeferry run|check --config FILE`, `edgeferry queue ...`,
//! `edgeferry passwd FILE USER`, `edgeferry --version`.

pub mod passwd;
pub mod queue;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "edgeferry",
    version,
    about = "Store-and-forward MQTT gateway: nothing committed is lost"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Run {
        /// Configuration file (TOML).
        #[arg(long, short, default_value = "/etc/edgeferry/edgeferry.toml")]
        config: PathBuf,
    },
    /// Validate a configuration file and exit: 0 when valid, 78 with a one-line error otherwise.
    Check {
        /// Configuration file (TOML).
        #[arg(long, short, default_value = "/etc/edgeferry/edgeferry.toml")]
        config: PathBuf,
    },
    /// Add or update a user in a Mosquitto-compatible password file ($7$ PBKDF2-SHA512), or
    /// delete one with -D. The file is created (mode 600) when missing.
    Passwd {
        /// Password file (local.password_file).
        file: PathBuf,
        /// User name.
        user: String,
        /// Delete the user instead.
        #[arg(short = 'D', long = "delete")]
        delete: bool,
        /// Read the password from the first line of standard input instead of prompting.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Inspect and manage the queue of the store the configuration names, while the daemon runs.
    Queue {
        /// Configuration file (TOML); its store.path is the store.
        #[arg(
            long,
            short,
            default_value = "/etc/edgeferry/edgeferry.toml",
            global = true
        )]
        config: PathBuf,
        /// Machine-readable output: one JSON document (JSON lines for peek, list and export).
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        op: queue::QueueOp,
    },
}

/// Exit status for an invalid configuration (sysexits EX_CONFIG), and for a store file that is
/// not usable as one (not a database, another program's, a newer schema, corrupt). The systemd
/// unit does not restart on it (`RestartPreventExitStatus=78`): retrying cannot fix a file.
pub const EXIT_CONFIG: i32 = 78;
/// Exit status for a run-time failure that a restart may cure (port in use, store directory not
/// mounted yet, I/O error).
pub const EXIT_FAILURE: i32 = 1;
/// Exit status for a bad command-line argument (sysexits EX_USAGE).
pub const EXIT_USAGE: i32 = 64;
/// Exit status when the store file does not exist (sysexits EX_NOINPUT).
pub const EXIT_NOINPUT: i32 = 66;
