//! The panic that failed a test, said again after the logs its labs print
//! while unwinding. CI shows the tail of a failed run, and pages of agent
//! logs would otherwise bury the one line that says what went wrong.

use std::cell::RefCell;
use std::sync::Once;

thread_local! {
    /// The last panic on this thread (a test runs on one thread; a
    /// scenario's caught panic is replaced by the test's final one).
    static LAST: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs, once per test binary, a panic hook that remembers each
/// panic's message on its thread, then does what the default hook does.
pub(crate) fn remember() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            LAST.with(|last| *last.borrow_mut() = Some(info.to_string()));
            default(info);
        }));
    });
}

/// The last panic on this thread as a closing block for a failure dump
/// (ending in a newline), or nothing when none was remembered.
pub(crate) fn recap() -> String {
    LAST.with(|last| last.borrow().clone())
        .map(|message| format!("======== the failure, again ========\n{message}\n"))
        .unwrap_or_default()
}
