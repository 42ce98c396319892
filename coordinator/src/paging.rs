//! Pagination of the `List*` calls: page sizes, page byte budgets and page
//! tokens.
//!
//! A page holds at most `page_size` rows and at most [`MAX_PAGE_BYTES`] of
//! encoded rows (never fewer than one row), so no response exceeds the
//! 4 MiB that standard gRPC clients (tonic, grpcio, grpcurl) accept by
//! default, however long the paths and messages in the rows; the token of a
//! page cut by bytes continues right after its last row.
//!
//! A token is opaque to clients (URL-safe base64) and names the listing and
//! the filter that issued it, plus the key of the last item served. Reusing
//! it with another listing or filter, or sending anything else, is
//! `INVALID_ARGUMENT` naming `page_token`: a token can never silently page
//! through a different result set. Pure; the queries live with their tables.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ferry_common::validate::FieldError;

/// Items per page when the request says 0.
pub(crate) const DEFAULT_PAGE_SIZE: u32 = 100;
/// Largest page served; larger requests are served this many.
pub(crate) const MAX_PAGE_SIZE: u32 = 1000;

/// Encoded rows a page may carry: 3 MiB, leaving room under the 4 MiB
/// default decode limit of gRPC clients for the rest of the response.
pub(crate) const MAX_PAGE_BYTES: usize = 3 * 1024 * 1024;

/// The bytes `message` takes as one element of a repeated message field.
pub(crate) fn wire_len(message: &impl prost::Message) -> usize {
    // Any field number below 16 has a one-byte tag.
    prost::encoding::message::encoded_len(1, message)
}

/// How many of the leading items, of the given encoded sizes, fit in
/// `budget` bytes: at least one, so a listing always moves on.
pub(crate) fn fitting(sizes: impl IntoIterator<Item = usize>, budget: usize) -> usize {
    let mut total = 0usize;
    let mut n = 0;
    for size in sizes {
        total = total.saturating_add(size);
        if n > 0 && total > budget {
            break;
        }
        n += 1;
    }
    n
}

/// The newest (last) of `items` that fit in `budget` bytes of `bytes`, in
/// their order, and how many older ones were left out; at least one is kept.
/// For a list served whole, such as a file's history.
pub(crate) fn newest_within<T>(
    mut items: Vec<T>,
    budget: usize,
    bytes: impl Fn(&T) -> usize,
) -> (Vec<T>, usize) {
    let keep = fitting(items.iter().rev().map(bytes), budget);
    let omitted = items.len() - keep;
    items.drain(..omitted);
    (items, omitted)
}

/// Token layout version, so the format can change without misreading old tokens.
const VERSION: &str = "p1";

/// The page size to serve for a requested one.
pub(crate) fn page_size(requested: u32) -> u32 {
    match requested {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    }
}

/// One listing under one filter: issues and checks its page tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Listing {
    /// `"<call>?<canonical filter>"`, e.g. `"files?statuses=error;server=3;watch="`.
    scope: String,
}

impl Listing {
    /// `filter` must be canonical: equal filters give equal text.
    pub(crate) fn new(call: &str, filter: &str) -> Self {
        Listing {
            scope: format!("{call}?{filter}"),
        }
    }

    /// The key after which the requested page starts; `None` for the first page.
    pub(crate) fn start_after(&self, token: &str) -> Result<Option<String>, FieldError> {
        if token.is_empty() {
            return Ok(None);
        }
        let invalid = || {
            FieldError::new(
                "page_token",
                "is not a token from a previous response of this call",
            )
        };
        let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
        let text = String::from_utf8(bytes).map_err(|_| invalid())?;
        let mut parts = text.splitn(3, '\n');
        let (Some(VERSION), Some(scope), Some(after)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid());
        };
        if scope != self.scope {
            return Err(FieldError::new(
                "page_token",
                "was issued for another call or another filter; \
                 repeat the request with the filter of the first page, or start over without page_token",
            ));
        }
        Ok(Some(after.to_string()))
    }

    /// The token of the page after the item with key `last`.
    pub(crate) fn token_after(&self, last: &str) -> String {
        URL_SAFE_NO_PAD.encode(format!("{VERSION}\n{}\n{last}", self.scope))
    }

    /// Cuts rows fetched with `LIMIT size + 1` down to one page, and that
    /// page to [`MAX_PAGE_BYTES`] of `bytes` (use [`wire_len`]); returns it
    /// with the next page's token (empty on the last page).
    pub(crate) fn page_within<T>(
        &self,
        mut rows: Vec<T>,
        size: u32,
        key: impl Fn(&T) -> String,
        bytes: impl Fn(&T) -> usize,
    ) -> (Vec<T>, String) {
        let size = size as usize;
        let more = rows.len() > size;
        rows.truncate(size);
        self.cut(rows, more, key, bytes)
    }

    /// Cuts one page's `items` (followed by more rows when `more`) to
    /// [`MAX_PAGE_BYTES`] of `bytes` and returns it with the next page's
    /// token: after the last item kept, empty when nothing follows.
    pub(crate) fn cut<T>(
        &self,
        mut items: Vec<T>,
        more: bool,
        key: impl Fn(&T) -> String,
        bytes: impl Fn(&T) -> usize,
    ) -> (Vec<T>, String) {
        let keep = fitting(items.iter().map(bytes), MAX_PAGE_BYTES);
        let more = more || keep < items.len();
        items.truncate(keep);
        let next = match items.last() {
            Some(last) if more => self.token_after(&key(last)),
            _ => String::new(),
        };
        (items, next)
    }
}

/// An id key of a token (`0` before the first row: ids start at 1).
pub(crate) fn id_after(after: Option<String>) -> Result<i64, FieldError> {
    match after {
        None => Ok(0),
        Some(key) => key.parse().map_err(|_| {
            FieldError::new(
                "page_token",
                "is not a token from a previous response of this call",
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sizes_default_and_are_capped() {
        assert_eq!(page_size(0), 100);
        assert_eq!(page_size(7), 7);
        assert_eq!(page_size(1000), 1000);
        assert_eq!(page_size(5000), 1000);
    }

    #[test]
    fn tokens_round_trip_within_their_listing() {
        let l = Listing::new("watches", "server=3");
        let token = l.token_after("42");
        assert!(
            token
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "{token}"
        );
        assert_eq!(l.start_after(&token), Ok(Some("42".into())));
        assert_eq!(l.start_after(""), Ok(None));
        assert_eq!(id_after(l.start_after(&token).unwrap()), Ok(42));
    }

    #[test]
    fn tokens_of_another_filter_or_call_or_garbage_are_rejected() {
        let token = Listing::new("watches", "server=3").token_after("42");
        for other in [
            Listing::new("watches", "server=4"),
            Listing::new("servers", "server=3"),
        ] {
            let err = other.start_after(&token).unwrap_err();
            assert_eq!(err.field, "page_token");
            assert!(err.message.contains("another"), "{}", err.message);
        }
        let l = Listing::new("files", "");
        for garbage in ["zzz", "!!", "42", &URL_SAFE_NO_PAD.encode("p0\nfiles?\n1")] {
            assert_eq!(l.start_after(garbage).unwrap_err().field, "page_token");
        }
        let non_numeric = l.token_after("abc");
        assert_eq!(
            id_after(l.start_after(&non_numeric).unwrap())
                .unwrap_err()
                .field,
            "page_token"
        );
    }

    #[test]
    fn pages_cut_one_extra_row_into_a_token() {
        let l = Listing::new("servers", "");
        let (rows, next) = l.page_within(vec![1, 2, 3], 2, i32::to_string, |_| 0);
        assert_eq!(rows, vec![1, 2]);
        assert_eq!(l.start_after(&next), Ok(Some("2".into())));
        let (rows, next) = l.page_within(vec![1, 2], 2, i32::to_string, |_| 0);
        assert_eq!(rows, vec![1, 2]);
        assert!(next.is_empty());
    }

    #[test]
    fn pages_are_cut_by_bytes_after_their_last_row() {
        assert_eq!(fitting([10, 10, 10], 25), 2);
        assert_eq!(fitting([10, 10, 10], 30), 3);
        assert_eq!(fitting([40, 10], 25), 1, "one row even when it is larger");
        assert_eq!(fitting([], 25), 0);
        let l = Listing::new("files", "");
        let third = MAX_PAGE_BYTES / 3 + 1;
        let (rows, next) = l.cut(vec![1, 2, 3, 4], false, i32::to_string, |_| third);
        assert_eq!(rows, vec![1, 2]);
        assert_eq!(l.start_after(&next), Ok(Some("2".into())));
        let (rows, next) = l.page_within(vec![1, 2, 3], 2, i32::to_string, |_| 1);
        assert_eq!(rows, vec![1, 2]);
        assert_eq!(l.start_after(&next), Ok(Some("2".into())));
        let (rows, next) = l.cut(vec![1, 2], false, i32::to_string, |_| 1);
        assert_eq!(rows, vec![1, 2]);
        assert!(next.is_empty(), "the last page when everything fits");
    }

    #[test]
    fn a_history_keeps_its_newest_events_within_the_budget() {
        assert_eq!(newest_within(vec![1, 2, 3, 4], 25, |_| 10), (vec![3, 4], 2));
        assert_eq!(newest_within(vec![1, 2], 25, |_| 10), (vec![1, 2], 0));
        assert_eq!(newest_within(vec![1, 2], 5, |_| 10), (vec![2], 1));
        assert_eq!(newest_within(Vec::<i32>::new(), 5, |_| 10), (vec![], 0));
    }

    #[test]
    fn wire_len_is_the_bytes_a_repeated_element_takes() {
        let file = ferry_proto::File {
            path: "p".repeat(3000),
            ..Default::default()
        };
        let page = ferry_proto::ListFilesResponse {
            files: vec![file.clone(), file.clone()],
            next_page_token: String::new(),
        };
        assert_eq!(2 * wire_len(&file), prost::Message::encoded_len(&page));
    }
}
