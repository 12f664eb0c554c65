//! The emulator's data, the faults queued for the next requests, and the request log.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::call::ApiError;
use super::codes;

/// What to do to the next matching data request (bulk write, bulk delete, read, list).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Fault {
    /// Answer this status with an error envelope, optionally with `Retry-After: {seconds}`.
    Status {
        status: u16,
        #[serde(default)]
        retry_after: Option<u64>,
        /// `Retry-After` as an HTTP date this many seconds ahead (RFC 9110's other form).
        #[serde(default)]
        retry_after_date: Option<u64>,
        /// Cloudflare's `retry-after-ms` header.
        #[serde(default)]
        retry_after_ms: Option<u64>,
        /// A `Location` header (with a 3xx: a redirect the client must not follow).
        #[serde(default)]
        location: Option<String>,
        /// `Retry-After` exactly as given (`1e20`, a date in 9999): what a broken server sends.
        #[serde(default)]
        retry_after_raw: Option<String>,
    },
    /// Refuse (400, as Cloudflare refuses a key it will not take) the next `times` bulk writes
    /// or deletes that hold this key, whatever else they hold.
    RefuseKey { key: String },
    /// Wait this long before handling the request normally.
    Delay { millis: u64 },
    /// Every request of this operation (`keys`, `bulk`, ...) waits this long, until the faults
    /// are cleared (`times` does not apply): a slow part of KV, such as a large namespace's
    /// listing.
    Latency { operation: String, millis: u64 },
    /// Handle a bulk write or delete, but leave out the first `count` keys and report them
    /// in `result.unsuccessful_keys`.
    UnsuccessfulKeys { count: usize },
    /// Handle a bulk write or delete in full, but name `count` keys that were not in the
    /// request in `result.unsuccessful_keys` (seen from Cloudflare's schema-generated mock).
    ForeignUnsuccessfulKeys { count: usize },
    /// Handle a bulk write or delete, but leave out the keys that start with `prefix` and
    /// report them in `result.unsuccessful_keys`.
    UnsuccessfulKeysStartingWith { prefix: String },
    /// Hold the next `times` requests of this operation (`bulk`, `bulk/delete`, `bulk/get`,
    /// `keys`, `values`, `metadata`), and with `key` only requests whose body names that key,
    /// until `POST /__emulator/release`: a writer stopped between two steps, to force a race.
    /// A held write lands when released.
    Hold {
        operation: String,
        #[serde(default)]
        key: Option<String>,
    },
    /// Reads (values, metadata, bulk get, listings) answer what KV held when this was set,
    /// until `POST /__emulator/release`: Cloudflare's reads are only eventually consistent
    /// (up to 60 s). Writes land as usual.
    StaleReads,
}

impl Fault {
    /// Answer `status` with an error envelope, and nothing else.
    pub fn status(status: u16) -> Self {
        Fault::Status {
            status,
            retry_after: None,
            retry_after_date: None,
            retry_after_ms: None,
            location: None,
            retry_after_raw: None,
        }
    }
}

/// What reads answer while [`Fault::StaleReads`] holds.
#[derive(Debug, Clone, Default)]
pub(super) struct Snapshot {
    pub(super) namespaces: HashMap<(String, String), BTreeMap<String, String>>,
    pub(super) metadata: HashMap<(String, String), HashMap<String, Value>>,
}

/// A hold waiting for its requests.
#[derive(Debug, Clone)]
pub(super) struct HoldRule {
    pub(super) operation: String,
    /// The key as it appears in a JSON body (quoted).
    pub(super) key: Option<String>,
    pub(super) times: usize,
}

/// A fault and how many more requests it applies to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InjectedFault {
    #[serde(flatten)]
    pub fault: Fault,
    #[serde(default = "one")]
    pub times: usize,
}

fn one() -> usize {
    1
}

/// One request the emulator answered, for tests to count calls.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestRecord {
    pub method: String,
    pub namespace: String,
    /// `bulk`, `bulk/delete`, `values` or `keys`.
    pub operation: String,
    pub items: usize,
    pub body_bytes: usize,
    pub status: u16,
    /// When the request came in, before any injected delay or hold.
    #[serde(skip)]
    pub received: std::time::Instant,
}

/// The emulator's data, faults and request log.
#[derive(Default)]
pub struct KvState {
    /// (account, namespace) -> key -> value.
    pub(super) namespaces: HashMap<(String, String), BTreeMap<String, String>>,
    /// (account, namespace) -> key -> metadata, for keys written with some.
    pub(super) metadata: HashMap<(String, String), HashMap<String, Value>>,
    pub(super) tokens: HashSet<String>,
    pub(super) faults: VecDeque<InjectedFault>,
    /// Operation -> how long each of its requests waits.
    pub(super) latencies: HashMap<String, u64>,
    /// Keys whose bulk requests are refused, and how many more times.
    pub(super) refused_keys: HashMap<String, usize>,
    /// Namespace ids that exist: any other answers 404, as Cloudflare does.
    pub(super) known_namespaces: HashSet<String>,
    /// (account, namespace) -> key -> when it expires (seconds since the epoch).
    pub(super) expirations: HashMap<(String, String), HashMap<String, u64>>,
    /// Cursors this emulator handed out: any other is refused.
    pub(super) cursors: HashSet<String>,
    pub(super) requests: Vec<RequestRecord>,
    pub(super) holds: Vec<HoldRule>,
    /// Requests waiting on a hold now.
    pub(super) held: usize,
    /// Grows with every release: a held request goes on once it changes.
    pub(super) releases: u64,
    pub(super) stale: Option<Snapshot>,
}

impl KvState {
    /// Queues a fault; a refused key applies to the requests that hold it, not the next ones.
    pub(super) fn add_fault(&mut self, fault: InjectedFault) {
        match fault.fault {
            Fault::RefuseKey { key } => {
                self.refused_keys.insert(key, fault.times);
            }
            Fault::StaleReads => {
                self.stale = Some(Snapshot {
                    namespaces: self.namespaces.clone(),
                    metadata: self.metadata.clone(),
                });
            }
            Fault::Latency { operation, millis } => {
                self.latencies.insert(operation, millis);
            }
            Fault::Hold { operation, key } => self.holds.push(HoldRule {
                operation,
                key: key.map(|k| Value::from(k).to_string()),
                times: fault.times,
            }),
            _ => self.faults.push_back(fault),
        }
    }

    /// Every fault still waiting for requests, as `GET /__emulator/faults` shows them.
    pub(super) fn faults_left(&self) -> serde_json::Value {
        serde_json::json!({
            "queued": self.faults,
            "refused_keys": self.refused_keys,
            "latencies": self.latencies,
            "holds": self.holds.iter().map(|h| serde_json::json!({
                "operation": h.operation, "key": h.key, "times": h.times,
            })).collect::<Vec<_>>(),
        })
    }

    /// Forgets every fault not yet used (requests already held stay held until released);
    /// answers how many there were.
    pub(super) fn clear_faults(&mut self) -> usize {
        let count =
            self.faults.len() + self.refused_keys.len() + self.latencies.len() + self.holds.len();
        self.faults.clear();
        self.refused_keys.clear();
        self.latencies.clear();
        self.holds.clear();
        count
    }

    /// A 400 naming the first refused key among `keys`, if any (one refusal used up).
    pub(super) fn refuse<'k>(
        &mut self,
        mut keys: impl Iterator<Item = &'k str>,
    ) -> Result<(), ApiError> {
        let refused = keys.find(|k| self.refused_keys.get(*k).is_some_and(|n| *n > 0));
        let Some(key) = refused else { return Ok(()) };
        *self.refused_keys.get_mut(key).expect("found above") -= 1;
        Err(ApiError::bad_request(
            codes::BAD_REQUEST,
            format!("Invalid key name: `{key}` (refused by an injected fault)"),
        ))
    }

    /// A namespace's values as reads see them (stale while [`Fault::StaleReads`] holds).
    pub(super) fn read_values(&self, id: &(String, String)) -> Option<&BTreeMap<String, String>> {
        match &self.stale {
            Some(snapshot) => snapshot.namespaces.get(id),
            None => self.namespaces.get(id),
        }
    }

    pub(super) fn read_metadata(&self, id: &(String, String)) -> Option<&HashMap<String, Value>> {
        match &self.stale {
            Some(snapshot) => snapshot.metadata.get(id),
            None => self.metadata.get(id),
        }
    }

    /// Makes these namespaces exist (the binary's `--namespace`).
    pub fn create_namespaces(&mut self, ids: &[String]) {
        self.known_namespaces.extend(ids.iter().cloned());
    }

    /// Forgets the namespace's keys whose expiration has passed.
    pub(super) fn purge_expired(&mut self, id: &(String, String)) {
        let now = epoch_seconds();
        let Some(expiring) = self.expirations.get_mut(id) else {
            return;
        };
        let gone: Vec<String> = expiring
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            expiring.remove(&key);
            self.namespaces.get_mut(id).map(|ns| ns.remove(&key));
            self.metadata.get_mut(id).map(|m| m.remove(&key));
        }
    }

    /// One namespace's values and metadata, created empty when new.
    pub(super) fn namespace_mut(
        &mut self,
        account: String,
        namespace: String,
    ) -> (&mut BTreeMap<String, String>, &mut HashMap<String, Value>) {
        let id = (account, namespace);
        let values = self.namespaces.entry(id.clone()).or_default();
        let metadata = self.metadata.entry(id).or_default();
        (values, metadata)
    }
}

pub(super) fn epoch_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}
