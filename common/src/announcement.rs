//! The AMQP announcement of a stored file: the contract downstream consumers
//! depend on, as a type. Its JSON Schema is checked in as
//! `docs/announcement.schema.json`; the tests below keep type and schema equal.
//!
//! The coordinator builds one when a file becomes `uploaded` and stores it in
//! the outbox in the same transaction; the relay publishes it with
//! [`Properties`].

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// Version of the body layout; bumped on any incompatible change.
pub const SCHEMA_VERSION: u32 = 1;
/// AMQP `type` property of every announcement.
pub const MESSAGE_TYPE: &str = "ferry.file.stored";
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

impl Announcement {
    pub fn properties(&self) -> Properties {
        Properties::for_announcement(&self.announcement_id)
    }
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

    #[test]
    fn the_checked_in_schema_matches_the_type() {
        let schema: Value = serde_json::from_str(SCHEMA).unwrap();
        assert_eq!(
            schema["$schema"],
            "https://json-schema.org/draft/2020-12/schema"
        );
        assert_eq!(schema["type"], "object");
        let body = serde_json::to_value(sample()).unwrap();
        let body = body.as_object().unwrap();
        let props = schema["properties"].as_object().unwrap();

        let mut keys: Vec<&String> = body.keys().collect();
        let mut in_schema: Vec<&String> = props.keys().collect();
        keys.sort();
        in_schema.sort();
        assert_eq!(in_schema, keys, "schema properties = serialized fields");
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
            "every field is required"
        );
        for (name, value) in body {
            let spec = &props[name];
            assert_eq!(spec["type"], json_type(value), "type of {name}");
            assert!(
                spec["description"].as_str().is_some_and(|d| !d.is_empty()),
                "{name} is described"
            );
        }
        assert_eq!(props["schema_version"]["const"], SCHEMA_VERSION);
        for ts in ["mtime", "discovered_at", "uploaded_at"] {
            assert_eq!(props[ts]["format"], "date-time", "{ts}");
        }
        assert_eq!(props["sha256"]["pattern"].as_str(), Some("^[0-9a-f]{64}$"));
        assert_eq!(props["announcement_id"]["format"], "uuid");
    }
}
