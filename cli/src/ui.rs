//! What every command shares: logging, exit codes, sizes, progress bars, JSON reports.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// The command failed (bad input, an I/O error, a refused operation).
pub const EXIT_FAILURE: u8 = 2;
/// The command ran and its answer is "no" (`verify`: the images differ).
pub const EXIT_DIFFERENT: u8 = 1;

/// Logs go to stderr; `TIDEMARK_LOG` (an env-filter, e.g. `debug` or `tidemark_nbd=trace`)
/// chooses what is shown, warnings and errors by default.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TIDEMARK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

/// Parse a size such as `4096`, `64K`, `64KiB`, `1M`, `2G` or `1T` (binary multiples;
/// `k`/`K`/`KiB`/`KB` all mean 1024).
pub fn parse_size(text: &str) -> anyhow::Result<u64> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, suffix) = trimmed.split_at(split);
    if digits.is_empty() {
        bail!("invalid size {text:?}: expected a number with an optional K, M, G or T suffix");
    }
    let number: u64 = digits
        .parse()
        .with_context(|| format!("invalid size {text:?}"))?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => bail!("invalid size {text:?}: unknown suffix {other:?} (use K, M, G or T)"),
    };
    number
        .checked_mul(1u64 << shift)
        .with_context(|| format!("size {text:?} is too large"))
}

/// A progress bar over `total` bytes on a terminal; hidden when stderr is not a terminal,
/// so piped and scripted runs stay quiet.
pub fn byte_progress(total: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("the progress template is valid")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Print `report` as one line of JSON on stdout.
pub fn print_json<T: Serialize>(report: &T) -> anyhow::Result<()> {
    println!(
        "{}",
        serde_json::to_string(report).context("encoding the JSON report")?
    );
    Ok(())
}

/// Bytes per second as MB/s (10^6), the unit dd and fio print.
pub fn mb_per_sec(bytes: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        bytes as f64 / seconds / 1e6
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_size_accepts_binary_suffixes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("1m").unwrap(), 1 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
    }

    #[test]
    fn parse_size_rejects_garbage_and_overflow() {
        assert!(parse_size("").is_err());
        assert!(parse_size("K").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
