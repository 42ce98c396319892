//! The live `WatchEvents` stream and its resume tokens.
//!
//! Events are delivered window by window of finished transactions (see
//! [`files::event_horizon`]), in id order within a window, so every event is
//! delivered once even when ids commit out of order. Each event carries a
//! resume token naming its window and its id; a client that reconnects with
//! it continues right after that event: the rest of the window, then the
//! windows after it. Tokens are bound to the stream's filter like page tokens
//! ([`Listing`]). [`Cursor`] is the pure part; [`stream`] does the IO.

use std::time::Duration;

use ferry_common::validate::FieldError;
use ferry_proto as proto;
use sqlx::PgPool;
use tokio::sync::{mpsc, watch};
use tonic::Status;

use crate::convert;
use crate::error::ApiResult;
use crate::files::{self, EventWindow};
use crate::paging::Listing;

/// Events read per query.
const BATCH: usize = 1000;
/// Re-read at least this often: notifications are a hint, the read is the truth.
const REREAD: Duration = Duration::from_secs(2);

/// Which events a stream carries (`None` = any).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Filter {
    pub server_id: Option<i64>,
    pub watch_id: Option<i64>,
}

impl Filter {
    fn listing(self) -> Listing {
        let id = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_default();
        Listing::new(
            "events",
            &format!("server={};watch={}", id(self.server_id), id(self.watch_id)),
        )
    }
}

/// Where a stream stands: inside window `[from, to)` after event `after`, or
/// (with `to` unknown) at the start of the window beginning at `from`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cursor {
    pub from: String,
    pub to: Option<String>,
    pub after: i64,
}

impl Cursor {
    /// A stream of the events committed from `horizon` on.
    pub(crate) fn starting_at(horizon: String) -> Cursor {
        Cursor {
            from: horizon,
            to: None,
            after: 0,
        }
    }

    /// The cursor a resume token stands for; an empty token is `None`.
    pub(crate) fn resume(filter: Filter, token: &str) -> Result<Option<Cursor>, FieldError> {
        let invalid = |why: &str| {
            FieldError::new(
                "resume_token",
                format!(
                    "{why}; pass the resume_token of an event from a stream with the same server_id and watch_id, or none to start from now"
                ),
            )
        };
        let key = filter
            .listing()
            .start_after(token)
            .map_err(|_| invalid("is not a resume token of this stream"))?;
        let Some(key) = key else { return Ok(None) };
        let mut parts = key.split(':');
        let (Some(from), Some(to), Some(after), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid("is not a resume token of this stream"));
        };
        let (Ok(from_n), Ok(to_n), Ok(after)) =
            (from.parse::<u64>(), to.parse::<u64>(), after.parse::<i64>())
        else {
            return Err(invalid("is not a resume token of this stream"));
        };
        if from_n > to_n || after < 0 {
            return Err(invalid("is not a resume token of this stream"));
        }
        Ok(Some(Cursor {
            from: from.to_owned(),
            to: Some(to.to_owned()),
            after,
        }))
    }

    /// The token to resume right after event `id` of window `window`.
    fn token(filter: Filter, window: &EventWindow, id: i64) -> String {
        filter
            .listing()
            .token_after(&format!("{}:{}:{id}", window.from, window.to))
    }
}

/// Sends `filter`'s events from `cursor` on into `tx` until the receiver
/// goes away or reading fails (the error is sent as the stream's last item).
pub(crate) async fn stream(
    db: PgPool,
    mut wake: watch::Receiver<u64>,
    filter: Filter,
    mut cursor: Cursor,
    tx: mpsc::Sender<Result<proto::FileEvent, Status>>,
) {
    loop {
        let to = match cursor.to.take() {
            Some(to) => to,
            None => match files::event_horizon(&db).await {
                Ok(to) => to,
                Err(e) => {
                    let _ = tx.send(Err(Status::from(e))).await;
                    return;
                }
            },
        };
        let window = EventWindow {
            from: std::mem::take(&mut cursor.from),
            to,
        };
        match deliver(&db, filter, &window, cursor.after, &tx).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                let _ = tx.send(Err(Status::from(e))).await;
                return;
            }
        }
        cursor = Cursor::starting_at(window.to);
        tokio::select! {
            _ = wake.changed() => {}
            _ = tokio::time::sleep(REREAD) => {}
            _ = tx.closed() => return,
        }
    }
}

/// Sends the events of `window` after id `after`; false when the receiver is gone.
async fn deliver(
    db: &PgPool,
    filter: Filter,
    window: &EventWindow,
    mut after: i64,
    tx: &mpsc::Sender<Result<proto::FileEvent, Status>>,
) -> ApiResult<bool> {
    loop {
        let events = files::events_in(db, window, after, filter.server_id, filter.watch_id).await?;
        for e in &events {
            after = e.id;
            let mut event = convert::event(e);
            event.resume_token = Cursor::token(filter, window, e.id);
            if tx.send(Ok(event)).await.is_err() {
                return Ok(false);
            }
        }
        if events.len() < BATCH {
            return Ok(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Filter = Filter {
        server_id: None,
        watch_id: None,
    };

    fn window(from: &str, to: &str) -> EventWindow {
        EventWindow {
            from: from.into(),
            to: to.into(),
        }
    }

    #[test]
    fn a_token_resumes_inside_its_window_after_its_event() {
        let token = Cursor::token(ALL, &window("700", "705"), 42);
        assert_eq!(
            Cursor::resume(ALL, &token).unwrap(),
            Some(Cursor {
                from: "700".into(),
                to: Some("705".into()),
                after: 42
            })
        );
    }

    #[test]
    fn no_token_starts_from_now() {
        assert_eq!(Cursor::resume(ALL, "").unwrap(), None);
    }

    #[test]
    fn a_token_of_another_filter_or_garbage_is_refused_naming_resume_token() {
        let token = Cursor::token(ALL, &window("700", "705"), 42);
        let server_3 = Filter {
            server_id: Some(3),
            watch_id: None,
        };
        for bad in [token.as_str(), "garbage", "cDEKZXZlbnRzP3g"] {
            let err = Cursor::resume(server_3, bad).unwrap_err();
            assert_eq!(err.field, "resume_token");
            assert!(err.message.contains("same server_id"), "{}", err.message);
        }
        let forged = ALL.listing().token_after("9:3:1");
        assert!(Cursor::resume(ALL, &forged).is_err(), "from above to");
        let forged = ALL.listing().token_after("1:3:x");
        assert!(Cursor::resume(ALL, &forged).is_err(), "non-numeric id");
    }
}
