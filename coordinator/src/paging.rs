//! Pagination of the `List*` calls: page sizes and page tokens.
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

    /// Cuts rows fetched with `LIMIT size + 1` down to one page and returns
    /// the next page's token (empty on the last page).
    pub(crate) fn page<T>(
        &self,
        mut rows: Vec<T>,
        size: u32,
        key: impl Fn(&T) -> String,
    ) -> (Vec<T>, String) {
        let size = size as usize;
        let more = rows.len() > size;
        rows.truncate(size);
        let next = match rows.last() {
            Some(last) if more => self.token_after(&key(last)),
            _ => String::new(),
        };
        (rows, next)
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
        let (rows, next) = l.page(vec![1, 2, 3], 2, i32::to_string);
        assert_eq!(rows, vec![1, 2]);
        assert_eq!(l.start_after(&next), Ok(Some("2".into())));
        let (rows, next) = l.page(vec![1, 2], 2, i32::to_string);
        assert_eq!(rows, vec![1, 2]);
        assert!(next.is_empty());
    }
}
