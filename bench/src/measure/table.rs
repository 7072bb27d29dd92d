//! The table of ratios the benchmark prints.

use std::time::Duration;

/// One line of the table.
pub struct Row {
    id: &'static str,
    scenario: String,
    ours: String,
    reference: String,
    theirs: String,
    ratio: f64,
    target: String,
    met: bool,
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

impl Row {
    /// Time ratio ours / theirs, which must be at most `max`.
    pub fn time(
        id: &'static str,
        scenario: &str,
        ours: Duration,
        reference: &str,
        theirs: Duration,
        max: f64,
    ) -> Self {
        let ratio = ours.as_secs_f64() / theirs.as_secs_f64();
        Self {
            id,
            scenario: scenario.into(),
            ours: secs(ours),
            reference: reference.into(),
            theirs: secs(theirs),
            ratio,
            target: format!("≤ {max}× time"),
            met: ratio <= max,
        }
    }

    /// Throughput ratio ours / theirs, which must be at least `min`.
    pub fn throughput(
        id: &'static str,
        scenario: &str,
        bytes: u64,
        ours: Duration,
        reference: &str,
        theirs: Duration,
        min: f64,
    ) -> Self {
        let rate = |d: Duration| bytes as f64 / d.as_secs_f64() / 1e6;
        let ratio = rate(ours) / rate(theirs);
        Self {
            id,
            scenario: scenario.into(),
            ours: format!("{:.0} MB/s", rate(ours)),
            reference: reference.into(),
            theirs: format!("{:.0} MB/s", rate(theirs)),
            ratio,
            target: format!("≥ {min}× throughput"),
            met: ratio >= min,
        }
    }

    pub fn ratio(
        id: &'static str,
        scenario: &str,
        ratio: f64,
        reference: &str,
        bound: f64,
        at_least: bool,
    ) -> Self {
        Self {
            id,
            scenario: scenario.into(),
            ours: format!("{ratio:.3}"),
            reference: reference.into(),
            theirs: "1".into(),
            ratio,
            target: format!("{} {bound}×", if at_least { "≥" } else { "≤" }),
            met: if at_least {
                ratio >= bound
            } else {
                ratio <= bound
            },
        }
    }

    /// A figure reported beside the others, with no target of its own.
    pub fn report(id: &'static str, scenario: &str, value: f64, unit: &str) -> Self {
        Self {
            id,
            scenario: scenario.into(),
            ours: format!("{value:.2} {unit}"),
            reference: "—".into(),
            theirs: "—".into(),
            ratio: value,
            target: "reported".into(),
            met: true,
        }
    }

    pub fn memory(id: &'static str, scenario: &str, bytes: u64, limit: u64) -> Self {
        Self {
            id,
            scenario: scenario.into(),
            ours: format!("{} MiB", bytes / (1024 * 1024)),
            reference: "—".into(),
            theirs: "—".into(),
            ratio: bytes as f64 / limit as f64,
            target: format!("≤ {} MiB", limit / (1024 * 1024)),
            met: bytes <= limit,
        }
    }
}

#[derive(Default)]
pub struct Table {
    rows: Vec<Row>,
}

impl Table {
    pub fn push(&mut self, row: Row) {
        eprintln!(
            "    {} {}: {} vs {} {} → {:.3} ({})",
            row.id,
            row.scenario,
            row.ours,
            row.reference,
            row.theirs,
            row.ratio,
            if row.met { "met" } else { "NOT met" }
        );
        self.rows.push(row);
    }

    /// A Markdown table.
    pub fn render(&self, footer: &str) -> String {
        let mut out = String::from(
            "| # | scenario | modelcache | reference | reference value | ratio | target | met |\n|---|---|---|---|---|---|---|---|\n",
        );
        for r in &self.rows {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {:.3} | {} | {} |\n",
                r.id,
                r.scenario,
                r.ours,
                r.reference,
                r.theirs,
                r.ratio,
                r.target,
                if r.met { "yes" } else { "**no**" }
            ));
        }
        out.push_str(&format!("\n{footer}\n"));
        out
    }
}
