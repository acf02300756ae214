//! Printing an error with its causes.
//!
//! The crate's error types say what failed and keep the cause as their
//! `source()`, never also inside their own message: `anyhow`'s `{:#}` (in
//! `main`) and [`Causes`] (in log lines) print the chain, so every cause
//! appears once (a verifier log, say, is long enough that twice hurts).

use std::{error::Error, fmt};

/// Displays an error and each of its causes, `: `-joined. A cause whose text
/// is already part of what was printed (some crates repeat their source in
/// their own message) is left out.
pub struct Causes<'e>(pub &'e (dyn Error + 'static));

impl fmt::Display for Causes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = self.0.to_string();
        let mut source = self.0.source();
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            if !text.contains(&cause_text) {
                text.push_str(": ");
                text.push_str(&cause_text);
            }
            source = cause.source();
        }
        f.write_str(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("repeats: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn each_cause_once_in_order() {
        let error = Outer(Inner(std::io::Error::other("root")));
        assert_eq!(Causes(&error).to_string(), "outer: inner: root");
        let error = Repeats(std::io::Error::other("root"));
        assert_eq!(Causes(&error).to_string(), "repeats: root");
    }

    #[test]
    fn anyhow_alternate_prints_each_cause_once() {
        let error = crate::datapath::loader::LoadError::PinDir {
            path: "/sys/fs/bpf/x".into(),
            source: std::io::Error::other("denied"),
        };
        let text = format!("{:#}", anyhow::Error::new(error));
        assert_eq!(text, "cannot create pin directory /sys/fs/bpf/x: denied");
    }
}
