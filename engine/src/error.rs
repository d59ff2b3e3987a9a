//! Error text with its causes. Engine errors print their own context and leave the
//! cause to `source()`, so it is read once; where an error ends up as text (an event,
//! a thaw report, a log line) [`chain`] joins the context and every cause, as anyhow's
//! `{:#}` does.

use std::error::Error;
use std::fmt::Write;

/// `err` followed by each of its sources, separated by ": ". A cause whose text the line
/// holds already (an error that still spells out its source) is not repeated.
pub fn chain(err: &dyn Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(next) = cause {
        let next_text = next.to_string();
        if !text.contains(&next_text) {
            let _ = write!(text, ": {next_text}");
        }
        cause = next.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[derive(Debug, thiserror::Error)]
    #[error("opening {path}")]
    struct Opening {
        path: &'static str,
        #[source]
        source: io::Error,
    }

    #[test]
    fn each_cause_is_printed_once_after_the_context() {
        let err = Opening {
            path: "/x",
            source: io::Error::new(io::ErrorKind::NotFound, "gone"),
        };
        assert_eq!(chain(&err), "opening /x: gone");
    }
}
