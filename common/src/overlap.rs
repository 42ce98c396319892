//! Whether watches of one server could ingest one file twice: overlapping
//! trees, and `move:` targets that land inside a watched tree.
//!
//! **Rule:** two watches of one server overlap when their directories are
//! equal, or one is recursive and the other's directory lies inside its tree,
//! unless their globs are provably disjoint (two literal names, or patterns
//! `prefix*suffix` whose prefixes or suffixes cannot both hold). A `move:`
//! target overlaps when a watch of the server would see the moved file: it is
//! the watch's directory, or inside the tree of a recursive watch (globs are
//! not considered: the moved file keeps a name its own watch matched).
//! Moves still to come count as well: a file's post-action is the one
//! snapshotted when it was discovered, so a watch may not cover a directory
//! into which pending post-actions will move files ([`PendingMove`]), even
//! after the watch that asked for the move changed its post-action.
//!
//! Directories are compared as text, so they must be written one way
//! ([`crate::validate::absolute_dir`]); [`lexically_normal`] brings rows
//! stored before that rule to the same form.

use crate::validate::{Checked, FieldError};

/// What the checks need of a watch (directories normalized as stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchTree<'a> {
    /// The watch's id; 0 for a watch not yet stored.
    pub id: i64,
    pub directory: &'a str,
    /// File-name glob; empty means `*`.
    pub glob: &'a str,
    pub recursive: bool,
    /// Directory of a `move:` post-action, if any.
    pub move_target: Option<&'a str>,
}

impl WatchTree<'_> {
    /// Whether a file placed directly in `dir` is in this watch's tree.
    fn sees_files_in(&self, dir: &str) -> bool {
        dir == self.directory || (self.recursive && is_below(dir, self.directory))
    }

    fn describe(&self) -> String {
        format!(
            "watch {} ({}{}, glob {:?})",
            self.id,
            self.directory,
            if self.recursive { ", recursive" } else { "" },
            if self.glob.is_empty() { "*" } else { self.glob }
        )
    }
}

/// A move target snapshotted on files of the server whose post-action is
/// still to come (see `files.post_action`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingMove<'a> {
    pub target: &'a str,
    /// The watch whose files they are.
    pub watch_id: i64,
    /// How many files will be moved there.
    pub files: i64,
}

/// `dir` with `.`, `..` and empty segments resolved as text, as `/`-rooted
/// path (`/x/../in/.` is `/in`); for directories stored before they had to
/// be written one way. `..` above `/` stays at `/`.
pub fn lexically_normal(dir: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for seg in dir.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            seg => parts.push(seg),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Whether `dir` lies strictly below `root`.
fn is_below(dir: &str, root: &str) -> bool {
    if root == "/" {
        return dir != "/" && dir.starts_with('/');
    }
    dir.strip_prefix(root)
        .is_some_and(|rest| rest.starts_with('/') && rest.len() > 1)
}

/// Whether some file could be in both watches' trees and match both globs.
pub fn watches_overlap(a: &WatchTree<'_>, b: &WatchTree<'_>) -> bool {
    let trees = a.directory == b.directory
        || (a.recursive && is_below(b.directory, a.directory))
        || (b.recursive && is_below(a.directory, b.directory));
    trees && !globs_disjoint(a.glob, b.glob)
}

/// Checks a new or changed watch against its own move target, the other
/// live watches of its server and the moves still pending on the server's
/// files (including the watch's own). The error names the field to change.
pub fn check_against(
    watch: &WatchTree<'_>,
    others: &[WatchTree<'_>],
    pending: &[PendingMove<'_>],
) -> Checked<()> {
    if let Some(target) = watch.move_target
        && watch.sees_files_in(target)
    {
        return Err(FieldError::new(
            "post_action",
            format!(
                "move target {target} is inside the watched tree of this watch: moved files \
                 would be ingested again"
            ),
        ));
    }
    for other in others.iter().filter(|o| o.id != watch.id) {
        if watches_overlap(watch, other) {
            return Err(FieldError::new(
                "directory",
                format!(
                    "{}{} overlaps {} of the same server: a file could be ingested twice \
                     (watches overlap when their directories are equal or a recursive one \
                     contains the other, unless their globs are disjoint)",
                    watch.directory,
                    if watch.recursive { " (recursive)" } else { "" },
                    other.describe()
                ),
            ));
        }
        if let Some(target) = watch.move_target
            && other.sees_files_in(target)
        {
            return Err(FieldError::new(
                "post_action",
                format!(
                    "move target {target} is inside the tree of {}: moved files would be \
                     ingested again",
                    other.describe()
                ),
            ));
        }
        if let Some(target) = other.move_target
            && watch.sees_files_in(target)
        {
            return Err(FieldError::new(
                "directory",
                format!(
                    "the tree of {}{} contains move target {target} of {}: files it moves \
                     would be ingested again",
                    watch.directory,
                    if watch.recursive { " (recursive)" } else { "" },
                    other.describe()
                ),
            ));
        }
    }
    if let Some(p) = pending.iter().find(|p| watch.sees_files_in(p.target)) {
        return Err(FieldError::new(
            "directory",
            format!(
                "the tree of {}{} contains {}, into which the pending post-actions of {} \
                 file(s) of watch {} will move them: they would be ingested again (choose \
                 another directory, or wait until those post-actions are done)",
                watch.directory,
                if watch.recursive { " (recursive)" } else { "" },
                p.target,
                p.files,
                p.watch_id
            ),
        ));
    }
    Ok(())
}

/// A glob we can reason about: a literal name, or `prefix*suffix`.
enum Shape<'a> {
    Exact(&'a str),
    Wild { prefix: &'a str, suffix: &'a str },
}

fn shape(glob: &str) -> Option<Shape<'_>> {
    let glob = if glob.is_empty() { "*" } else { glob };
    let special = |c: char| matches!(c, '?' | '[' | ']' | '{' | '}' | '\\' | '!');
    if glob.contains(special) {
        return None;
    }
    match glob.split_once('*') {
        None => Some(Shape::Exact(glob)),
        Some((prefix, suffix)) if !suffix.contains('*') => Some(Shape::Wild { prefix, suffix }),
        Some(_) => None,
    }
}

/// True only when no file name can match both globs.
pub fn globs_disjoint(a: &str, b: &str) -> bool {
    let compatible = |x: &str, y: &str, f: fn(&str, &str) -> bool| f(x, y) || f(y, x);
    match (shape(a), shape(b)) {
        (Some(Shape::Exact(x)), Some(Shape::Exact(y))) => x != y,
        (Some(Shape::Exact(name)), Some(Shape::Wild { prefix, suffix }))
        | (Some(Shape::Wild { prefix, suffix }), Some(Shape::Exact(name))) => {
            !(name.starts_with(prefix)
                && name.ends_with(suffix)
                && name.len() >= prefix.len() + suffix.len())
        }
        (
            Some(Shape::Wild {
                prefix: p1,
                suffix: s1,
            }),
            Some(Shape::Wild {
                prefix: p2,
                suffix: s2,
            }),
        ) => {
            !compatible(p1, p2, |x, y| x.starts_with(y))
                || !compatible(s1, s2, |x, y| x.ends_with(y))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w<'a>(id: i64, dir: &'a str, glob: &'a str, recursive: bool) -> WatchTree<'a> {
        WatchTree {
            id,
            directory: dir,
            glob,
            recursive,
            move_target: None,
        }
    }

    #[test]
    fn globs() {
        assert!(globs_disjoint("*.csv", "*.xml"));
        assert!(globs_disjoint("a.csv", "b.csv"));
        assert!(globs_disjoint("a.csv", "*.xml"));
        assert!(globs_disjoint("in_*", "out_*"));
        assert!(!globs_disjoint("*.csv", "*"));
        assert!(!globs_disjoint("", "*.csv"));
        assert!(!globs_disjoint("*.csv", "*.csv"));
        assert!(!globs_disjoint("a*", "*.csv"));
        assert!(!globs_disjoint("a.csv", "*.csv"));
        assert!(!globs_disjoint("*.tar.gz", "*.gz"));
        assert!(
            !globs_disjoint("*.[ct]sv", "*.xml"),
            "not provable: overlap"
        );
        assert!(!globs_disjoint("x", "x"));
    }

    #[test]
    fn trees() {
        let root = w(1, "/in", "", false);
        assert!(watches_overlap(&root, &w(2, "/in", "*.csv", false)));
        assert!(!watches_overlap(&root, &w(2, "/in/sub", "", false)));
        assert!(!watches_overlap(&root, &w(2, "/inbox", "", true)));
        assert!(watches_overlap(
            &w(1, "/in", "", true),
            &w(2, "/in/sub", "", false)
        ));
        assert!(watches_overlap(
            &w(2, "/in/sub/x", "", false),
            &w(1, "/in", "", true)
        ));
        assert!(watches_overlap(
            &w(1, "/", "", true),
            &w(2, "/in", "", false)
        ));
        assert!(!watches_overlap(
            &w(1, "/in", "*.csv", true),
            &w(2, "/in/a", "*.xml", true)
        ));
        assert!(!watches_overlap(
            &w(1, "/a", "", true),
            &w(2, "/b", "", true)
        ));
    }

    #[test]
    fn checks_name_the_field() {
        let mut new = w(0, "/in", "", true);
        new.move_target = Some("/in/done");
        assert_eq!(
            check_against(&new, &[], &[]).unwrap_err().field,
            "post_action"
        );
        new.move_target = Some("/archive");
        assert!(check_against(&new, &[], &[]).is_ok());
        assert_eq!(
            check_against(&new, &[w(3, "/archive", "", false)], &[])
                .unwrap_err()
                .field,
            "post_action"
        );
        let err = check_against(&new, &[w(3, "/in/x", "", false)], &[]).unwrap_err();
        assert_eq!(err.field, "directory");
        assert!(err.message.contains("watch 3"), "{}", err.message);
        let mut mover = w(4, "/out", "", false);
        mover.move_target = Some("/in/sub");
        assert_eq!(
            check_against(&new, &[mover], &[]).unwrap_err().field,
            "directory"
        );
        assert!(check_against(&w(0, "/out", "", false), &[w(4, "/in", "", false)], &[]).is_ok());
    }

    #[test]
    fn a_watch_is_not_compared_with_itself() {
        let me = w(5, "/in", "", true);
        assert!(check_against(&me, std::slice::from_ref(&me), &[]).is_ok());
    }

    #[test]
    fn pending_moves_count_even_of_the_watch_itself() {
        let pending = [PendingMove {
            target: "/archive",
            watch_id: 5,
            files: 3,
        }];
        // Watch 5 now keeps its files and moves to /archive: its own files
        // discovered under move:/archive would come back.
        let err = check_against(&w(5, "/archive", "", false), &[], &pending).unwrap_err();
        assert_eq!(err.field, "directory");
        assert!(
            err.message.contains("3 file(s) of watch 5"),
            "{}",
            err.message
        );
        let err = check_against(&w(0, "/", "", true), &[], &pending).unwrap_err();
        assert_eq!(err.field, "directory");
        assert!(check_against(&w(0, "/", "", false), &[], &pending).is_ok());
        assert!(check_against(&w(0, "/archive/sub", "", true), &[], &pending).is_ok());
        assert!(check_against(&w(0, "/archived", "", true), &[], &pending).is_ok());
    }

    #[test]
    fn stored_directories_normalize_as_text() {
        assert_eq!(lexically_normal("/x/../in"), "/in");
        assert_eq!(lexically_normal("/in/."), "/in");
        assert_eq!(lexically_normal("/in//sub/"), "/in/sub");
        assert_eq!(lexically_normal("/../.."), "/");
        assert_eq!(lexically_normal("/"), "/");
        assert_eq!(lexically_normal("/in"), "/in");
    }
}
