//! Prometheus metrics, kept by hand and rendered in the text exposition format
//! (version 0.0.4): request counts by route and status, request latency and in-flight
//! requests by route, encoder batch sizes, queue rejections and the index's size.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Request latency buckets, in seconds.
const LATENCY_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Batch size buckets (texts or requests per encoder batch).
const SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// A cumulative histogram with fixed bucket bounds.
#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative counts per bucket; the last one is `+Inf`.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, counts: vec![0; bounds.len() + 1], sum: 0.0, count: 0 }
    }

    fn observe(&mut self, v: f64) {
        let i = self.bounds.iter().position(|&b| v <= b).unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c;
            let le = self.bounds.get(i).map_or("+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}");
        }
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

#[derive(Debug)]
struct Inner {
    /// (route, status) → count.
    requests: BTreeMap<(String, u16), u64>,
    latency: BTreeMap<String, Histogram>,
    in_flight: BTreeMap<String, i64>,
    batch_texts: Histogram,
    batch_requests: Histogram,
    rejected: u64,
    examples_added: u64,
}

/// The server's metrics; cheap to update from any task.
#[derive(Debug)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                requests: BTreeMap::new(),
                latency: BTreeMap::new(),
                in_flight: BTreeMap::new(),
                batch_texts: Histogram::new(SIZE_BUCKETS),
                batch_requests: Histogram::new(SIZE_BUCKETS),
                rejected: 0,
                examples_added: 0,
            }),
        }
    }
}

/// What the index looks like now, rendered as gauges.
#[derive(Debug, Clone, Copy, Default)]
pub struct IndexGauges {
    pub examples: usize,
    pub spans: usize,
    pub labels: usize,
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves only counters behind: keep using them.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn request_started(&self, route: &str) {
        *self.lock().in_flight.entry(route.to_string()).or_default() += 1;
    }

    pub fn request_finished(&self, route: &str, status: u16, elapsed: Duration) {
        let mut m = self.lock();
        *m.in_flight.entry(route.to_string()).or_default() -= 1;
        *m.requests.entry((route.to_string(), status)).or_default() += 1;
        m.latency.entry(route.to_string()).or_insert_with(|| Histogram::new(LATENCY_BUCKETS)).observe(elapsed.as_secs_f64());
    }

    /// One encoder batch of `texts` texts from `requests` requests.
    pub fn batch(&self, texts: usize, requests: usize) {
        let mut m = self.lock();
        m.batch_texts.observe(texts as f64);
        m.batch_requests.observe(requests as f64);
    }

    pub fn rejected(&self) {
        self.lock().rejected += 1;
    }

    pub fn examples_added(&self, n: usize) {
        self.lock().examples_added += n as u64;
    }

    /// The Prometheus text exposition of everything, with the queue and index gauges.
    pub fn render(&self, queue_depth: usize, queue_capacity: usize, index: IndexGauges) -> String {
        let m = self.lock();
        let mut out = String::new();
        let family = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        family(&mut out, "nearspan_http_requests_total", "counter", "HTTP requests answered, by route and status.");
        for ((route, status), n) in &m.requests {
            let _ = writeln!(out, "nearspan_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
        }
        family(&mut out, "nearspan_http_request_duration_seconds", "histogram", "Time to answer an HTTP request, by route.");
        for (route, h) in &m.latency {
            h.render(&mut out, "nearspan_http_request_duration_seconds", &format!("route=\"{route}\""));
        }
        family(&mut out, "nearspan_http_requests_in_flight", "gauge", "HTTP requests being answered now, by route.");
        for (route, n) in &m.in_flight {
            let _ = writeln!(out, "nearspan_http_requests_in_flight{{route=\"{route}\"}} {n}");
        }
        family(&mut out, "nearspan_batch_size_texts", "histogram", "Texts per encoder batch of the micro-batcher.");
        m.batch_texts.render(&mut out, "nearspan_batch_size_texts", "");
        family(&mut out, "nearspan_batch_size_requests", "histogram", "Parse requests merged into one encoder batch.");
        m.batch_requests.render(&mut out, "nearspan_batch_size_requests", "");
        family(&mut out, "nearspan_queue_depth", "gauge", "Parse requests waiting for the encoder.");
        let _ = writeln!(out, "nearspan_queue_depth {queue_depth}");
        family(&mut out, "nearspan_queue_capacity", "gauge", "Parse requests that may wait (--queue).");
        let _ = writeln!(out, "nearspan_queue_capacity {queue_capacity}");
        family(&mut out, "nearspan_queue_rejected_total", "counter", "Parse requests refused with 503 because the queue was full.");
        let _ = writeln!(out, "nearspan_queue_rejected_total {}", m.rejected);
        family(&mut out, "nearspan_examples_added_total", "counter", "Examples added through POST /v1/examples.");
        let _ = writeln!(out, "nearspan_examples_added_total {}", m.examples_added);
        family(&mut out, "nearspan_index_examples", "gauge", "Examples in the index.");
        let _ = writeln!(out, "nearspan_index_examples {}", index.examples);
        family(&mut out, "nearspan_index_spans", "gauge", "Span vectors in the index.");
        let _ = writeln!(out, "nearspan_index_spans {}", index.spans);
        family(&mut out, "nearspan_index_labels", "gauge", "Distinct span labels in the index (the non-slot label included).");
        let _ = writeln!(out, "nearspan_index_labels {}", index.labels);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.request_started("/v1/parse");
        m.request_finished("/v1/parse", 200, Duration::from_millis(3));
        m.request_started("/v1/parse");
        m.request_finished("/v1/parse", 200, Duration::from_millis(30));
        m.batch(5, 2);
        let text = m.render(0, 8, IndexGauges { examples: 3, spans: 10, labels: 2 });
        assert!(text.contains("nearspan_http_requests_total{route=\"/v1/parse\",status=\"200\"} 2"), "{text}");
        assert!(text.contains("nearspan_http_request_duration_seconds_bucket{route=\"/v1/parse\",le=\"0.005\"} 1"), "{text}");
        assert!(text.contains("nearspan_http_request_duration_seconds_bucket{route=\"/v1/parse\",le=\"0.05\"} 2"), "{text}");
        assert!(text.contains("nearspan_http_request_duration_seconds_bucket{route=\"/v1/parse\",le=\"+Inf\"} 2"), "{text}");
        assert!(text.contains("nearspan_http_requests_in_flight{route=\"/v1/parse\"} 0"), "{text}");
        assert!(text.contains("nearspan_batch_size_texts_bucket{le=\"8\"} 1"), "{text}");
        assert!(text.contains("nearspan_batch_size_texts_bucket{le=\"4\"} 0"), "{text}");
        assert!(text.contains("nearspan_batch_size_requests_count 1"), "{text}");
        assert!(text.contains("nearspan_index_examples 3"), "{text}");
    }
}
