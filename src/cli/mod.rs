//! The command line (clap). Only this edge uses `anyhow`.

use std::process::ExitCode;

pub fn main() -> ExitCode {
    ExitCode::SUCCESS
}
