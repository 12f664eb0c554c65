//! The answers a recording proxy kept, and how a replay finds the one a request gets.

use std::collections::{HashMap, VecDeque};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use serde_json::Value;

pub(super) type Answer = (StatusCode, HeaderMap, Bytes);

/// Moto's answers: by request (operation, body), in the order they were given; and, since the
/// caller splits a batch's keys into requests in its hash maps' order, BatchGetItem's by key
/// and whether every TransactWriteItems succeeded.
#[derive(Clone)]
pub struct Recording {
    answers: HashMap<(String, Bytes), VecDeque<Answer>>,
    /// (table, key) -> the item each read of it found (`None`: none), in order.
    reads: HashMap<(String, String), VecDeque<Option<Value>>>,
    writes_succeeded: bool,
    headers: HeaderMap,
}

impl Default for Recording {
    fn default() -> Self {
        Self {
            answers: HashMap::new(),
            reads: HashMap::new(),
            writes_succeeded: true,
            headers: HeaderMap::new(),
        }
    }
}

impl Recording {
    pub(super) fn keep(&mut self, operation: &str, request: Bytes, answer: &Answer) {
        let (status, headers, body) = answer;
        self.headers = headers.clone();
        if operation == "TransactWriteItems" && *status != StatusCode::OK {
            self.writes_succeeded = false;
        }
        // A batch's reads are answered key by key: the whole answer is never asked for again.
        if operation == "BatchGetItem" {
            if *status == StatusCode::OK {
                self.keep_reads(&request, body);
            }
            return;
        }
        let key = (operation.to_owned(), canonical(&request));
        self.answers
            .entry(key)
            .or_default()
            .push_back(answer.clone());
    }

    fn keep_reads(&mut self, request: &[u8], answer: &[u8]) {
        let request: Value = serde_json::from_slice(request).unwrap_or_default();
        let answer: Value = serde_json::from_slice(answer).unwrap_or_default();
        let tables = request["RequestItems"].as_object().into_iter().flatten();
        for (table, asked) in tables {
            let found = answer["Responses"][table]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for key in asked["Keys"].as_array().into_iter().flatten() {
                let names: Vec<&String> = key
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(n, _)| n)
                    .collect();
                let item = found
                    .iter()
                    .find(|item| names.iter().all(|n| item[n.as_str()] == key[n.as_str()]));
                let reads = self
                    .reads
                    .entry((table.clone(), key.to_string()))
                    .or_default();
                reads.push_back(item.cloned());
            }
        }
    }

    /// The answer to `request`, or `None` where the recording cannot give it.
    pub(super) fn answer(&mut self, operation: &str, request: &Bytes) -> Option<Answer> {
        if operation == "BatchGetItem" {
            return self.batch_read(request);
        }
        let exact = (operation.to_owned(), canonical(request));
        match self.answers.get_mut(&exact).and_then(VecDeque::pop_front) {
            Some(answer) => Some(answer),
            None if operation == "TransactWriteItems" && self.writes_succeeded => Some((
                StatusCode::OK,
                self.headers.clone(),
                Bytes::from_static(b"{}"),
            )),
            None => None,
        }
    }

    fn batch_read(&mut self, request: &Bytes) -> Option<Answer> {
        let request: Value = serde_json::from_slice(request).ok()?;
        let mut responses = serde_json::Map::new();
        for (table, asked) in request["RequestItems"].as_object()? {
            let mut items = Vec::new();
            for key in asked["Keys"].as_array()? {
                let reads = self.reads.get_mut(&(table.clone(), key.to_string()))?;
                items.extend(reads.pop_front()?);
            }
            responses.insert(table.clone(), Value::Array(items));
        }
        let body = serde_json::json!({"Responses": responses, "UnprocessedKeys": {}});
        Some((
            StatusCode::OK,
            self.headers.clone(),
            Bytes::from(body.to_string()),
        ))
    }
}

/// A request's body as a recording matches it: the same JSON with its unordered parts sorted
/// (a batch's keys, a transaction's actions and sets come in the order of the caller's hash
/// maps, which differs from one process to the next).
fn canonical(body: &Bytes) -> Bytes {
    fn sort(value: &mut Value, unordered: bool) {
        match value {
            Value::Array(items) => {
                items.iter_mut().for_each(|v| sort(v, false));
                if unordered {
                    items.sort_by_key(|v| v.to_string());
                }
            }
            Value::Object(members) => {
                for (name, member) in members.iter_mut() {
                    let unordered =
                        matches!(name.as_str(), "Keys" | "TransactItems" | "SS" | "NS" | "BS");
                    sort(member, unordered);
                }
            }
            _ => {}
        }
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(mut value) => {
            sort(&mut value, false);
            Bytes::from(value.to_string())
        }
        Err(_) => body.clone(),
    }
}
