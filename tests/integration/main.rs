//! The integration suite, one binary (one link), one module per area. Each test stands on its
//! own table and secret in the moto server `make test` starts, its own KV emulator and
//! API-keys stand-in (`common`).

mod common;

mod bad_input;
mod bench_replay;
mod code_shape;
mod concurrent_writers;
mod demo;
mod divergence;
mod docs_examples;
mod edge_worker;
mod events;
mod fault_matrix;
mod hostile_input;
mod lambda_runtime;
mod ledger_references;
mod operator_cli;
mod operator_modes;
mod query_filter;
mod readme_map;
mod reconcile;
mod scheduled_reconcile;
mod secrets;
mod stream_export;
mod table_implies;
mod table_items;
