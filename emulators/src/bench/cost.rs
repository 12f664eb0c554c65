//! What a million changes cost across the four bills, at list prices written here once:
//! Cloudflare KV operations, DynamoDB on-demand request units (the settings table and the
//! ledger apart), Lambda (GB-seconds of the batch's wall time at the template's 512 MB on
//! arm64, and the invocations), and CloudWatch (the bytes the batch logged, EMF included;
//! custom metrics are a monthly fixed cost, printed beside). Beside it, the seed's design on the same events: two KV writes a
//! record (one for an override, two deletes for a REMOVE), no ledger, no table read.

use super::function::Measured;
use super::records::Kind;

/// List prices, USD, as published on 2026-11-25: Cloudflare Workers Paid (KV, beyond the
/// monthly inclusions: per key written, deleted or read, per list request), DynamoDB on-demand
/// and Lambda arm64 in us-east-1.
pub struct Prices {
    pub kv_write: f64,
    pub kv_delete: f64,
    pub kv_read: f64,
    pub kv_list: f64,
    pub dynamo_read_unit: f64,
    pub dynamo_write_unit: f64,
    pub lambda_gb_second: f64,
    pub lambda_invocation: f64,
    pub logs_ingested_byte: f64,
    pub custom_metric_month: f64,
}

pub const PRICES: Prices = Prices {
    kv_write: 5.00 / 1e6,
    kv_delete: 5.00 / 1e6,
    kv_read: 0.50 / 1e6,
    kv_list: 5.00 / 1e6,
    dynamo_read_unit: 0.125 / 1e6,
    dynamo_write_unit: 0.625 / 1e6,
    lambda_gb_second: 0.000_013_333_4,
    lambda_invocation: 0.20 / 1e6,
    logs_ingested_byte: 0.50 / 1e9,
    custom_metric_month: 0.30,
};
pub const PRICES_DATED: &str = "list prices of 2026-11-25: Cloudflare Workers Paid KV (write, delete, list $5.00, read $0.50 a million), DynamoDB on-demand us-east-1 ($0.625 a million write units, $0.125 read units; a transaction's write counts twice), Lambda arm64 us-east-1 ($0.0000133334 a GB-second, $0.20 a million invocations), CloudWatch us-east-1 ($0.50 a GB of logs ingested, $0.30 a custom metric a month)";

/// The template's memory.
const GB: f64 = 0.5;

/// One batch's bill in dollars, split by where it is paid.
#[derive(Clone, Copy, Debug, Default)]
pub struct Bill {
    pub kv: f64,
    pub settings_table: f64,
    pub ledger: f64,
    pub lambda: f64,
    pub cloudwatch: f64,
}

impl Bill {
    pub fn total(&self) -> f64 {
        self.kv + self.settings_table + self.ledger + self.lambda + self.cloudwatch
    }

    /// The same bill for a million changes like the batch's.
    pub fn per_million(self, records: usize) -> Self {
        let scale = 1e6 / records as f64;
        Self {
            kv: self.kv * scale,
            settings_table: self.settings_table * scale,
            ledger: self.ledger * scale,
            lambda: self.lambda * scale,
            cloudwatch: self.cloudwatch * scale,
        }
    }
}

/// KV operations a batch's requests bill: keys written, deleted, read; lists.
pub fn kv_operations(m: &Measured) -> (usize, usize, usize, usize) {
    let (mut written, mut deleted, mut read, mut lists) = (0, 0, 0, 0);
    for request in &m.kv {
        match request.operation.as_str() {
            "bulk" => written += request.items,
            "bulk/delete" => deleted += request.items,
            "bulk/get" => read += request.items,
            "values" | "metadata" => read += 1,
            "keys" => lists += 1,
            _ => {}
        }
    }
    (written, deleted, read, lists)
}

/// What the batch cost, as measured.
pub fn bill(m: &Measured) -> Bill {
    let p = &PRICES;
    let (written, deleted, read, lists) = kv_operations(m);
    let kv = written as f64 * p.kv_write
        + deleted as f64 * p.kv_delete
        + read as f64 * p.kv_read
        + lists as f64 * p.kv_list;
    let (mut settings_table, mut ledger) = (0.0, 0.0);
    for call in &m.calls {
        let dollars = call.read_units * p.dynamo_read_unit + call.write_units * p.dynamo_write_unit;
        if call.tables.iter().any(|t| t.ends_with("-ledger")) {
            ledger += dollars;
        } else {
            settings_table += dollars;
        }
    }
    let lambda = m.wall_ms / 1000.0 * GB * p.lambda_gb_second + p.lambda_invocation;
    Bill {
        kv,
        settings_table,
        ledger,
        lambda,
        cloudwatch: m.log_bytes as f64 * p.logs_ingested_byte,
    }
}

/// The seed's design on the same batch: its KV writes (or deletes) and a Lambda that runs
/// `python_cpu_ms` of CPU at `share` of a core plus one bulk request (per 10,000 keys) at the
/// KV latency; `None` CPU counts none (a lower bound).
pub fn seed_bill(
    kind: Kind,
    records: usize,
    python_cpu_ms: Option<f64>,
    share: f64,
    kv_ms: f64,
) -> Bill {
    let p = &PRICES;
    let (writes, deletes) = match kind {
        Kind::Insert | Kind::Modify | Kind::ShopMove => (2 * records, 0),
        Kind::Override => (records, 0),
        Kind::Remove => (0, 2 * records),
    };
    let requests = (writes + deletes).div_ceil(10_000) as f64;
    let wall_ms = python_cpu_ms.unwrap_or(0.0) / share + requests * kv_ms;
    Bill {
        kv: writes as f64 * p.kv_write + deletes as f64 * p.kv_delete,
        settings_table: 0.0,
        ledger: 0.0,
        lambda: wall_ms / 1000.0 * GB * p.lambda_gb_second + p.lambda_invocation,
        cloudwatch: 0.0,
    }
}

/// What `metrics` custom metrics cost a month, whatever the traffic.
pub fn metrics_month(metrics: usize) -> f64 {
    metrics as f64 * PRICES.custom_metric_month
}
