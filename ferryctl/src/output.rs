//! Presentation: plain-text tables and key/value blocks for humans, JSON
//! documents for scripts, and the small formatting rules they share (ages,
//! sizes, timestamps, status names, escaping of remote-controlled text).
//!
//! Everything here writes through [`outln!`], which returns `io::Result`
//! instead of panicking like `println!` when stdout is a closed pipe
//! (`ferryctl files list | head`).

use std::io::Write;

use chrono::{DateTime, SecondsFormat, Utc};
use ferry_common::domain::FileStatus;
use ferry_proto as proto;
use serde_json::Value;

/// `writeln!` to stdout, returning `io::Result<()>`.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}
pub(crate) use outln;

/// A left-aligned text table; columns are as wide as their widest cell.
pub(crate) struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(headers: &[&'static str]) -> Self {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; cells are escaped with [`clean`], missing cells are empty.
    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows
            .push(cells.into_iter().map(|c| clean(&c)).collect());
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text, one line per row, each ending in `\n`.
    pub(crate) fn render(&self) -> String {
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.headers.iter().map(|h| (*h).to_string()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = row.get(i).map_or("", String::as_str);
                line.push_str(cell);
                if i + 1 < columns {
                    let pad = width.saturating_sub(cell.chars().count()) + 2;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    /// Prints the table, or `empty` on stderr when it has no rows.
    pub(crate) fn print_or(&self, empty: &str) -> std::io::Result<()> {
        if self.is_empty() {
            eprintln!("{empty}");
            return Ok(());
        }
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(self.render().as_bytes())?;
        stdout.flush()
    }
}

/// Prints `label: value` lines with the values aligned.
pub(crate) fn print_fields(fields: &[(&str, String)]) -> std::io::Result<()> {
    let width = fields
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0)
        + 1;
    for (key, value) in fields {
        outln!("{:<width$}  {}", format!("{key}:"), clean(value))?;
    }
    Ok(())
}

/// Prints a JSON document (pretty, for scripts and humans alike).
pub(crate) fn print_json(value: &Value) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    outln!("{text}")
}

/// Escapes control characters so that remote-controlled text (file names,
/// error messages) cannot move the cursor or recolour the terminal.
pub(crate) fn clean(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_string();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Shortens `text` to at most `max` characters, marking the cut with `…`.
pub(crate) fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut short: String = text.chars().take(max.saturating_sub(1)).collect();
    short.push('…');
    short
}

/// `-` for empty strings, for table cells.
pub(crate) fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".to_string()
    } else {
        text.to_string()
    }
}

/// `1 file`, `3 files`, `2 watches`.
pub(crate) fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

pub(crate) fn yes_no(value: bool) -> String {
    if value { "yes" } else { "no" }.to_string()
}

/// A protobuf timestamp as a UTC time; `None` when unset or out of range.
pub(crate) fn time(ts: Option<&prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    let ts = ts?;
    DateTime::from_timestamp(ts.seconds, u32::try_from(ts.nanos).ok()?)
}

/// RFC 3339 (UTC, `Z`), e.g. `2025-03-01T12:00:00.123456Z`.
pub(crate) fn rfc3339(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// A timestamp as a JSON RFC 3339 string, or `null` when unset.
pub(crate) fn json_time(ts: Option<&prost_types::Timestamp>) -> Value {
    time(ts).map_or(Value::Null, |t| Value::String(rfc3339(t)))
}

/// A string as JSON, `null` when empty (for optional text such as errors).
pub(crate) fn json_opt(text: &str) -> Value {
    if text.is_empty() {
        Value::Null
    } else {
        Value::String(text.to_string())
    }
}

/// A compact duration: `45s`, `3m12s`, `2h05m`, `3d4h`.
pub(crate) fn short_duration(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..86400 => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{}h", secs / 86400, secs % 86400 / 3600),
    }
}

/// How long ago (`3s ago`) or how far ahead (`in 5m00s`) `then` is from `now`.
pub(crate) fn relative(then: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let delta = now.signed_duration_since(then).num_seconds();
    if delta >= 0 {
        format!("{} ago", short_duration(delta.unsigned_abs()))
    } else {
        format!("in {}", short_duration(delta.unsigned_abs()))
    }
}

/// [`relative`] to now for a protobuf timestamp; `-` when unset.
pub(crate) fn age(ts: Option<&prost_types::Timestamp>) -> String {
    time(ts).map_or_else(|| "-".to_string(), |t| relative(t, Utc::now()))
}

/// RFC 3339 plus the relative age, for detail views; `-` when unset.
pub(crate) fn time_and_age(ts: Option<&prost_types::Timestamp>) -> String {
    time(ts).map_or_else(
        || "-".to_string(),
        |t| format!("{} ({})", rfc3339(t), relative(t, Utc::now())),
    )
}

/// Lower-case status name (`in_progress`); `unspecified` for 0 or unknown values.
pub(crate) fn status_name(status: i32) -> &'static str {
    proto::FileStatus::try_from(status)
        .ok()
        .and_then(ferry_proto::convert::status_from_proto)
        .map_or("unspecified", FileStatus::as_str)
}

/// `password`, `private_key` or `unspecified`.
pub(crate) fn auth_kind_name(kind: i32) -> &'static str {
    match proto::AuthKind::try_from(kind) {
        Ok(proto::AuthKind::Password) => "password",
        Ok(proto::AuthKind::PrivateKey) => "private_key",
        _ => "unspecified",
    }
}

/// Byte count in binary units: `512 B`, `1.5 KiB`, `3.2 GiB`.
pub(crate) fn size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns_and_trims_line_ends() {
        let mut t = Table::new(&["ID", "NAME", "HOST"]);
        t.row(vec!["1".into(), "alpha".into(), "a.example".into()]);
        t.row(vec!["12".into(), "b".into(), String::new()]);
        assert_eq!(t.render(), "ID  NAME   HOST\n1   alpha  a.example\n12  b\n");
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(clean("a\x1b[31mb\n"), "a\\u{1b}[31mb\\n");
        assert_eq!(clean("plain"), "plain");
    }

    #[test]
    fn durations_and_ages_are_compact() {
        assert_eq!(short_duration(3), "3s");
        assert_eq!(short_duration(192), "3m12s");
        assert_eq!(short_duration(2 * 3600 + 5 * 60), "2h05m");
        assert_eq!(short_duration(3 * 86400 + 4 * 3600 + 5), "3d4h");
        let now = Utc::now();
        assert_eq!(relative(now - chrono::Duration::seconds(3), now), "3s ago");
        assert_eq!(
            relative(now + chrono::Duration::seconds(300), now),
            "in 5m00s"
        );
    }

    #[test]
    fn statuses_print_lower_case() {
        assert_eq!(
            status_name(proto::FileStatus::InProgress as i32),
            "in_progress"
        );
        assert_eq!(status_name(0), "unspecified");
        assert_eq!(status_name(99), "unspecified");
    }

    #[test]
    fn sizes_and_truncation() {
        assert_eq!(size(512), "512 B");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
    }

    #[test]
    fn timestamps_render_as_rfc3339_utc() {
        let ts = prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 0,
        };
        assert_eq!(
            json_time(Some(&ts)),
            Value::String("2023-11-14T22:13:20Z".into())
        );
        assert_eq!(json_time(None), Value::Null);
    }
}
