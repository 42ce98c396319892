//! Per-process Prometheus metrics both binaries share: counters, gauges and
//! fixed-bucket histograms held in `static`s, rendered in the Prometheus text
//! exposition format (version 0.0.4) for `/metrics` on `FERRY_HTTP_LISTEN`
//! ([`crate::http`]).
//!
//! Hand-rolled on purpose: a few mutex-guarded maps, no global registry, no
//! dependency. Each binary declares its metrics as `static`s (its own
//! `metrics.rs`) and renders the list it owns with [`render`]. Call sites stay
//! one line (`metrics::TRANSFERS.inc(&[site])`).
//!
//! Conventions: names start with `ferry_`, carry their unit (`_seconds`,
//! `_bytes`) and counters end in `_total`. Label values must come from a
//! bounded set (server names, sites, kinds, outcomes; never paths or ids); as
//! a guard, a metric keeps at most [`MAX_SERIES`] label sets and folds any
//! further ones into one series whose values are all [`OVERFLOW`].

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use ferry_common::sync::lock;

/// Label sets one metric keeps before folding new ones into [`OVERFLOW`].
pub const MAX_SERIES: usize = 1000;
/// The label value of the series that collects label sets past [`MAX_SERIES`].
pub const OVERFLOW: &str = "_overflow";

/// Label values, in the order of the metric's label names.
type Key = Vec<String>;

/// Buckets (upper bounds, seconds) for work that takes milliseconds to
/// seconds, such as a directory listing.
pub const FAST_SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Buckets (upper bounds, seconds) for work that takes up to an hour, such as
/// a file transfer.
pub const SLOW_SECONDS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

/// A metric that can write itself in the text format.
pub trait Metric: Sync {
    /// Appends `# HELP`, `# TYPE` and the samples to `out`.
    fn render(&self, out: &mut String);
}

/// The exposition text of `metrics`, in the given order.
pub fn render(metrics: &[&dyn Metric]) -> String {
    let mut out = String::new();
    for m in metrics {
        m.render(&mut out);
    }
    out
}

/// A label value escaped for the text format (`\`, `"` and newlines).
pub fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `{a="x",b="y"}` of `names` and `values` (empty when there are no labels);
/// `extra` is appended (a histogram's `le`).
fn labels(names: &[&str], values: &[String], extra: Option<(&str, &str)>) -> String {
    let mut pairs: Vec<String> = names
        .iter()
        .zip(values)
        .map(|(n, v)| format!("{n}=\"{}\"", escape(v)))
        .collect();
    if let Some((n, v)) = extra {
        pairs.push(format!("{n}=\"{v}\""));
    }
    if pairs.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", pairs.join(","))
    }
}

/// A sample value: integers without a fraction, `+Inf`/`-Inf`/`NaN` spelled
/// the way Prometheus reads them.
pub fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let help = help.replace('\\', "\\\\").replace('\n', "\\n");
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Writes a whole gauge family from computed samples (`(label pairs, value)`),
/// for metrics computed at scrape time rather than held in a `static`.
pub fn write_gauge(out: &mut String, name: &str, help: &str, samples: &[(Vec<(&str, &str)>, f64)]) {
    header(out, name, help, "gauge");
    for (pairs, value) in samples {
        let names: Vec<&str> = pairs.iter().map(|(n, _)| *n).collect();
        let values: Vec<String> = pairs.iter().map(|(_, v)| (*v).to_string()).collect();
        let _ = writeln!(
            out,
            "{name}{} {}",
            labels(&names, &values, None),
            number(*value)
        );
    }
}

/// The map key of `values`, or the overflow key once `series` is full.
/// Missing values are empty, extra ones ignored.
fn key<V>(series: &BTreeMap<Key, V>, names: &[&str], values: &[&str]) -> Key {
    let key: Key = (0..names.len())
        .map(|i| values.get(i).copied().unwrap_or_default().to_string())
        .collect();
    if series.len() >= MAX_SERIES && !series.contains_key(&key) {
        vec![OVERFLOW.to_string(); names.len()]
    } else {
        key
    }
}

/// Name, help and label names of a metric, plus label sets shown (at zero)
/// before anything was recorded, so `rate()` has a series from the start.
struct Desc {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    preset: &'static [&'static [&'static str]],
}

/// A monotonically increasing count.
pub struct Counter {
    desc: Desc,
    series: Mutex<BTreeMap<Key, u64>>,
}

impl Counter {
    pub const fn new(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
    ) -> Counter {
        Counter {
            desc: Desc {
                name,
                help,
                labels,
                preset: &[],
            },
            series: Mutex::new(BTreeMap::new()),
        }
    }

    /// Label sets rendered as 0 until they are counted.
    pub const fn preset(mut self, sets: &'static [&'static [&'static str]]) -> Counter {
        self.desc.preset = sets;
        self
    }

    pub fn inc(&self, values: &[&str]) {
        self.add(values, 1);
    }

    pub fn add(&self, values: &[&str], n: u64) {
        let mut series = lock(&self.series);
        let k = key(&series, self.desc.labels, values);
        let v = series.entry(k).or_insert(0);
        *v = v.saturating_add(n);
    }

    /// The current count of one label set (0 if never counted).
    pub fn get(&self, values: &[&str]) -> u64 {
        let owned: Key = values.iter().map(|v| v.to_string()).collect();
        lock(&self.series).get(&owned).copied().unwrap_or(0)
    }
}

impl Metric for Counter {
    fn render(&self, out: &mut String) {
        let d = &self.desc;
        header(out, d.name, d.help, "counter");
        let mut series = lock(&self.series).clone();
        with_presets(&mut series, d, 0);
        if d.labels.is_empty() && series.is_empty() {
            series.insert(Vec::new(), 0);
        }
        for (values, v) in series {
            let _ = writeln!(out, "{}{} {v}", d.name, labels(d.labels, &values, None));
        }
    }
}

fn with_presets<V: Clone>(series: &mut BTreeMap<Key, V>, d: &Desc, zero: V) {
    for set in d.preset {
        let k: Key = set.iter().map(|v| v.to_string()).collect();
        series.entry(k).or_insert_with(|| zero.clone());
    }
}

/// A value that goes up and down.
pub struct Gauge {
    desc: Desc,
    series: Mutex<BTreeMap<Key, i64>>,
}

impl Gauge {
    pub const fn new(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
    ) -> Gauge {
        Gauge {
            desc: Desc {
                name,
                help,
                labels,
                preset: &[],
            },
            series: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn set(&self, values: &[&str], v: i64) {
        let mut series = lock(&self.series);
        let k = key(&series, self.desc.labels, values);
        series.insert(k, v);
    }

    pub fn add(&self, values: &[&str], delta: i64) {
        let mut series = lock(&self.series);
        let k = key(&series, self.desc.labels, values);
        let v = series.entry(k).or_insert(0);
        *v = v.saturating_add(delta);
    }

    pub fn get(&self, values: &[&str]) -> i64 {
        let owned: Key = values.iter().map(|v| v.to_string()).collect();
        lock(&self.series).get(&owned).copied().unwrap_or(0)
    }

    /// Adds 1 to the label-less gauge until the returned guard is dropped
    /// (something open or running).
    pub fn hold(&'static self) -> GaugeHold {
        self.add(&[], 1);
        GaugeHold(self)
    }
}

/// Keeps a [`Gauge`] raised by one while alive; see [`Gauge::hold`].
pub struct GaugeHold(&'static Gauge);

impl Drop for GaugeHold {
    fn drop(&mut self) {
        self.0.add(&[], -1);
    }
}

impl std::fmt::Debug for GaugeHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GaugeHold({})", self.0.desc.name)
    }
}

impl Metric for Gauge {
    fn render(&self, out: &mut String) {
        let d = &self.desc;
        header(out, d.name, d.help, "gauge");
        let mut series = lock(&self.series).clone();
        if d.labels.is_empty() && series.is_empty() {
            series.insert(Vec::new(), 0);
        }
        for (values, v) in series {
            let _ = writeln!(out, "{}{} {v}", d.name, labels(d.labels, &values, None));
        }
    }
}

/// Observations counted into fixed buckets (cumulative in the text format),
/// with their sum and count.
pub struct Histogram {
    desc: Desc,
    /// Upper bounds, ascending; `+Inf` is implied.
    buckets: &'static [f64],
    series: Mutex<BTreeMap<Key, Observed>>,
}

#[derive(Debug, Clone, Default)]
struct Observed {
    /// Per bucket (not cumulative), plus one for `+Inf`.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub const fn new(
        name: &'static str,
        help: &'static str,
        labels: &'static [&'static str],
        buckets: &'static [f64],
    ) -> Histogram {
        Histogram {
            desc: Desc {
                name,
                help,
                labels,
                preset: &[],
            },
            buckets,
            series: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn observe(&self, values: &[&str], v: f64) {
        let mut series = lock(&self.series);
        let k = key(&series, self.desc.labels, values);
        let o = series.entry(k).or_default();
        if o.counts.is_empty() {
            o.counts = vec![0; self.buckets.len() + 1];
        }
        let i = self
            .buckets
            .iter()
            .position(|le| v <= *le)
            .unwrap_or(self.buckets.len());
        o.counts[i] = o.counts[i].saturating_add(1);
        o.sum += v;
        o.count = o.count.saturating_add(1);
    }

    pub fn observe_duration(&self, values: &[&str], d: Duration) {
        self.observe(values, d.as_secs_f64());
    }

    /// Observations of one label set so far.
    pub fn count(&self, values: &[&str]) -> u64 {
        let owned: Key = values.iter().map(|v| v.to_string()).collect();
        lock(&self.series).get(&owned).map_or(0, |o| o.count)
    }
}

impl Metric for Histogram {
    fn render(&self, out: &mut String) {
        let d = &self.desc;
        header(out, d.name, d.help, "histogram");
        let mut series = lock(&self.series).clone();
        if d.labels.is_empty() && series.is_empty() {
            series.insert(Vec::new(), Observed::default());
        }
        for (values, o) in series {
            let mut cumulative = 0u64;
            for (i, le) in self.buckets.iter().enumerate() {
                cumulative += o.counts.get(i).copied().unwrap_or(0);
                let _ = writeln!(
                    out,
                    "{}_bucket{} {cumulative}",
                    d.name,
                    labels(d.labels, &values, Some(("le", &number(*le))))
                );
            }
            let _ = writeln!(
                out,
                "{}_bucket{} {}",
                d.name,
                labels(d.labels, &values, Some(("le", "+Inf"))),
                o.count
            );
            let plain = labels(d.labels, &values, None);
            let _ = writeln!(out, "{}_sum{plain} {}", d.name, number(o.sum));
            let _ = writeln!(out, "{}_count{plain} {}", d.name, o.count);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_render_presets_labels_and_escapes() {
        static C: Counter = Counter::new("ferry_test_things_total", "Things.", &["site", "kind"])
            .preset(&[&["a", "lost"]]);
        static PLAIN: Counter = Counter::new("ferry_test_plain_total", "Plain.", &[]);
        C.inc(&["a\"b", "transient"]);
        C.add(&["a\"b", "transient"], 4);
        assert_eq!(C.get(&["a\"b", "transient"]), 5);
        let text = render(&[&C, &PLAIN]);
        assert_eq!(
            text,
            "# HELP ferry_test_things_total Things.\n\
             # TYPE ferry_test_things_total counter\n\
             ferry_test_things_total{site=\"a\",kind=\"lost\"} 0\n\
             ferry_test_things_total{site=\"a\\\"b\",kind=\"transient\"} 5\n\
             # HELP ferry_test_plain_total Plain.\n\
             # TYPE ferry_test_plain_total counter\n\
             ferry_test_plain_total 0\n"
        );
    }

    #[test]
    fn gauges_set_add_and_hold() {
        static G: Gauge = Gauge::new("ferry_test_open", "Open things.", &[]);
        static L: Gauge = Gauge::new("ferry_test_level", "Levels.", &["server"]);
        {
            let _a = G.hold();
            let _b = G.hold();
            assert_eq!(G.get(&[]), 2);
        }
        assert_eq!(G.get(&[]), 0);
        L.set(&["x"], 7);
        L.add(&["x"], -2);
        let text = render(&[&G, &L]);
        assert!(text.contains("# TYPE ferry_test_open gauge\nferry_test_open 0\n"));
        assert!(
            text.contains("ferry_test_level{server=\"x\"} 5\n"),
            "{text}"
        );
    }

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        static H: Histogram = Histogram::new(
            "ferry_test_duration_seconds",
            "Durations.",
            &["server"],
            &[0.5, 1.0, 2.5],
        );
        for v in [0.25, 0.5, 0.75, 3.0] {
            H.observe(&["s"], v);
        }
        H.observe_duration(&["s"], Duration::from_millis(2000));
        assert_eq!(H.count(&["s"]), 5);
        let text = render(&[&H]);
        assert_eq!(
            text,
            "# HELP ferry_test_duration_seconds Durations.\n\
             # TYPE ferry_test_duration_seconds histogram\n\
             ferry_test_duration_seconds_bucket{server=\"s\",le=\"0.5\"} 2\n\
             ferry_test_duration_seconds_bucket{server=\"s\",le=\"1\"} 3\n\
             ferry_test_duration_seconds_bucket{server=\"s\",le=\"2.5\"} 4\n\
             ferry_test_duration_seconds_bucket{server=\"s\",le=\"+Inf\"} 5\n\
             ferry_test_duration_seconds_sum{server=\"s\"} 6.5\n\
             ferry_test_duration_seconds_count{server=\"s\"} 5\n"
        );
    }

    #[test]
    fn an_unlabelled_histogram_renders_empty_buckets() {
        static H: Histogram = Histogram::new("ferry_test_idle_seconds", "Idle.", &[], &[1.0]);
        let text = render(&[&H]);
        assert!(text.contains("ferry_test_idle_seconds_bucket{le=\"1\"} 0\n"));
        assert!(text.contains("ferry_test_idle_seconds_bucket{le=\"+Inf\"} 0\n"));
        assert!(text.contains("ferry_test_idle_seconds_sum 0\nferry_test_idle_seconds_count 0\n"));
    }

    #[test]
    fn label_sets_past_the_limit_fold_into_overflow() {
        static C: Counter = Counter::new("ferry_test_many_total", "Many.", &["server"]);
        for i in 0..MAX_SERIES + 5 {
            C.inc(&[&format!("s{i}")]);
        }
        assert_eq!(C.get(&["s0"]), 1);
        assert_eq!(C.get(&[OVERFLOW]), 5);
        // A known label set still counts as itself.
        C.inc(&["s1"]);
        assert_eq!(C.get(&["s1"]), 2);
    }

    #[test]
    fn computed_gauges_and_numbers() {
        let mut out = String::new();
        write_gauge(
            &mut out,
            "ferry_test_files",
            "Files.",
            &[(vec![("server", "a\nb")], 2.0), (vec![], 0.25)],
        );
        assert_eq!(
            out,
            "# HELP ferry_test_files Files.\n# TYPE ferry_test_files gauge\n\
             ferry_test_files{server=\"a\\nb\"} 2\nferry_test_files 0.25\n"
        );
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(90.0), "90");
    }
}
