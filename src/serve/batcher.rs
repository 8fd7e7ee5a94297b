//! Micro-batching of parse requests through the encoder.
//!
//! Handlers [`Batcher::submit`] their texts into a bounded queue (`--queue` requests);
//! when it is full they get [`ServeError::Overloaded`] at once (503 with Retry-After)
//! rather than waiting without bound. One worker task takes the first waiting request,
//! then keeps taking requests until the batch holds `--max-batch` texts or `--max-wait-ms`
//! have passed, runs the whole batch through the labeler in `spawn_blocking` (one encoder
//! pass for all of them), and answers each request through its oneshot channel. A request
//! that would overflow the batch waits for the next one; a single request larger than
//! `--max-batch` is a batch by itself. Requests whose client has gone are skipped.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::errors::ServeError;
use super::metrics::Metrics;
use crate::labeler::Prediction;

/// Labels a batch of texts: one prediction per text, in order.
pub type ProcessFn = dyn Fn(&[&str]) -> Result<Vec<Prediction>, ServeError> + Send + Sync;
pub type Process = Arc<ProcessFn>;

/// The batcher's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Texts per encoder batch (a larger single request still goes alone).
    pub max_batch: usize,
    /// Longest wait for more requests after the first of a batch.
    pub max_wait: Duration,
    /// Requests that may wait; more are refused.
    pub queue: usize,
}

struct Job {
    texts: Vec<String>,
    reply: oneshot::Sender<Result<Vec<Prediction>, ServeError>>,
}

/// The handle handlers submit through; cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Job>,
    metrics: Arc<Metrics>,
}

impl Batcher {
    /// Starts the worker on the current tokio runtime.
    pub fn start(config: BatchConfig, process: Process, metrics: Arc<Metrics>) -> Result<Self, ServeError> {
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| ServeError::Internal("the batcher must be started inside a tokio runtime".into()))?;
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        handle.spawn(work(rx, config, process, metrics.clone()));
        Ok(Self { tx, metrics })
    }

    /// Labels `texts` in the next batch; refuses at once when the queue is full.
    pub async fn submit(&self, texts: Vec<String>) -> Result<Vec<Prediction>, ServeError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        self.tx.try_send(Job { texts, reply }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                self.metrics.rejected();
                ServeError::Overloaded { capacity: self.capacity() }
            }
            mpsc::error::TrySendError::Closed(_) => ServeError::ShuttingDown,
        })?;
        answer.await.map_err(|_| ServeError::Internal("the labeling worker stopped before answering".into()))?
    }

    /// Requests waiting now.
    pub fn depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    pub fn capacity(&self) -> usize {
        self.tx.max_capacity()
    }
}

async fn work(mut rx: mpsc::Receiver<Job>, config: BatchConfig, process: Process, metrics: Arc<Metrics>) {
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match rx.recv().await {
                Some(job) => job,
                None => break,
            },
        };
        let mut n_texts = first.texts.len();
        let mut jobs = vec![first];
        let deadline = Instant::now() + config.max_wait;
        while n_texts < config.max_batch {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(job)) if n_texts + job.texts.len() > config.max_batch => {
                    carried = Some(job);
                    break;
                }
                Ok(Some(job)) => {
                    n_texts += job.texts.len();
                    jobs.push(job);
                }
                Ok(None) | Err(_) => break,
            }
        }
        jobs.retain(|j| !j.reply.is_closed());
        if jobs.is_empty() {
            continue;
        }
        metrics.batch(jobs.iter().map(|j| j.texts.len()).sum(), jobs.len());
        let process = process.clone();
        // A panic in the labeler drops the jobs' senders: their handlers answer 500.
        let _ = tokio::task::spawn_blocking(move || run_batch(&*process, jobs)).await;
    }
}

/// Labels every job's texts in one call and splits the answer back; when the batch
/// fails, each job is retried alone so that one bad request cannot fail the others.
fn run_batch(process: &ProcessFn, jobs: Vec<Job>) {
    let texts: Vec<&str> = jobs.iter().flat_map(|j| j.texts.iter().map(String::as_str)).collect();
    match process(&texts) {
        Ok(predictions) if predictions.len() == texts.len() => {
            let mut predictions = predictions.into_iter();
            for job in jobs {
                let mine: Vec<Prediction> = predictions.by_ref().take(job.texts.len()).collect();
                let _ = job.reply.send(Ok(mine));
            }
        }
        Ok(predictions) => {
            let message = format!("{} predictions for {} texts", predictions.len(), texts.len());
            for job in jobs {
                let _ = job.reply.send(Err(ServeError::Internal(message.clone())));
            }
        }
        Err(e) if jobs.len() == 1 => {
            let _ = jobs.into_iter().next().map(|job| job.reply.send(Err(e)));
        }
        Err(_) => {
            for job in jobs {
                let texts: Vec<&str> = job.texts.iter().map(String::as_str).collect();
                let _ = job.reply.send(process(&texts));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    fn prediction(text: &str) -> Prediction {
        Prediction { text: text.to_string(), intent: None, slots: Vec::new() }
    }

    /// A processor that records batch sizes, sleeps, and fails on the text "bad".
    fn recording(sleep: Duration) -> (Process, Arc<Mutex<Vec<usize>>>) {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let process: Process = Arc::new(move |texts: &[&str]| {
            seen.lock().unwrap().push(texts.len());
            std::thread::sleep(sleep);
            if texts.contains(&"bad") {
                return Err(ServeError::Internal("bad text".into()));
            }
            Ok(texts.iter().map(|t| prediction(t)).collect())
        });
        (process, sizes)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
    }

    #[test]
    fn concurrent_requests_share_a_batch_and_get_their_own_answers() {
        let rt = runtime();
        let (process, sizes) = recording(Duration::from_millis(20));
        rt.block_on(async {
            let config = BatchConfig { max_batch: 64, max_wait: Duration::from_millis(200), queue: 16 };
            let b = Batcher::start(config, process, Arc::new(Metrics::default())).unwrap();
            let tasks: Vec<_> = (0..6)
                .map(|i| {
                    let b = b.clone();
                    tokio::spawn(async move { b.submit(vec![format!("a{i}"), format!("b{i}")]).await })
                })
                .collect();
            for (i, t) in tasks.into_iter().enumerate() {
                let out = t.await.unwrap().unwrap();
                let texts: Vec<&str> = out.iter().map(|p| p.text.as_str()).collect();
                assert_eq!(texts, [format!("a{i}"), format!("b{i}")]);
            }
        });
        let sizes = sizes.lock().unwrap();
        assert_eq!(sizes.iter().sum::<usize>(), 12);
        assert!(sizes.len() < 6, "no request was batched with another: {sizes:?}");
    }

    #[test]
    fn batches_stop_at_max_batch_texts() {
        let rt = runtime();
        let (process, sizes) = recording(Duration::from_millis(1));
        rt.block_on(async {
            let config = BatchConfig { max_batch: 4, max_wait: Duration::from_millis(100), queue: 16 };
            let b = Batcher::start(config, process, Arc::new(Metrics::default())).unwrap();
            let tasks: Vec<_> = (0..5)
                .map(|i| {
                    let b = b.clone();
                    tokio::spawn(async move { b.submit(vec![format!("t{i}"); 3]).await })
                })
                .collect();
            for t in tasks {
                assert_eq!(t.await.unwrap().unwrap().len(), 3);
            }
        });
        assert!(sizes.lock().unwrap().iter().all(|&n| n <= 4), "{:?}", sizes.lock().unwrap());
    }

    #[test]
    fn a_full_queue_is_refused_at_once() {
        let rt = runtime();
        let (process, _) = recording(Duration::from_millis(300));
        rt.block_on(async {
            let config = BatchConfig { max_batch: 1, max_wait: Duration::ZERO, queue: 1 };
            let b = Batcher::start(config, process, Arc::new(Metrics::default())).unwrap();
            // The first is taken by the worker (busy 300 ms), the second waits, the rest are refused.
            let first = tokio::spawn({
                let b = b.clone();
                async move { b.submit(vec!["1".into()]).await }
            });
            tokio::time::sleep(Duration::from_millis(50)).await;
            let second = tokio::spawn({
                let b = b.clone();
                async move { b.submit(vec!["2".into()]).await }
            });
            tokio::time::sleep(Duration::from_millis(50)).await;
            let third = b.submit(vec!["3".into()]).await;
            assert!(matches!(third, Err(ServeError::Overloaded { capacity: 1 })), "{third:?}");
            assert!(first.await.unwrap().is_ok());
            assert!(second.await.unwrap().is_ok());
        });
    }

    #[test]
    fn one_failing_request_does_not_fail_its_batch() {
        let rt = runtime();
        let (process, _) = recording(Duration::from_millis(20));
        rt.block_on(async {
            let config = BatchConfig { max_batch: 64, max_wait: Duration::from_millis(200), queue: 16 };
            let b = Batcher::start(config, process, Arc::new(Metrics::default())).unwrap();
            let good = tokio::spawn({
                let b = b.clone();
                async move { b.submit(vec!["good".into()]).await }
            });
            let bad = b.submit(vec!["bad".into()]).await;
            assert!(bad.is_err());
            assert_eq!(good.await.unwrap().unwrap()[0].text, "good");
        });
    }
}
