//! The AMQP announcements: the contract downstream consumers depend on, as
//! types. [`Announcement`] says a file version is stored; [`FailureAnnouncement`]
//! that one ended `failed` or `lost` (so consumers can alert on it). Their
//! JSON Schema is checked in as `docs/announcement.schema.json` (the stored
//! body at the top level, the failure body under `$defs/failure`); the tests
//! below keep types and schema equal.
//!
//! The coordinator builds one when a file becomes `uploaded` (or `failed` /
//! `lost`, unless `FERRY_ANNOUNCE_FAILURES=false`) and stores it in the
//! outbox in the same transaction; the relay publishes it with
//! [`Properties`] and the routing key of [`routing_key`], whose server word
//! is escaped for topic exchanges ([`escape_routing_word`]).

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// Version of the body layout; bumped on any incompatible change.
pub const SCHEMA_VERSION: u32 = 1;

/// The object user-metadata key that carries a stored version's
/// `announcement_id`, so a later run (e.g. after a database restore) can
/// tell under which id consumers saw the bytes already in the bucket.
pub const ANNOUNCEMENT_ID_METADATA: &str = "ferry-announcement-id";
/// AMQP `type` property of every announcement.
pub const MESSAGE_TYPE: &str = "ferry.file.stored";
/// AMQP `type` of the announcement of a file that ended `failed`.
pub const MESSAGE_TYPE_FAILED: &str = "ferry.file.failed";
/// AMQP `type` of the announcement of a file that ended `lost`.
pub const MESSAGE_TYPE_LOST: &str = "ferry.file.lost";
/// AMQP `content_type` property of every announcement.
pub const CONTENT_TYPE: &str = "application/json";
/// AMQP `delivery_mode` 2: persistent.
pub const DELIVERY_MODE_PERSISTENT: u8 = 2;

/// Body of the message announcing that a file version is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Announcement {
    /// [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// Stable per file version and never reused (a UUID kept in the file row,
    /// unlike `file_id`, which a database restore can hand out again); also
    /// the AMQP `message_id`.
    pub announcement_id: String,
    pub file_id: i64,
    /// Server name.
    pub server: String,
    pub server_id: i64,
    pub watch_id: i64,
    /// Absolute remote path.
    pub path: String,
    /// Bytes.
    pub size: u64,
    /// Remote modification time, RFC 3339 UTC in whole seconds (`...T10:00:00Z`).
    #[serde(with = "seconds_z")]
    pub mtime: DateTime<Utc>,
    /// Lower-case hex sha256 of the stored bytes.
    pub sha256: String,
    pub bucket: String,
    pub key: String,
    pub etag: String,
    /// RFC 3339 with fractional seconds and `+00:00`.
    #[serde(with = "fractional_offset")]
    pub discovered_at: DateTime<Utc>,
    #[serde(with = "fractional_offset")]
    pub uploaded_at: DateTime<Utc>,
}

/// How a file version ended without being stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Failure {
    /// Attempts exhausted, or a permanent failure: `failed`.
    Failed,
    /// The remote file vanished or changed during the transfer: `lost`.
    Lost,
}

impl Failure {
    /// The status name, also the `event` field and the `{event}` routing word.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Failed => "failed",
            Failure::Lost => "lost",
        }
    }

    /// The failure a file status stands for, if it is `failed` or `lost`.
    pub fn of_status(status: &str) -> Option<Failure> {
        match status {
            "failed" => Some(Failure::Failed),
            "lost" => Some(Failure::Lost),
            _ => None,
        }
    }

    /// The AMQP `type` property.
    pub fn message_type(self) -> &'static str {
        match self {
            Failure::Failed => MESSAGE_TYPE_FAILED,
            Failure::Lost => MESSAGE_TYPE_LOST,
        }
    }
}

/// Body of the message announcing that a file version ended `failed` or
/// `lost`: nothing was stored, an operator may `ferryctl files retry` it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureAnnouncement {
    /// [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// `failed` or `lost`.
    pub event: Failure,
    pub file_id: i64,
    /// Server name.
    pub server: String,
    pub server_id: i64,
    pub watch_id: i64,
    /// Absolute remote path.
    pub path: String,
    /// Bytes.
    pub size: u64,
    /// Remote modification time, RFC 3339 UTC in whole seconds.
    #[serde(with = "seconds_z")]
    pub mtime: DateTime<Utc>,
    /// Transfer attempts made.
    pub attempts: u32,
    /// Why: the history text of the move, as `ferryctl files show` lists it.
    pub error: String,
    #[serde(with = "fractional_offset")]
    pub discovered_at: DateTime<Utc>,
    /// When the file ended `failed` / `lost`.
    #[serde(with = "fractional_offset")]
    pub failed_at: DateTime<Utc>,
}

/// The AMQP properties an announcement goes out with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Properties {
    /// Stable per file version, for consumer deduplication: the announcement id.
    pub message_id: String,
    pub content_type: &'static str,
    /// The AMQP `type` property.
    pub kind: &'static str,
    pub delivery_mode: u8,
}

impl Properties {
    /// The properties of the announcement with id `announcement_id` (the
    /// file row's). Usable without decoding the body, so outbox rows written
    /// by older versions still go out.
    pub fn for_announcement(announcement_id: &str) -> Self {
        Properties {
            message_id: announcement_id.to_string(),
            content_type: CONTENT_TYPE,
            kind: MESSAGE_TYPE,
            delivery_mode: DELIVERY_MODE_PERSISTENT,
        }
    }
}

impl Properties {
    /// The properties of a failure announcement of the file version with
    /// `announcement_id`, stored as outbox row `outbox_id`. Its `message_id`,
    /// `<announcement_id>-<event>-<outbox_id>`, differs from the stored
    /// announcement's (a file retried after failing may still be stored) and
    /// from an earlier failure's of the same version, and names no other
    /// version even after a restore rewinds the row ids.
    pub fn for_failure(announcement_id: &str, failure: Failure, outbox_id: i64) -> Self {
        Properties {
            message_id: format!("{announcement_id}-{}-{outbox_id}", failure.as_str()),
            content_type: CONTENT_TYPE,
            kind: failure.message_type(),
            delivery_mode: DELIVERY_MODE_PERSISTENT,
        }
    }
}

impl Announcement {
    pub fn properties(&self) -> Properties {
        Properties::for_announcement(&self.announcement_id)
    }
}

/// Escapes `part` (e.g. a server name) as one word of a topic-exchange
/// routing key, so `ferry.file.*` patterns keep matching one word: `%`
/// becomes `%25`, `.` `%2E`, `*` `%2A` and `#` `%23`; every other character
/// stays. Reversible with [`unescape_routing_word`]; a part without those
/// four characters is unchanged.
pub fn escape_routing_word(part: &str) -> String {
    let mut out = String::with_capacity(part.len());
    for c in part.chars() {
        match c {
            '%' => out.push_str("%25"),
            '.' => out.push_str("%2E"),
            '*' => out.push_str("%2A"),
            '#' => out.push_str("%23"),
            c => out.push(c),
        }
    }
    out
}

/// The inverse of [`escape_routing_word`], for consumers that need the name
/// back from a routing key word. Errors name the bad escape.
pub fn unescape_routing_word(word: &str) -> Result<String, String> {
    let mut out = String::with_capacity(word.len());
    let mut rest = word;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let code = rest.get(at + 1..at + 3).unwrap_or("");
        let c = match code.to_ascii_uppercase().as_str() {
            "25" => '%',
            "2E" => '.',
            "2A" => '*',
            "23" => '#',
            _ => {
                return Err(format!(
                    "routing key word {word:?}: \"%{code}\" is not one of %25, %2E, %2A, %23"
                ));
            }
        };
        out.push(c);
        rest = &rest[at + 3..];
    }
    if rest.contains(['.', '*', '#']) {
        return Err(format!(
            "routing key word {word:?} holds an unescaped '.', '*' or '#'"
        ));
    }
    out.push_str(rest);
    Ok(out)
}

/// The routing key of an announcement: `template` with every `{server}`
/// replaced by the escaped server name ([`escape_routing_word`]) and every
/// `{event}` by `event` (`stored`, `failed` or `lost`).
pub fn routing_key(template: &str, server: &str, event: &str) -> String {
    template
        .replace("{event}", event)
        .replace("{server}", &escape_routing_word(server))
}

/// `2026-11-28T10:00:00Z`.
mod seconds_z {
    use super::*;

    pub(super) fn serialize<S: serde::Serializer>(
        t: &DateTime<Utc>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Secs, true))
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<DateTime<Utc>, D::Error> {
        super::fractional_offset::deserialize(d)
    }
}

/// `2026-11-28T10:00:05.123+00:00` (fraction in groups of 3 digits, none if whole).
mod fractional_offset {
    use super::*;

    pub(super) fn serialize<S: serde::Serializer>(
        t: &DateTime<Utc>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, false))
    }

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const SCHEMA: &str = include_str!("../../docs/announcement.schema.json");

    fn sample() -> Announcement {
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        Announcement {
            schema_version: SCHEMA_VERSION,
            announcement_id: "0b6f2c8e-5d1a-4f3e-9c7b-2a4d6e8f1a3c".into(),
            file_id: 42,
            server: "acme".into(),
            server_id: 1,
            watch_id: 3,
            path: "/outbox/2026/report.csv".into(),
            size: 1_048_576,
            mtime: at("2026-11-28T10:00:00Z"),
            sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
            bucket: "ingest".into(),
            key: "acme/2026/report.csv".into(),
            etag: "d41d8cd98f00b204e9800998ecf8427e-3".into(),
            discovered_at: at("2026-11-28T10:00:05.123Z"),
            uploaded_at: at("2026-11-28T10:00:09.456789Z"),
        }
    }

    #[test]
    fn serializes_to_the_documented_json() {
        let text = serde_json::to_string(&sample()).unwrap();
        assert_eq!(
            text,
            concat!(
                r#"{"schema_version":1,"announcement_id":"0b6f2c8e-5d1a-4f3e-9c7b-2a4d6e8f1a3c","file_id":42,"#,
                r#""server":"acme","server_id":1,"watch_id":3,"#,
                r#""path":"/outbox/2026/report.csv","size":1048576,"mtime":"2026-11-28T10:00:00Z","#,
                r#""sha256":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08","#,
                r#""bucket":"ingest","key":"acme/2026/report.csv","etag":"d41d8cd98f00b204e9800998ecf8427e-3","#,
                r#""discovered_at":"2026-11-28T10:00:05.123+00:00","uploaded_at":"2026-11-28T10:00:09.456789+00:00"}"#
            )
        );
        let back: Announcement = serde_json::from_str(&text).unwrap();
        assert_eq!(back, sample());
    }

    #[test]
    fn whole_seconds_have_no_fraction() {
        let mut a = sample();
        a.uploaded_at = a.mtime;
        let v = serde_json::to_value(&a).unwrap();
        assert_eq!(v["uploaded_at"], "2026-11-28T10:00:00+00:00");
    }

    #[test]
    fn goes_out_persistent_json_with_the_announcement_id_as_message_id() {
        let p = sample().properties();
        assert_eq!(
            p,
            Properties {
                message_id: "0b6f2c8e-5d1a-4f3e-9c7b-2a4d6e8f1a3c".into(),
                content_type: "application/json",
                kind: "ferry.file.stored",
                delivery_mode: 2,
            }
        );
    }

    #[test]
    fn routing_words_escape_reversibly() {
        assert_eq!(escape_routing_word("sftp-a"), "sftp-a");
        assert_eq!(escape_routing_word("sftp.acme.com"), "sftp%2Eacme%2Ecom");
        assert_eq!(escape_routing_word("50%*#"), "50%25%2A%23");
        assert_eq!(escape_routing_word("é ü"), "é ü");
        for name in ["", "a", "a.b", "%2E", "..%%", "x*y#z", "ünï.côdé", "%"] {
            let word = escape_routing_word(name);
            assert!(!word.contains(['.', '*', '#']), "{word}");
            assert_eq!(unescape_routing_word(&word).as_deref(), Ok(name), "{name}");
        }
        assert_eq!(unescape_routing_word("a%2eb").as_deref(), Ok("a.b"));
        for bad in ["a%", "a%2", "a%41", "a.b", "a*", "#"] {
            assert!(unescape_routing_word(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn routing_keys_keep_one_word_per_server() {
        let key = |t, s| routing_key(t, s, "stored");
        assert_eq!(key("ferry.file.{server}", "sftp-a"), "ferry.file.sftp-a");
        assert_eq!(
            key("ferry.file.{server}", "sftp.acme.com"),
            "ferry.file.sftp%2Eacme%2Ecom"
        );
        assert_eq!(key("ferry.file.stored", "a.b"), "ferry.file.stored");
        assert_eq!(key("{server}.{server}", "x"), "x.x");
        assert_eq!(key("", "x"), "");
        // A server named like a placeholder stays a name.
        assert_eq!(key("f.{server}", "{event}"), "f.{event}");
        assert_eq!(
            routing_key("ferry.file.{event}.{server}", "a.b", "lost"),
            "ferry.file.lost.a%2Eb"
        );
    }

    /// The JSON type name of a serialized value, as JSON Schema spells it.
    fn json_type(v: &Value) -> &'static str {
        match v {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::Object(_) => "object",
        }
    }

    /// Checks `schema` (an object schema) against `body`, a serialized sample:
    /// same properties, all required, matching JSON types, each described.
    fn check_schema(schema: &Value, body: &Value, what: &str) {
        assert_eq!(schema["type"], "object", "{what}");
        let body = body.as_object().unwrap();
        let props = schema["properties"].as_object().unwrap();
        let mut keys: Vec<&String> = body.keys().collect();
        let mut in_schema: Vec<&String> = props.keys().collect();
        keys.sort();
        in_schema.sort();
        assert_eq!(
            in_schema, keys,
            "{what}: schema properties = serialized fields"
        );
        let mut required: Vec<&str> = schema["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        required.sort();
        assert_eq!(
            required,
            keys.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
            "{what}: every field is required"
        );
        for (name, value) in body {
            let spec = &props[name];
            assert_eq!(spec["type"], json_type(value), "{what}: type of {name}");
            assert!(
                spec["description"].as_str().is_some_and(|d| !d.is_empty()),
                "{what}: {name} is described"
            );
        }
        assert_eq!(props["schema_version"]["const"], SCHEMA_VERSION, "{what}");
        for ts in ["mtime", "discovered_at"] {
            assert_eq!(props[ts]["format"], "date-time", "{what}: {ts}");
        }
    }

    #[test]
    fn the_checked_in_schema_matches_the_type() {
        let schema: Value = serde_json::from_str(SCHEMA).unwrap();
        assert_eq!(
            schema["$schema"],
            "https://json-schema.org/draft/2020-12/schema"
        );
        check_schema(&schema, &serde_json::to_value(sample()).unwrap(), "stored");
        let props = &schema["properties"];
        assert_eq!(props["uploaded_at"]["format"], "date-time");
        assert_eq!(props["sha256"]["pattern"].as_str(), Some("^[0-9a-f]{64}$"));
        assert_eq!(props["announcement_id"]["format"], "uuid");

        let failure = &schema["$defs"]["failure"];
        check_schema(
            failure,
            &serde_json::to_value(failure_sample()).unwrap(),
            "failure",
        );
        assert_eq!(failure["properties"]["failed_at"]["format"], "date-time");
        assert_eq!(
            failure["properties"]["event"]["enum"],
            serde_json::json!(["failed", "lost"])
        );
    }

    fn failure_sample() -> FailureAnnouncement {
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        FailureAnnouncement {
            schema_version: SCHEMA_VERSION,
            event: Failure::Failed,
            file_id: 42,
            server: "acme".into(),
            server_id: 1,
            watch_id: 3,
            path: "/outbox/2026/report.csv".into(),
            size: 1_048_576,
            mtime: at("2026-11-28T10:00:00Z"),
            attempts: 5,
            error: "NoSuchBucket: the bucket does not exist".into(),
            discovered_at: at("2026-11-28T10:00:05.123Z"),
            failed_at: at("2026-11-28T10:09:00.5Z"),
        }
    }

    #[test]
    fn failures_serialize_to_the_documented_json() {
        let text = serde_json::to_string(&failure_sample()).unwrap();
        assert_eq!(
            text,
            concat!(
                r#"{"schema_version":1,"event":"failed","file_id":42,"server":"acme","server_id":1,"watch_id":3,"#,
                r#""path":"/outbox/2026/report.csv","size":1048576,"mtime":"2026-11-28T10:00:00Z","attempts":5,"#,
                r#""error":"NoSuchBucket: the bucket does not exist","#,
                r#""discovered_at":"2026-11-28T10:00:05.123+00:00","failed_at":"2026-11-28T10:09:00.500+00:00"}"#
            )
        );
        let back: FailureAnnouncement = serde_json::from_str(&text).unwrap();
        assert_eq!(back, failure_sample());
        let lost = FailureAnnouncement {
            event: Failure::Lost,
            ..failure_sample()
        };
        assert_eq!(serde_json::to_value(&lost).unwrap()["event"], "lost");
    }

    #[test]
    fn failures_go_out_with_their_own_type_and_message_id() {
        assert_eq!(
            Properties::for_failure("0b6f2c8e-5d1a-4f3e-9c7b-2a4d6e8f1a3c", Failure::Failed, 7),
            Properties {
                message_id: "0b6f2c8e-5d1a-4f3e-9c7b-2a4d6e8f1a3c-failed-7".into(),
                content_type: "application/json",
                kind: "ferry.file.failed",
                delivery_mode: 2,
            }
        );
        assert_eq!(
            Properties::for_failure("u", Failure::Lost, 8).kind,
            "ferry.file.lost"
        );
        assert_eq!(Failure::of_status("failed"), Some(Failure::Failed));
        assert_eq!(Failure::of_status("lost"), Some(Failure::Lost));
        assert_eq!(Failure::of_status("processed"), None);
    }
}
