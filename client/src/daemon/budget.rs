//! The disk budget (`--max-size`): which models to evict, least recently used first, so
//! that what is really on disk fits. Leased models and models being fetched are never
//! chosen.

use std::time::SystemTime;

use modelcache_proto::Reference;

/// A local model as the budget sees it.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub reference: Reference,
    /// Bytes on disk for it: every revision kept, partial downloads, progress files.
    pub bytes: u64,
    pub last_used: SystemTime,
    /// Leased, being fetched, or just asked for: not to be evicted now.
    pub protected: bool,
}

/// The models to evict, in order, to bring `used` bytes down to `max`; fewer (possibly
/// none) when what may be evicted is not enough.
pub fn choose(used: u64, max: u64, candidates: &[Candidate]) -> Vec<Reference> {
    if used <= max {
        return Vec::new();
    }
    let mut order: Vec<&Candidate> = candidates.iter().filter(|c| !c.protected).collect();
    order.sort_by_key(|c| c.last_used);
    let mut over = used - max;
    let mut chosen = Vec::new();
    for c in order {
        if over == 0 {
            break;
        }
        chosen.push(c.reference.clone());
        over = over.saturating_sub(c.bytes);
    }
    chosen
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn c(name: &str, bytes: u64, age_s: u64, protected: bool) -> Candidate {
        Candidate {
            reference: Reference::parse(name).unwrap(),
            bytes,
            last_used: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 - age_s),
            protected,
        }
    }

    #[test]
    fn least_recently_used_go_first_and_protected_ones_never() {
        let models = [
            c("new", 10, 1, false),
            c("oldest", 10, 300, true),
            c("old", 10, 200, false),
            c("middle", 10, 100, false),
        ];
        let names = |v: Vec<Reference>| v.iter().map(|r| r.name().to_owned()).collect::<Vec<_>>();
        assert!(choose(40, 40, &models).is_empty());
        assert_eq!(names(choose(41, 40, &models)), ["old"]);
        assert_eq!(names(choose(50, 30, &models)), ["old", "middle"]);
        // Not enough to evict: everything unprotected goes, and no more.
        assert_eq!(names(choose(100, 0, &models)), ["old", "middle", "new"]);
    }
}
