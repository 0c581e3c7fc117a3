//! How FoundationDB errors become [`StoreError`]s.
//!
//! The rule lives here, apart from `fdb.rs`, so that it is compiled and tested without the `fdb`
//! feature: the tests of the backend itself need `libfdb_c` to link, which most machines that
//! build Courier do not have. The backend asks FoundationDB's own error predicates
//! (`is_maybe_committed`, `is_retryable_not_committed`), which know every code of the client
//! library in use, and passes the answers in.

// Without the `fdb` feature only the tests below call this module.
#![cfg_attr(not(feature = "fdb"), allow(dead_code))]

use super::StoreError;

/// `transaction_timed_out`: the transaction's timeout option fired.
pub(crate) const TRANSACTION_TIMED_OUT: i32 = 1031;

/// Where in a transaction an error was reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FdbPhase {
    /// Before the commit was sent (reads, the owner check, starting a transaction): nothing
    /// can have been written.
    Read,
    /// While committing: the writes may have landed unless the error says otherwise.
    Commit,
}

/// FoundationDB's verdict on one error, as its error predicates give it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FdbVerdict<'a> {
    pub code: i32,
    pub message: &'a str,
    /// `is_maybe_committed`: `commit_unknown_result` (1021), `cluster_version_changed` (1039).
    pub maybe_committed: bool,
    /// `is_retryable_not_committed`: `not_committed` (1020), `transaction_too_old` (1007),
    /// `future_version` (1009), `process_behind` (1037), `tag_throttled` (1213), and others.
    pub retryable_not_committed: bool,
}

/// Maps one FoundationDB error onto the store's error kinds.
///
/// - Maybe committed, or timed out while committing: [`StoreError::CommitUnknown`]. The
///   Committer retries and the dedupe record makes the retry idempotent.
/// - Retryable and not committed, or maybe committed or timed out before the commit was sent
///   (then nothing was written): [`StoreError::Conflict`], retried from the start.
/// - Anything else (a bad cluster file, a transaction or key too large, an unsupported API
///   version, …): [`StoreError::Io`] with FoundationDB's code and message. Not retried.
pub(crate) fn classify(verdict: FdbVerdict<'_>, phase: FdbPhase) -> StoreError {
    let timed_out = verdict.code == TRANSACTION_TIMED_OUT;
    match phase {
        FdbPhase::Commit if verdict.maybe_committed || timed_out => StoreError::CommitUnknown,
        _ if verdict.retryable_not_committed || verdict.maybe_committed || timed_out => {
            StoreError::Conflict
        }
        _ => StoreError::Io(format!(
            "foundationdb error {}: {}",
            verdict.code, verdict.message
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(
        code: i32,
        maybe_committed: bool,
        retryable_not_committed: bool,
    ) -> FdbVerdict<'static> {
        FdbVerdict {
            code,
            message: "test message",
            maybe_committed,
            retryable_not_committed,
        }
    }

    /// The table of the issue: not_committed → Conflict, commit_unknown_result and a timeout
    /// while committing → CommitUnknown, anything else → Io with the code and message. Each
    /// row gives the predicates as libfdb_c 7.1 answers them for that code.
    #[test]
    fn errors_map_onto_store_error_kinds() {
        let not_committed = verdict(1020, false, true);
        let commit_unknown = verdict(1021, true, false);
        let too_old = verdict(1007, false, true);
        let timed_out = verdict(TRANSACTION_TIMED_OUT, false, false);
        let too_large = verdict(2101, false, false);
        assert_eq!(
            classify(not_committed, FdbPhase::Commit),
            StoreError::Conflict
        );
        assert_eq!(
            classify(not_committed, FdbPhase::Read),
            StoreError::Conflict
        );
        assert_eq!(
            classify(commit_unknown, FdbPhase::Commit),
            StoreError::CommitUnknown
        );
        assert_eq!(classify(too_old, FdbPhase::Read), StoreError::Conflict);
        assert_eq!(
            classify(timed_out, FdbPhase::Commit),
            StoreError::CommitUnknown
        );
        assert_eq!(classify(timed_out, FdbPhase::Read), StoreError::Conflict);
        assert_eq!(
            classify(too_large, FdbPhase::Commit),
            StoreError::Io("foundationdb error 2101: test message".into())
        );
    }

    /// Nothing can be written before the commit is sent, so no read error is ever reported as
    /// a maybe-committed one.
    #[test]
    fn read_errors_never_claim_a_maybe_commit() {
        for code in [1007, 1009, 1020, 1021, 1031, 1037, 1039, 1213, 2101] {
            for maybe_committed in [false, true] {
                for retryable_not_committed in [false, true] {
                    let error = classify(
                        verdict(code, maybe_committed, retryable_not_committed),
                        FdbPhase::Read,
                    );
                    assert_ne!(error, StoreError::CommitUnknown, "code {code}");
                }
            }
        }
    }
}
