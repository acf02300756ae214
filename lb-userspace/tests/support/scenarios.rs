//! Named sub-scenarios of one test on one topology: a failing one is
//! recorded and the next one still runs (each sets up the manifests it
//! needs), so that one run reports every failing behaviour; `finish` then
//! fails the test with the list.

use std::panic::AssertUnwindSafe;

#[derive(Default)]
pub(crate) struct Scenarios {
    passed: Vec<String>,
    failed: Vec<String>,
}

impl Scenarios {
    /// Runs SCENARIO, recording whether it passed.
    pub(crate) fn run(&mut self, name: &str, scenario: impl FnOnce()) {
        eprintln!("---- scenario: {name}");
        match std::panic::catch_unwind(AssertUnwindSafe(scenario)) {
            Ok(()) => {
                eprintln!("---- passed: {name}");
                self.passed.push(name.to_owned());
            }
            Err(payload) => {
                let message = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "(no message)".to_owned());
                eprintln!("---- FAILED: {name}");
                self.failed.push(format!("{name}: {message}"));
            }
        }
    }

    /// Fails the test if any scenario failed.
    pub(crate) fn finish(self) {
        eprintln!("{} scenarios passed: {:#?}", self.passed.len(), self.passed);
        assert!(
            self.failed.is_empty(),
            "{} of {} scenarios failed:\n{}",
            self.failed.len(),
            self.failed.len() + self.passed.len(),
            self.failed.join("\n\n")
        );
    }
}
