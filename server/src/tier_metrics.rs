//! foyer's own metrics hook for a tier: foyer reports its counters and gauges to this
//! registry (mixtrics' `RegistryOps`), and the node's `/metrics` reads the few it exports
//! under its own names (disk blocks in use, blocks reclaimed, memory evictions). foyer's
//! histograms are not kept.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use mixtrics::metrics::{
    BoxedCounter, BoxedCounterVec, BoxedGauge, BoxedGaugeVec, BoxedHistogram, BoxedHistogramVec,
    CounterOps, CounterVecOps, GaugeOps, GaugeVecOps, HistogramOps, HistogramVecOps, RegistryOps,
};

/// One counter or gauge: its value now, and for a gauge the sum of its increases (how many
/// blocks ever entered a state, where the value says how many are in it now).
#[derive(Debug, Default)]
struct Value {
    now: AtomicU64,
    raised: AtomicU64,
}

/// Values by family name and label values, e.g. `("foyer_memory_op_total", "evict")`
/// (foyer's first label, the cache's name, is left out: each tier has its own registry).
type Values = Arc<Mutex<HashMap<(String, String), Arc<Value>>>>;

/// The registry one tier hands to foyer.
#[derive(Clone, Debug, Default)]
pub struct TierMetrics {
    values: Values,
}

impl TierMetrics {
    /// The registry to give foyer's builder.
    pub fn hook(&self) -> mixtrics::metrics::BoxedRegistry {
        Box::new(Family {
            name: String::new(),
            values: self.values.clone(),
        })
    }

    fn value(&self, family: &str, label: &str) -> Option<Arc<Value>> {
        let values = self.values.lock().unwrap_or_else(|e| e.into_inner());
        values.get(&(family.to_owned(), label.to_owned())).cloned()
    }

    /// A counter's total, or a gauge's value now (0 if foyer never reported it).
    pub fn get(&self, family: &str, label: &str) -> u64 {
        self.value(family, label)
            .map_or(0, |v| v.now.load(Ordering::Relaxed))
    }

    /// The sum of a gauge's increases.
    pub fn raised(&self, family: &str, label: &str) -> u64 {
        self.value(family, label)
            .map_or(0, |v| v.raised.load(Ordering::Relaxed))
    }
}

/// One registered family (the registry itself has no name).
#[derive(Debug)]
struct Family {
    name: String,
    values: Values,
}

impl Family {
    fn register(&self, name: Cow<'static, str>) -> Box<Family> {
        Box::new(Family {
            name: name.into_owned(),
            values: self.values.clone(),
        })
    }

    fn member(&self, labels: &[Cow<'static, str>]) -> Box<Member> {
        let label = labels
            .iter()
            .skip(1)
            .map(|l| l.as_ref())
            .collect::<Vec<_>>();
        let mut values = self.values.lock().unwrap_or_else(|e| e.into_inner());
        let value = values
            .entry((self.name.clone(), label.join(",")))
            .or_default()
            .clone();
        Box::new(Member(value))
    }
}

impl RegistryOps for Family {
    fn register_counter_vec(
        &self,
        name: Cow<'static, str>,
        _desc: Cow<'static, str>,
        _labels: &'static [&'static str],
    ) -> BoxedCounterVec {
        self.register(name)
    }

    fn register_gauge_vec(
        &self,
        name: Cow<'static, str>,
        _desc: Cow<'static, str>,
        _labels: &'static [&'static str],
    ) -> BoxedGaugeVec {
        self.register(name)
    }

    fn register_histogram_vec(
        &self,
        name: Cow<'static, str>,
        _desc: Cow<'static, str>,
        _labels: &'static [&'static str],
    ) -> BoxedHistogramVec {
        self.register(name)
    }

    fn register_histogram_vec_with_buckets(
        &self,
        name: Cow<'static, str>,
        _desc: Cow<'static, str>,
        _labels: &'static [&'static str],
        _buckets: Vec<f64>,
    ) -> BoxedHistogramVec {
        self.register(name)
    }
}

impl CounterVecOps for Family {
    fn counter(&self, labels: &[Cow<'static, str>]) -> BoxedCounter {
        self.member(labels)
    }
}

impl GaugeVecOps for Family {
    fn gauge(&self, labels: &[Cow<'static, str>]) -> BoxedGauge {
        self.member(labels)
    }
}

impl HistogramVecOps for Family {
    fn histogram(&self, _labels: &[Cow<'static, str>]) -> BoxedHistogram {
        Box::new(Ignored)
    }
}

#[derive(Debug)]
struct Member(Arc<Value>);

impl CounterOps for Member {
    fn increase(&self, n: u64) {
        self.0.now.fetch_add(n, Ordering::Relaxed);
    }
}

impl GaugeOps for Member {
    fn increase(&self, n: u64) {
        self.0.now.fetch_add(n, Ordering::Relaxed);
        self.0.raised.fetch_add(n, Ordering::Relaxed);
    }

    fn decrease(&self, n: u64) {
        let _ = self
            .0
            .now
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
    }

    fn absolute(&self, n: u64) {
        self.0.now.store(n, Ordering::Relaxed);
    }
}

#[derive(Debug)]
struct Ignored;

impl HistogramOps for Ignored {
    fn record(&self, _: f64) {}
}
