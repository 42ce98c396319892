//! Bounds on what an agent sends, checked on every message of its stream
//! before the message costs anything: the stream's decode limit
//! ([`ferry_proto::AGENT_STREAM_MAX_MESSAGE`]) caps one message's bytes,
//! [`admit`] caps its repeated fields (a message over a cap is refused
//! whole, with a status naming the field and the limit) and cuts every
//! agent-supplied text the coordinator stores or logs to
//! [`STORED_TEXT_MAX`] bytes with a marker saying how much was cut.
//!
//! Each entry of a discovery batch is checked on its own later
//! (`WatchScope::check`: path length, shape, glob), so one bad entry does
//! not hold back the others. Pure: no IO, unit-tested below.

use ferry_proto::{agent_message::Body, task_result::Outcome};

/// Most bytes of one agent-supplied text (an error, a reason, a version)
/// that are stored or logged; the rest is cut with a marker.
pub(crate) const STORED_TEXT_MAX: usize = 4096;
/// Most transfers a `Hello` may say are still running (an agent runs at
/// most `capacity` and holds twice that).
pub(crate) const MAX_RUNNING_TASKS: usize = 4096;
/// Most entries of one discovery batch (the agent sends at most 1,000).
pub(crate) const MAX_DISCOVERY_ENTRIES: usize = 10_000;

/// A message refused whole: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub field: &'static str,
    pub message: String,
}

impl From<Refusal> for tonic::Status {
    fn from(r: Refusal) -> Self {
        tonic::Status::invalid_argument(format!("{}: {}", r.field, r.message))
    }
}

/// Checks one agent message against the caps and cuts its texts; `Err`
/// when it must not be handled at all.
pub(crate) fn admit(body: &mut Body) -> Result<(), Refusal> {
    match body {
        Body::Hello(h) => {
            cap(
                "Hello.running_tasks",
                h.running_tasks.len(),
                MAX_RUNNING_TASKS,
            )?;
            cut(&mut h.version);
            cut(&mut h.site);
        }
        Body::Heartbeat(h) => cut(&mut h.unavailable),
        Body::Discovery(b) => {
            cap(
                "DiscoveryBatch.entries",
                b.entries.len(),
                MAX_DISCOVERY_ENTRIES,
            )?;
        }
        Body::PollReport(r) => cut(&mut r.error),
        Body::TaskProgress(_) => {}
        Body::TaskResult(r) => match &mut r.outcome {
            Some(Outcome::Failure(f)) => cut(&mut f.message),
            Some(Outcome::Success(s)) => {
                for text in [
                    &mut s.sha256,
                    &mut s.etag,
                    &mut s.bucket,
                    &mut s.key,
                    &mut s.stored_announcement_id,
                ] {
                    cut(text);
                }
            }
            None => {}
        },
        Body::PostActionResult(r) => cut(&mut r.message),
        Body::HostKeyProbeResult(r) => {
            for text in [
                &mut r.request_id,
                &mut r.fingerprint,
                &mut r.key_algorithm,
                &mut r.error,
            ] {
                cut(text);
            }
        }
    }
    Ok(())
}

fn cap(field: &'static str, n: usize, max: usize) -> Result<(), Refusal> {
    if n > max {
        return Err(Refusal {
            field,
            message: format!("{n} entries in one message; at most {max}"),
        });
    }
    Ok(())
}

/// Cuts `text` to at most [`STORED_TEXT_MAX`] bytes, on a character
/// boundary, ending with a marker that names the bytes cut.
pub(crate) fn cut(text: &mut String) {
    if text.len() <= STORED_TEXT_MAX {
        return;
    }
    let total = text.len();
    // The marker's length depends on the number it carries; the total's
    // digits bound it.
    let marker_len = format!(" [... {total} bytes cut]").len();
    let mut end = STORED_TEXT_MAX - marker_len;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push_str(&format!(" [... {} bytes cut]", total - end));
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto as proto;

    #[test]
    fn long_texts_are_cut_on_a_character_boundary_with_a_marker() {
        let mut short = "fine".to_string();
        cut(&mut short);
        assert_eq!(short, "fine");

        let mut exact = "x".repeat(STORED_TEXT_MAX);
        cut(&mut exact);
        assert_eq!(exact.len(), STORED_TEXT_MAX);

        let mut long = "é".repeat(2_050_000); // 4,100,000 bytes
        cut(&mut long);
        assert!(long.len() <= STORED_TEXT_MAX, "{}", long.len());
        let kept = long.find(" [... ").unwrap();
        assert!(long.ends_with(&format!(" [... {} bytes cut]", 4_100_000 - kept)));
        assert!(long[..kept].chars().all(|c| c == 'é'));
    }

    #[test]
    fn every_stored_text_of_an_agent_message_is_cut() {
        let huge = "e\nrror".repeat(1_000_000);
        let mut body = Body::TaskResult(proto::TaskResult {
            file_id: 1,
            fencing_token: 1,
            outcome: Some(Outcome::Failure(proto::TaskFailure {
                kind: proto::FailureKind::Transient as i32,
                message: huge.clone(),
            })),
        });
        admit(&mut body).unwrap();
        let Body::TaskResult(proto::TaskResult {
            outcome: Some(Outcome::Failure(f)),
            ..
        }) = &body
        else {
            unreachable!()
        };
        assert!(f.message.len() <= STORED_TEXT_MAX);

        let mut report = Body::PollReport(proto::PollReport {
            error: huge.clone(),
            ..Default::default()
        });
        admit(&mut report).unwrap();
        let Body::PollReport(r) = &report else {
            unreachable!()
        };
        assert!(r.error.len() <= STORED_TEXT_MAX);
    }

    #[test]
    fn repeated_fields_over_their_cap_refuse_the_message() {
        let mut hello = Body::Hello(proto::Hello {
            running_tasks: vec![proto::RunningTask::default(); MAX_RUNNING_TASKS + 1],
            ..Default::default()
        });
        let refusal = admit(&mut hello).unwrap_err();
        assert_eq!(refusal.field, "Hello.running_tasks");
        assert!(
            refusal.message.contains("at most 4096"),
            "{}",
            refusal.message
        );

        let mut batch = Body::Discovery(proto::DiscoveryBatch {
            entries: vec![proto::RemoteEntry::default(); MAX_DISCOVERY_ENTRIES + 1],
            ..Default::default()
        });
        assert_eq!(
            admit(&mut batch).unwrap_err().field,
            "DiscoveryBatch.entries"
        );

        let mut at_cap = Body::Hello(proto::Hello {
            running_tasks: vec![proto::RunningTask::default(); MAX_RUNNING_TASKS],
            ..Default::default()
        });
        assert_eq!(admit(&mut at_cap), Ok(()));
    }
}
