//! `tidemark __quiesce-watchdog` (hidden): the thaw watchdog the quiesce library starts
//! before it freezes anything. It reads the freeze steps on stdin and thaws them when the
//! window limit passes or stdin closes (the process that froze them died). Not for humans;
//! see `tidemark_engine::quiesce::watchdog`.

use std::process::ExitCode;

/// Internal: thaws what a quiescing tidemark process froze if it dies or overruns.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<ExitCode> {
    let status = tidemark_engine::quiesce::watchdog::main();
    Ok(ExitCode::from(u8::try_from(status).unwrap_or(1)))
}
