//! A local event-source mapping: reads a DynamoDB stream and invokes the function through the
//! runtime API the way Lambda does for `ReportBatchItemFailures` mappings: records are gathered
//! into a batch until the batch is full or the batching window has passed; when the answer
//! lists failures, everything from the lowest reported record on is invoked again after a
//! pause, and what came before it is checkpointed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::runtime_api::RuntimeApi;
use crate::streams::StreamReader;

#[derive(Debug, Clone)]
pub struct PollerConfig {
    pub batch_size: usize,
    pub batching_window: Duration,
    /// Pause before a batch with failures is invoked again.
    pub retry_delay: Duration,
    /// After this many retries of the same first record, it is given up (as the template's
    /// `MaximumRetryAttempts` sends it to the failed-records queue).
    pub max_retries: usize,
    pub invocation_timeout: Duration,
    pub poll_interval: Duration,
}

impl Default for PollerConfig {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            batching_window: Duration::from_secs(10),
            retry_delay: Duration::from_secs(1),
            max_retries: 10,
            invocation_timeout: Duration::from_secs(60),
            poll_interval: Duration::from_millis(200),
        }
    }
}

/// What happened to one invocation.
#[derive(Debug, Clone, PartialEq)]
pub struct Invocation {
    pub records: usize,
    /// Records checkpointed by this invocation.
    pub checkpointed: usize,
    /// The sequence number it resumes from, when the function reported failures.
    pub retry_from: Option<String>,
    /// The function's error document, when the invocation failed as a whole.
    pub error: Option<Value>,
    /// Records given up after `max_retries`.
    pub given_up: usize,
}

/// What the poller has done so far, shared with whoever watches it.
#[derive(Debug, Default)]
pub struct Progress {
    /// Stream records read.
    pub read: AtomicUsize,
    /// Stream records done: checkpointed or given up.
    pub done: AtomicUsize,
    pub invocations: Mutex<Vec<Invocation>>,
}

pub struct Poller {
    reader: StreamReader,
    runtime: Arc<RuntimeApi>,
    config: PollerConfig,
    pending: VecDeque<Value>,
    /// When the pending records are invoked: the batching window after the oldest was read,
    /// or the retry pause after a failure.
    due_at: Option<Instant>,
    retries_of_head: usize,
    progress: Arc<Progress>,
}

fn sequence_number(record: &Value) -> Option<&str> {
    record["dynamodb"]["SequenceNumber"].as_str()
}

impl Poller {
    pub fn new(reader: StreamReader, runtime: Arc<RuntimeApi>, config: PollerConfig) -> Self {
        Self {
            reader,
            runtime,
            config,
            pending: VecDeque::new(),
            due_at: None,
            retries_of_head: 0,
            progress: Arc::default(),
        }
    }

    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// Polls and invokes until `stop` turns true.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> Result<(), String> {
        while !*stop.borrow() {
            if !self.step().await? {
                tokio::select! {
                    _ = tokio::time::sleep(self.config.poll_interval) => {}
                    _ = stop.changed() => {}
                }
            }
        }
        Ok(())
    }

    /// Reads what is new and invokes once if a batch is due. `Ok(true)` when it invoked.
    pub async fn step(&mut self) -> Result<bool, String> {
        let new = self
            .reader
            .read()
            .await
            .map_err(|e| format!("reading the stream: {e}"))?;
        self.progress.read.fetch_add(new.len(), Ordering::SeqCst);
        if !new.is_empty() && self.due_at.is_none() {
            self.due_at = Some(Instant::now() + self.config.batching_window);
        }
        self.pending.extend(new);
        let due = self.due_at.is_some_and(|due_at| {
            self.pending.len() >= self.config.batch_size || Instant::now() >= due_at
        });
        if !due {
            return Ok(false);
        }
        let batch: Vec<Value> = self
            .pending
            .iter()
            .take(self.config.batch_size)
            .cloned()
            .collect();
        let answer = self
            .runtime
            .invoke(json!({ "Records": batch }), self.config.invocation_timeout)
            .await;
        let mut invocation = Invocation {
            records: batch.len(),
            checkpointed: 0,
            retry_from: None,
            error: None,
            given_up: 0,
        };
        let retry_at = match answer {
            Ok(response) => first_reported(&batch, &response),
            Err(error) => {
                invocation.error = Some(error);
                Some(0)
            }
        };
        self.settle(invocation, retry_at);
        Ok(true)
    }

    /// Checkpoints the batch up to the record to retry from (all of it when none), gives up the
    /// head after too many retries, and sets when the next invocation is due.
    fn settle(&mut self, mut invocation: Invocation, retry_at: Option<usize>) {
        let checkpoint = retry_at.unwrap_or(invocation.records);
        self.pending.drain(..checkpoint);
        invocation.checkpointed = checkpoint;
        if checkpoint > 0 {
            self.retries_of_head = 0;
        }
        if retry_at.is_some() {
            invocation.retry_from = self
                .pending
                .front()
                .and_then(sequence_number)
                .map(str::to_owned);
            self.retries_of_head += 1;
            if self.retries_of_head > self.config.max_retries {
                // Give up the record at the head, as Lambda sends it to the on-failure destination.
                self.pending.pop_front();
                invocation.given_up = 1;
                self.retries_of_head = 0;
            }
        }
        self.progress.done.fetch_add(
            invocation.checkpointed + invocation.given_up,
            Ordering::SeqCst,
        );
        self.progress.invocations.lock().unwrap().push(invocation);
        self.due_at = if self.pending.is_empty() {
            None
        } else if retry_at.is_some() {
            Some(Instant::now() + self.config.retry_delay)
        } else {
            Some(Instant::now() + self.config.batching_window)
        };
    }
}

/// Where Lambda resumes: the lowest record the answer reports (stream order is batch order).
fn first_reported(batch: &[Value], response: &Value) -> Option<usize> {
    let failed: Vec<&str> = response["batchItemFailures"]
        .as_array()
        .map(|f| {
            f.iter()
                .filter_map(|f| f["itemIdentifier"].as_str())
                .collect()
        })
        .unwrap_or_default();
    batch
        .iter()
        .position(|r| sequence_number(r).is_some_and(|s| failed.contains(&s)))
}
