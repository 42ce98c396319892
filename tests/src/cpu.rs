//! Where a benchmark run's CPU goes: CPU time of the whole machine and of
//! each process name between two snapshots, read from `/proc` (Linux).
//!
//! A process's time counts its own CPU and that of the children it reaped
//! (`utime + stime + cutime + cstime`), so per-connection `sshd` children of
//! a listener that exited during the run still show up under `sshd`.
//! Processes that exited unreaped by a surviving parent are not seen. A pid
//! is the same process in both snapshots if its start time is the same:
//! kernel workers change their name with their work item, and a name change
//! must not count a worker's whole lifetime as used during the run.

use std::collections::HashMap;
use std::time::Duration;

/// CPU counters at one moment.
#[derive(Debug, Clone)]
pub struct CpuSnapshot {
    /// Busy ticks of all CPUs (everything but idle and iowait).
    busy: u64,
    /// pid -> (name, start time, ticks including reaped children).
    processes: HashMap<u32, (String, u64, u64)>,
}

/// CPU used between two snapshots.
#[derive(Debug, Clone)]
pub struct CpuUsage {
    /// All CPUs together (2 s on a 2-core machine in 1 s of wall time at most).
    pub busy: Duration,
    /// By process name, most first.
    pub by_name: Vec<(String, Duration)>,
}

impl CpuSnapshot {
    pub fn take() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let busy = stat.lines().next().map(machine_busy).unwrap_or(0);
        let mut processes = HashMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                    continue;
                };
                if let Some(p) = std::fs::read_to_string(entry.path().join("stat"))
                    .ok()
                    .and_then(|s| process_ticks(&s))
                {
                    processes.insert(pid, p);
                }
            }
        }
        CpuSnapshot { busy, processes }
    }

    /// What was used from `earlier` to this snapshot.
    pub fn since(&self, earlier: &CpuSnapshot) -> CpuUsage {
        let tick = tick();
        let mut by_name: HashMap<&str, u64> = HashMap::new();
        for (pid, (name, started, ticks)) in &self.processes {
            // The same process if it started at the same time; its name may
            // have changed (kernel workers are named after their current
            // work item). Another start time: the pid was reused.
            let before = match earlier.processes.get(pid) {
                Some((_, then, t)) if then == started => *t,
                _ => 0,
            };
            *by_name.entry(name).or_default() += ticks.saturating_sub(before);
        }
        let mut by_name: Vec<(String, Duration)> = by_name
            .into_iter()
            .filter(|(_, t)| *t > 0)
            .map(|(n, t)| (n.to_owned(), tick * t as u32))
            .collect();
        by_name.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        CpuUsage {
            busy: tick * self.busy.saturating_sub(earlier.busy) as u32,
            by_name,
        }
    }
}

impl CpuUsage {
    /// `busy` and the `top` biggest names, e.g.
    /// `CPU 12.3s: postgres 4.1s, sshd 3.0s, ...`.
    pub fn summary(&self, top: usize) -> String {
        let names: Vec<String> = self
            .by_name
            .iter()
            .take(top)
            .map(|(n, d)| format!("{n} {:.1}s", d.as_secs_f64()))
            .collect();
        format!("CPU {:.1}s: {}", self.busy.as_secs_f64(), names.join(", "))
    }
}

/// The length of one clock tick (`getconf CLK_TCK`, 100 Hz if unknown).
fn tick() -> Duration {
    let hz = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|hz| *hz > 0)
        .unwrap_or(100);
    Duration::from_secs(1) / hz
}

/// Busy ticks from the `cpu` line of `/proc/stat`: user, nice, system, irq,
/// softirq and steal (not idle, not iowait).
fn machine_busy(cpu_line: &str) -> u64 {
    let fields: Vec<u64> = cpu_line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| fields.get(i))
        .sum()
}

/// (name, start time, utime + stime + cutime + cstime) from a
/// `/proc/PID/stat` line. The name is in parentheses and may itself hold
/// spaces or parentheses.
fn process_ticks(stat: &str) -> Option<(String, u64, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?.to_owned();
    // After the name: state (field 3) ... utime is field 14, so index 11.
    let rest: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    let ticks = (11..=14)
        .map(|i| rest.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum::<Option<u64>>()?;
    // starttime is field 22.
    let started = rest.get(19)?.parse().ok()?;
    Some((name, started, ticks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_times_after_a_name_with_spaces_and_parentheses() {
        let line = "4242 (tokio (rt) 1) S 1 2 3 4 5 6 7 8 9 10 100 20 3 4 20 0 1 0 777 0";
        assert_eq!(
            process_ticks(line),
            Some(("tokio (rt) 1".to_owned(), 777, 100 + 20 + 3 + 4))
        );
    }

    #[test]
    fn machine_busy_leaves_out_idle_and_iowait() {
        // user nice system idle iowait irq softirq steal
        assert_eq!(
            machine_busy("cpu  10 1 5 1000 50 2 3 4 0 0"),
            10 + 1 + 5 + 2 + 3 + 4
        );
    }

    #[test]
    fn usage_counts_new_processes_whole_and_old_ones_by_difference() {
        let earlier = CpuSnapshot {
            busy: 100,
            processes: HashMap::from([
                (1, ("postgres".to_owned(), 5, 50)),
                (4, ("kworker/u8:1-writeback".to_owned(), 2, 900)),
                (5, ("sshd".to_owned(), 6, 300)),
            ]),
        };
        let later = CpuSnapshot {
            busy: 400,
            processes: HashMap::from([
                (1, ("postgres".to_owned(), 5, 80)),
                (2, ("postgres".to_owned(), 9, 40)),
                (3, ("sshd".to_owned(), 9, 10)),
                // Renamed after its work item: the same thread.
                (4, ("kworker/u8:1-flush-254:0".to_owned(), 2, 905)),
                // Pid 5 reused by a process started later.
                (5, ("sshd".to_owned(), 12, 20)),
            ]),
        };
        let usage = later.since(&earlier);
        let t = tick();
        assert_eq!(usage.busy, t * 300);
        assert_eq!(
            usage.by_name,
            vec![
                ("postgres".to_owned(), t * 70),
                ("sshd".to_owned(), t * 30),
                ("kworker/u8:1-flush-254:0".to_owned(), t * 5),
            ]
        );
    }
}
