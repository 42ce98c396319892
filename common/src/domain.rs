//! Domain types shared by every binary: file statuses, post-actions and roles.

use std::fmt;
use std::str::FromStr;

/// Status of one file version (SPEC §2). Stored in Postgres as the lower-case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileStatus {
    New,
    InProgress,
    Uploaded,
    Processed,
    Error,
    Failed,
    Lost,
    /// Present when its watch took its baseline (`skip existing files`):
    /// recorded, never transferred or announced until an admin retries it.
    Skipped,
}

impl FileStatus {
    pub const ALL: [FileStatus; 8] = [
        FileStatus::New,
        FileStatus::InProgress,
        FileStatus::Uploaded,
        FileStatus::Processed,
        FileStatus::Error,
        FileStatus::Failed,
        FileStatus::Lost,
        FileStatus::Skipped,
    ];

    /// The name stored in the database and shown to humans.
    pub fn as_str(self) -> &'static str {
        match self {
            FileStatus::New => "new",
            FileStatus::InProgress => "in_progress",
            FileStatus::Uploaded => "uploaded",
            FileStatus::Processed => "processed",
            FileStatus::Error => "error",
            FileStatus::Failed => "failed",
            FileStatus::Lost => "lost",
            FileStatus::Skipped => "skipped",
        }
    }

    /// Statuses an operator may requeue with a retry.
    pub fn is_retryable_by_admin(self) -> bool {
        self.is_retried_by_default() || self == FileStatus::Skipped
    }

    /// Statuses a retry without status filter or ids requeues: the failures.
    /// `skipped` files are requeued only when asked for by id or status, so a
    /// routine "retry the failures" never ingests a watch's baseline.
    pub fn is_retried_by_default(self) -> bool {
        matches!(
            self,
            FileStatus::Error | FileStatus::Failed | FileStatus::Lost
        )
    }
}

impl fmt::Display for FileStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FileStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().to_ascii_lowercase().replace([' ', '-'], "_");
        FileStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == wanted)
            .ok_or_else(|| {
                format!(
                    "unknown status {s:?} (expected one of: {})",
                    FileStatus::ALL.map(FileStatus::as_str).join(", ")
                )
            })
    }
}

/// What happens on the SFTP server after a file was stored and announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostAction {
    Keep,
    Delete,
    /// Move into this absolute directory (same file name).
    Move(String),
}

impl FromStr for PostAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" | "keep" => Ok(PostAction::Keep),
            "delete" => Ok(PostAction::Delete),
            other => match other.strip_prefix("move:") {
                Some(dir) => PostAction::move_to(dir).map_err(|e| format!("{s:?}: {e}")),
                None => Err(format!(
                    "{s:?}: expected keep, delete or move:<absolute dir>"
                )),
            },
        }
    }
}

/// The stored text form (`keep`, `delete`, `move:/dir`), for reading rows.
/// A stored move target is taken as written (the database admits any
/// absolute one): rows written before [`PostAction::move_to`] refused `.`,
/// `..` and `//` must stay readable. Input goes through [`FromStr`].
impl TryFrom<String> for PostAction {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        match s.strip_prefix("move:") {
            Some(dir) if dir.starts_with('/') => {
                Ok(PostAction::Move(match dir.trim_end_matches('/') {
                    "" => "/".into(),
                    dir => dir.into(),
                }))
            }
            _ => s.parse(),
        }
    }
}

impl PostAction {
    /// A move into `dir`, which must be an absolute directory written one
    /// way (no `.`, `..` or `//` segments, no control characters; see
    /// [`crate::validate::absolute_dir`]); a trailing `/` is dropped. The one
    /// check of a move target, whatever form the action came in.
    pub fn move_to(dir: &str) -> Result<PostAction, String> {
        crate::validate::absolute_dir(dir)
            .map(PostAction::Move)
            .map_err(|why| format!("the move target {why}"))
    }
}

impl fmt::Display for PostAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PostAction::Keep => f.write_str("keep"),
            PostAction::Delete => f.write_str("delete"),
            PostAction::Move(dir) => write!(f, "move:{dir}"),
        }
    }
}

/// Role of a caller, taken from its client certificate's SAN URI.
///
/// An agent's site is part of its identity, so only whoever issues
/// certificates decides which site's servers (and credentials) an agent gets:
/// `spiffe://ferry/agent/<site>/<name>`. The older form without a site,
/// `spiffe://ferry/agent/<name>`, stands for the site `default`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Agent {
        name: String,
        site: String,
    },
    /// `spiffe://ferry/admin/<name>`
    Admin(String),
}

/// The site of agents whose certificate names none.
pub const DEFAULT_SITE: &str = "default";

impl Role {
    pub const AGENT_PREFIX: &'static str = "spiffe://ferry/agent/";
    pub const ADMIN_PREFIX: &'static str = "spiffe://ferry/admin/";

    /// An agent of `site` called `name`.
    pub fn agent(name: impl Into<String>, site: impl Into<String>) -> Role {
        Role::Agent {
            name: name.into(),
            site: site.into(),
        }
    }

    /// Parses one SAN URI; `None` for URIs that are not ferry roles.
    pub fn from_uri(uri: &str) -> Option<Role> {
        let valid = |name: &str| {
            !name.is_empty()
                && name.len() <= 128
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if let Some(rest) = uri.strip_prefix(Self::AGENT_PREFIX) {
            return match rest.split_once('/') {
                Some((site, name)) => (crate::validate::site(site).is_ok() && valid(name))
                    .then(|| Role::agent(name, site)),
                None => valid(rest).then(|| Role::agent(rest, DEFAULT_SITE)),
            };
        }
        if let Some(name) = uri.strip_prefix(Self::ADMIN_PREFIX) {
            return valid(name).then(|| Role::Admin(name.to_string()));
        }
        None
    }

    pub fn uri(&self) -> String {
        match self {
            Role::Agent { name, site } => format!("{}{site}/{name}", Self::AGENT_PREFIX),
            Role::Admin(n) => format!("{}{n}", Self::ADMIN_PREFIX),
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Role::Agent { name, .. } | Role::Admin(name) => name,
        }
    }

    /// The identity of an agent role; `None` for an admin.
    pub fn agent_id(&self) -> Option<AgentId> {
        match self {
            Role::Agent { name, site } => Some(AgentId::new(site.clone(), name.clone())),
            Role::Admin(_) => None,
        }
    }
}

/// An agent's identity: the site and name its certificate carries. Operators
/// name agents after their role, so `agent-1` at two sites is two agents;
/// every lease, poll lease, post-action recipient, revocation and drain names
/// both. Its text form `site/name` (a site has no `/`) is how the
/// coordinators record an agent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentId {
    pub site: String,
    pub name: String,
}

impl AgentId {
    pub fn new(site: impl Into<String>, name: impl Into<String>) -> AgentId {
        AgentId {
            site: site.into(),
            name: name.into(),
        }
    }

    /// Parses the text form `site/name`; `None` when it has no site.
    pub fn parse(key: &str) -> Option<AgentId> {
        let (site, name) = key.split_once('/')?;
        (!site.is_empty() && !name.is_empty()).then(|| AgentId::new(site, name))
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.site, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_through_text() {
        for st in FileStatus::ALL {
            assert_eq!(st.as_str().parse::<FileStatus>().unwrap(), st);
        }
        assert_eq!(
            "in-progress".parse::<FileStatus>().unwrap(),
            FileStatus::InProgress
        );
        assert!("done".parse::<FileStatus>().is_err());
    }

    #[test]
    fn post_action_parses_and_prints() {
        assert_eq!("".parse::<PostAction>().unwrap(), PostAction::Keep);
        assert_eq!("delete".parse::<PostAction>().unwrap(), PostAction::Delete);
        assert_eq!(
            "move:/archive/".parse::<PostAction>().unwrap(),
            PostAction::Move("/archive".into())
        );
        assert_eq!(PostAction::Move("/a".into()).to_string(), "move:/a");
        assert!("move:archive".parse::<PostAction>().is_err());
        assert!("move:".parse::<PostAction>().is_err());
        assert_eq!(PostAction::move_to("/"), Ok(PostAction::Move("/".into())));
        assert!(PostAction::move_to("done").is_err());
        assert_eq!(
            PostAction::try_from("move:/a/".to_string()),
            Ok(PostAction::Move("/a".into()))
        );
        assert!("remove".parse::<PostAction>().is_err());
        for bad in ["/in/.", "/x/../in", "/a//b", "/in\n"] {
            let err = PostAction::move_to(bad).unwrap_err();
            assert!(err.starts_with("the move target"), "{err}");
            assert!(format!("move:{bad}").parse::<PostAction>().is_err());
        }
        // Rows stored before the check stay readable, as written.
        assert_eq!(
            PostAction::try_from("move:/x/../in".to_string()),
            Ok(PostAction::Move("/x/../in".into()))
        );
    }

    #[test]
    fn roles_come_from_spiffe_uris_only() {
        assert_eq!(
            Role::from_uri("spiffe://ferry/agent/dmz/a-1"),
            Some(Role::agent("a-1", "dmz"))
        );
        // The form without a site serves the default site only.
        assert_eq!(
            Role::from_uri("spiffe://ferry/agent/a-1"),
            Some(Role::agent("a-1", DEFAULT_SITE))
        );
        assert_eq!(
            Role::from_uri("spiffe://ferry/admin/alice"),
            Some(Role::Admin("alice".into()))
        );
        assert_eq!(Role::from_uri("spiffe://ferry/agent/"), None);
        assert_eq!(Role::from_uri("spiffe://ferry/agent/dmz/"), None);
        assert_eq!(Role::from_uri("spiffe://ferry/agent/bad site/a"), None);
        assert_eq!(Role::from_uri("spiffe://ferry/agent/a/b/c"), None);
        assert_eq!(Role::from_uri("spiffe://other/admin/x"), None);
        assert_eq!(Role::agent("x", "dmz").uri(), "spiffe://ferry/agent/dmz/x");
        assert_eq!(
            Role::from_uri(&Role::agent("x", "dmz").uri()),
            Some(Role::agent("x", "dmz"))
        );
    }

    #[test]
    fn an_agent_is_its_site_and_name() {
        let a = Role::agent("agent-1", "site-a").agent_id().unwrap();
        let b = Role::agent("agent-1", "site-b").agent_id().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.to_string(), "site-a/agent-1");
        assert_eq!(AgentId::parse("site-a/agent-1"), Some(a));
        assert_eq!(AgentId::parse("agent-1"), None);
        assert_eq!(AgentId::parse("/agent-1"), None);
        assert_eq!(Role::Admin("x".into()).agent_id(), None);
    }
}
