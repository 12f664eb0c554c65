//! Build time and value size of the query-override filter, for the README:
//! `cargo run --release --example qfilter_sizes`.

use std::time::Instant;

use ecom_settings_exporter::domain::qfilter::QueryFilter;
use ecom_settings_exporter::domain::IndexRef;

fn main() {
    let index = IndexRef::new("acct-1", "products");
    println!("| overrides | build (ms) | value (bytes) | bits per override |");
    println!("|---:|---:|---:|---:|");
    for n in [10usize, 1_000, 100_000] {
        let queries: Vec<String> = (0..n).map(|i| format!("normalized query {i}")).collect();
        let runs = if n > 10_000 { 5 } else { 50 };
        let started = Instant::now();
        let mut filter = None;
        for _ in 0..runs {
            filter = Some(QueryFilter::build(&index, &queries));
        }
        let per_build = started.elapsed().as_secs_f64() * 1000.0 / runs as f64;
        let filter = filter.expect("built");
        let value = serde_json::to_string(&filter).expect("serializes");
        let fingerprint_bytes = filter.fingerprints.len() * 3 / 4;
        println!(
            "| {n} | {per_build:.3} | {} | {:.1} |",
            value.len(),
            fingerprint_bytes as f64 * 8.0 / n as f64
        );
    }
}
