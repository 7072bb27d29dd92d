//! Sample models for the demo, the tests and the benchmark, generated here with
//! deterministic weights (no downloads exist on the machines this runs on).

pub mod measure;
pub mod resnet;
pub mod rng;
