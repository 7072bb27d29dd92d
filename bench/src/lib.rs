//! Sample models for the demo, the tests and the benchmark, generated here with
//! deterministic weights (no downloads exist on the machines this runs on).

pub mod measure;

/// The ResNet-50-shaped sample lives with the tests, which quantize it too.
pub use modelcache_testkit::{resnet, rng};
