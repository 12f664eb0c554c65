//! The stream path, one file per step: records -> plan -> bulk requests, run by the exporter.

pub mod bulk;
pub mod exporter;
pub mod plan;
pub mod records;
