//! What a failed call says about the peer: could it be reached at all?
//!
//! Every crate that talks tonic to another node sorts failures the same way: a peer that could
//! not be reached (connection refused or lost, a stream cut, a call past its deadline) is
//! skipped or retried, while a peer that answered with an error status has refused the call and
//! is not retried. This module holds the one list of codes that mean "not reached".

/// Whether a call that failed with `code` means the peer could not be reached, as opposed to
/// the peer answering with an error.
///
/// `UNAVAILABLE` (connect failure, connection lost), `DEADLINE_EXCEEDED`, `CANCELLED` (the
/// stream was torn down) and `UNKNOWN` (tonic's code for a transport error it cannot name, such
/// as a reset HTTP/2 stream) are unreachable; every other code is the peer's answer.
#[must_use]
pub fn is_unreachable_code(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
    )
}

/// Whether a call's `status` means the peer could not be reached; see [`is_unreachable_code`].
#[must_use]
pub fn is_unreachable(status: &tonic::Status) -> bool {
    is_unreachable_code(status.code())
}

#[cfg(test)]
mod tests {
    use tonic::{Code, Status};

    use super::*;

    #[test]
    fn transport_failures_are_unreachable() {
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Cancelled,
            Code::Unknown,
        ] {
            assert!(is_unreachable_code(code), "{code:?}");
            assert!(is_unreachable(&Status::new(code, "x")), "{code:?}");
        }
    }

    #[test]
    fn a_peers_answer_is_not_unreachable() {
        for code in [
            Code::Ok,
            Code::InvalidArgument,
            Code::NotFound,
            Code::AlreadyExists,
            Code::PermissionDenied,
            Code::ResourceExhausted,
            Code::FailedPrecondition,
            Code::Aborted,
            Code::OutOfRange,
            Code::Unimplemented,
            Code::Internal,
            Code::DataLoss,
            Code::Unauthenticated,
        ] {
            assert!(!is_unreachable_code(code), "{code:?}");
            assert!(!is_unreachable(&Status::new(code, "x")), "{code:?}");
        }
    }
}
