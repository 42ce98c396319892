//! The stable-file rule: a file is reported only after its size and mtime were
//! unchanged across two consecutive polls and it is at least `min_age` old.
//! Pure: the poller feeds it listings, it answers which entries became stable.

use std::collections::HashMap;

/// One listed file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Observation {
    pub size: u64,
    /// Seconds since the Unix epoch.
    pub mtime_unix: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tracked {
    seen: Observation,
    /// Already reported in this version.
    reported: bool,
}

/// Per-watch memory of what the previous poll saw.
#[derive(Debug, Default, Clone)]
pub struct StabilityTracker {
    files: HashMap<String, Tracked>,
}

/// What one poll produced.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PollOutcome {
    /// Files that became stable in this poll (report them).
    pub newly_stable: Vec<(String, Observation)>,
}

impl StabilityTracker {
    /// Feeds one complete listing taken at `now_unix`. Files missing from the
    /// listing are forgotten; a file whose size or mtime changed starts over.
    pub fn observe(
        &mut self,
        listing: impl IntoIterator<Item = (String, Observation)>,
        now_unix: i64,
        min_age_secs: u32,
    ) -> PollOutcome {
        let mut next = HashMap::with_capacity(self.files.len());
        let mut out = PollOutcome::default();
        for (path, seen) in listing {
            let tracked = match self.files.remove(&path) {
                Some(prev) if prev.seen == seen => {
                    let old_enough =
                        now_unix.saturating_sub(seen.mtime_unix) >= i64::from(min_age_secs);
                    if !prev.reported && old_enough {
                        out.newly_stable.push((path.clone(), seen));
                        Tracked {
                            seen,
                            reported: true,
                        }
                    } else {
                        prev
                    }
                }
                // First sighting, or changed since the last poll: wait for one more.
                _ => Tracked {
                    seen,
                    reported: false,
                },
            };
            next.insert(path, tracked);
        }
        self.files = next;
        out
    }

    /// Every file currently considered stable (for a full resend after a reconnect).
    pub fn stable_set(&self) -> Vec<(String, Observation)> {
        self.files
            .iter()
            .filter(|(_, t)| t.reported)
            .map(|(p, t)| (p.clone(), t.seen))
            .collect()
    }

    /// Forgets `path` (ferry deleted or moved it): whatever appears there
    /// next is a first sighting, reported once stable, even with the same
    /// size and mtime (`rsync -a` re-sending the file).
    pub fn forget(&mut self, path: &str) -> bool {
        self.files.remove(path).is_some()
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(size: u64, mtime: i64) -> Observation {
        Observation {
            size,
            mtime_unix: mtime,
        }
    }

    fn poll(
        t: &mut StabilityTracker,
        files: &[(&str, u64, i64)],
        now: i64,
        min_age: u32,
    ) -> Vec<String> {
        t.observe(
            files.iter().map(|(p, s, m)| (p.to_string(), obs(*s, *m))),
            now,
            min_age,
        )
        .newly_stable
        .into_iter()
        .map(|(p, _)| p)
        .collect()
    }

    #[test]
    fn reported_after_two_identical_polls_and_only_once() {
        let mut t = StabilityTracker::default();
        assert!(poll(&mut t, &[("/a", 10, 100)], 200, 0).is_empty());
        assert_eq!(poll(&mut t, &[("/a", 10, 100)], 210, 0), vec!["/a"]);
        assert!(poll(&mut t, &[("/a", 10, 100)], 220, 0).is_empty());
        assert_eq!(t.stable_set(), vec![("/a".to_string(), obs(10, 100))]);
    }

    #[test]
    fn growing_file_is_never_reported_until_it_stops() {
        let mut t = StabilityTracker::default();
        for (i, size) in [1u64, 5, 9, 12].iter().enumerate() {
            assert!(poll(&mut t, &[("/g", *size, 100 + i as i64)], 200, 0).is_empty());
        }
        assert_eq!(poll(&mut t, &[("/g", 12, 103)], 210, 0), vec!["/g"]);
    }

    #[test]
    fn min_age_holds_back_young_files() {
        let mut t = StabilityTracker::default();
        poll(&mut t, &[("/y", 1, 100)], 101, 60);
        assert!(poll(&mut t, &[("/y", 1, 100)], 130, 60).is_empty());
        assert_eq!(poll(&mut t, &[("/y", 1, 100)], 160, 60), vec!["/y"]);
    }

    #[test]
    fn a_forgotten_path_is_reported_again_even_unchanged() {
        let mut t = StabilityTracker::default();
        poll(&mut t, &[("/r", 5, 100)], 200, 0);
        assert_eq!(poll(&mut t, &[("/r", 5, 100)], 201, 0), vec!["/r"]);
        // Deleted by ferry and re-sent with the same size and mtime before
        // the next poll could see it gone.
        assert!(t.forget("/r"));
        assert!(poll(&mut t, &[("/r", 5, 100)], 202, 0).is_empty());
        assert_eq!(poll(&mut t, &[("/r", 5, 100)], 203, 0), vec!["/r"]);
        assert!(!t.forget("/never-seen"));
    }

    #[test]
    fn vanished_file_is_forgotten_and_replacement_is_a_new_version() {
        let mut t = StabilityTracker::default();
        poll(&mut t, &[("/v", 1, 100)], 200, 0);
        poll(&mut t, &[], 201, 0);
        assert!(poll(&mut t, &[("/v", 1, 100)], 202, 0).is_empty());
        assert_eq!(poll(&mut t, &[("/v", 1, 100)], 203, 0), vec!["/v"]);
        // Replaced under the same name: reported again once stable.
        assert!(poll(&mut t, &[("/v", 2, 300)], 400, 0).is_empty());
        assert_eq!(poll(&mut t, &[("/v", 2, 300)], 401, 0), vec!["/v"]);
    }
}
