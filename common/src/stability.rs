//! The stable-file rule: a file is reported only after its size and mtime were
//! unchanged across two consecutive polls and that (size, mtime) has been
//! seen for at least `min_age`. Pure: the poller feeds it listings, it
//! answers which entries became stable.
//!
//! Age is measured on the agent's clock alone, from the first poll that saw
//! the file's current (size, mtime): the server's mtime is only compared
//! with itself. A server whose clock is behind the agent's therefore cannot
//! make a stalled writer's partial file look old, and one whose clock is
//! ahead cannot hold files back.
//!
//! A listing can be fed in parts as it streams in ([`StabilityTracker::begin_poll`],
//! [`observe_part`](StabilityTracker::observe_part),
//! [`finish_poll`](StabilityTracker::finish_poll)), so the files of a huge
//! directory that became stable are reported while the rest is still being
//! listed. Only a finished poll replaces what the previous poll saw: a poll
//! cut short (a listing error) changes nothing, and whatever it reported is
//! reported again by the next one (the coordinator records a version once).

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
    /// When (the agent's clock, Unix seconds) a poll first saw `seen`.
    since_unix: i64,
    /// Already reported in this version.
    reported: bool,
}

/// Per-watch memory of what the previous poll saw.
#[derive(Debug, Default, Clone)]
pub struct StabilityTracker {
    /// What the last finished poll saw.
    files: HashMap<String, Tracked>,
    /// What the poll in progress has listed so far.
    listing: Option<HashMap<String, Tracked>>,
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
        self.begin_poll();
        let newly_stable = self.observe_part(listing, now_unix, min_age_secs);
        self.finish_poll();
        PollOutcome { newly_stable }
    }

    /// Starts a poll whose listing comes in parts. A poll that was begun and
    /// not finished is dropped.
    pub fn begin_poll(&mut self) {
        self.listing = Some(HashMap::with_capacity(self.files.len()));
    }

    /// Feeds the next part of the listing begun with [`Self::begin_poll`]
    /// (taken at `now_unix`); answers the files of this part that became
    /// stable. Outside a poll it begins one.
    pub fn observe_part(
        &mut self,
        part: impl IntoIterator<Item = (String, Observation)>,
        now_unix: i64,
        min_age_secs: u32,
    ) -> Vec<(String, Observation)> {
        let files = &self.files;
        let listing = self.listing.get_or_insert_with(HashMap::new);
        let mut newly_stable = Vec::new();
        for (path, seen) in part {
            if listing.contains_key(&path) {
                continue;
            }
            let tracked = match files.get(&path) {
                Some(prev) if prev.seen == seen => {
                    let old_enough =
                        now_unix.saturating_sub(prev.since_unix) >= i64::from(min_age_secs);
                    if !prev.reported && old_enough {
                        newly_stable.push((path.clone(), seen));
                        Tracked {
                            reported: true,
                            ..*prev
                        }
                    } else {
                        *prev
                    }
                }
                // First sighting, or changed since the last poll: its age
                // starts now, and it waits for one more poll.
                _ => Tracked {
                    seen,
                    since_unix: now_unix,
                    reported: false,
                },
            };
            listing.insert(path, tracked);
        }
        newly_stable
    }

    /// Drops the poll in progress (its listing failed): what the previous
    /// finished poll saw stays, and the memory of the partial listing is freed.
    pub fn abandon_poll(&mut self) {
        self.listing = None;
    }

    /// Ends the poll: what it listed replaces what the previous poll saw, so
    /// files missing from it are forgotten.
    pub fn finish_poll(&mut self) {
        self.files = self.listing.take().unwrap_or_default();
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
        let listed = self
            .listing
            .as_mut()
            .is_some_and(|l| l.remove(path).is_some());
        self.files.remove(path).is_some() || listed
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
        // First seen at 101: old enough from 161 on, by the agent's clock.
        poll(&mut t, &[("/y", 1, 100)], 101, 60);
        assert!(poll(&mut t, &[("/y", 1, 100)], 130, 60).is_empty());
        assert!(poll(&mut t, &[("/y", 1, 100)], 160, 60).is_empty());
        assert_eq!(poll(&mut t, &[("/y", 1, 100)], 161, 60), vec!["/y"]);
    }

    #[test]
    fn a_server_clock_behind_the_agent_does_not_age_a_stalled_file() {
        // The server's clock is a day behind: every mtime it reports is a day
        // old by the agent's clock. A writer stalls at 5 bytes.
        let day = 86_400;
        let now = 1_700_000_000;
        let mut t = StabilityTracker::default();
        assert!(poll(&mut t, &[("/p", 5, now - day)], now, 300).is_empty());
        assert!(poll(&mut t, &[("/p", 5, now - day)], now + 10, 300).is_empty());
        assert!(poll(&mut t, &[("/p", 5, now - day)], now + 299, 300).is_empty());
        // Unchanged for min_age as the agent saw it: stable.
        assert_eq!(
            poll(&mut t, &[("/p", 5, now - day)], now + 300, 300),
            vec!["/p"]
        );
    }

    #[test]
    fn a_server_clock_ahead_of_the_agent_does_not_hold_files_back() {
        // mtimes a day in the agent's future.
        let now = 1_700_000_000;
        let mut t = StabilityTracker::default();
        poll(&mut t, &[("/f", 5, now + 86_400)], now, 30);
        assert!(poll(&mut t, &[("/f", 5, now + 86_400)], now + 29, 30).is_empty());
        assert_eq!(
            poll(&mut t, &[("/f", 5, now + 86_400)], now + 30, 30),
            vec!["/f"]
        );
    }

    #[test]
    fn a_change_restarts_the_age() {
        let mut t = StabilityTracker::default();
        poll(&mut t, &[("/g", 1, 100)], 1000, 60);
        assert!(poll(&mut t, &[("/g", 2, 100)], 1050, 60).is_empty());
        // 60 s after the first sighting, but only 10 s after the change.
        assert!(poll(&mut t, &[("/g", 2, 100)], 1060, 60).is_empty());
        assert_eq!(poll(&mut t, &[("/g", 2, 100)], 1110, 60), vec!["/g"]);
    }

    #[test]
    fn an_abandoned_poll_keeps_the_last_finished_one() {
        let mut t = StabilityTracker::default();
        poll(&mut t, &[("/a", 1, 100)], 200, 0);
        t.begin_poll();
        assert!(part(&mut t, &[("/b", 1, 100)], 201).is_empty());
        t.abandon_poll();
        assert_eq!(t.len(), 1);
        assert_eq!(poll(&mut t, &[("/a", 1, 100)], 202, 0), vec!["/a"]);
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

    fn part(t: &mut StabilityTracker, files: &[(&str, u64, i64)], now: i64) -> Vec<String> {
        t.observe_part(
            files.iter().map(|(p, s, m)| (p.to_string(), obs(*s, *m))),
            now,
            0,
        )
        .into_iter()
        .map(|(p, _)| p)
        .collect()
    }

    #[test]
    fn a_listing_fed_in_parts_reports_each_parts_stable_files_at_once() {
        let mut t = StabilityTracker::default();
        poll(
            &mut t,
            &[("/a", 1, 100), ("/b", 1, 100), ("/c", 1, 100)],
            200,
            0,
        );
        t.begin_poll();
        assert_eq!(part(&mut t, &[("/a", 1, 100)], 201), vec!["/a"]);
        // Changed since the last poll: starts over.
        assert!(part(&mut t, &[("/b", 2, 150)], 201).is_empty());
        t.finish_poll();
        // "/c" was not listed by the finished poll: forgotten, so seen again
        // it is a first sighting.
        assert!(
            poll(
                &mut t,
                &[("/a", 1, 100), ("/b", 2, 150), ("/c", 1, 100)],
                202,
                0
            )
            .contains(&"/b".to_string())
        );
        assert_eq!(t.len(), 3);
        assert!(poll(&mut t, &[("/c", 1, 100)], 203, 0).contains(&"/c".to_string()));
    }

    #[test]
    fn a_poll_cut_short_changes_nothing_and_its_reports_come_again() {
        let mut t = StabilityTracker::default();
        poll(&mut t, &[("/a", 1, 100), ("/b", 1, 100)], 200, 0);
        t.begin_poll();
        assert_eq!(part(&mut t, &[("/a", 1, 100)], 201), vec!["/a"]);
        // The listing failed here; the next poll starts afresh.
        assert_eq!(
            poll(&mut t, &[("/a", 1, 100), ("/b", 1, 100)], 202, 0),
            vec!["/a", "/b"]
        );
        assert_eq!(t.stable_set().len(), 2);
    }

    #[test]
    fn a_path_forgotten_during_a_poll_is_a_first_sighting_afterwards() {
        let mut t = StabilityTracker::default();
        poll(&mut t, &[("/r", 5, 100)], 200, 0);
        assert_eq!(poll(&mut t, &[("/r", 5, 100)], 201, 0), vec!["/r"]);
        t.begin_poll();
        assert!(part(&mut t, &[("/r", 5, 100)], 202).is_empty());
        // Moved by its post-action while the listing went on.
        assert!(t.forget("/r"));
        t.finish_poll();
        assert!(poll(&mut t, &[("/r", 5, 100)], 203, 0).is_empty());
        assert_eq!(poll(&mut t, &[("/r", 5, 100)], 204, 0), vec!["/r"]);
    }
}
