//! Which node owns a model: rendezvous (highest-random-weight) hashing of the model name
//! over the members' node ids (SPEC §7). Nodes and agents compute it alike, so an agent
//! goes to the owner first and every node agrees on the owner without talking about it.
//!
//! Each (model, node id) pair gets a weight from BLAKE3; the members ranked by weight,
//! highest first, are the model's owner and then its fall-backs in order. A member that
//! leaves moves only the models it owned (to their second in rank), and one that joins
//! takes over only the models it now ranks first for. Ranking is by id, not address, so
//! one node reached by different addresses ranks the same everywhere.

/// The weight of node `id` for model `model`: the first 8 bytes of the BLAKE3 hash of both,
/// each prefixed by its length (so no two pairs share an encoding).
pub fn weight(model: &str, id: &str) -> u64 {
    let mut hasher = blake3::Hasher::new();
    for part in [model, id] {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    let hash = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// `ids` in `model`'s rank order: owner first. Duplicates count once; equal weights (which
/// BLAKE3 makes vanishingly rare) are ordered by id, so every caller gets the same order.
pub fn rank<'a, I>(model: &str, ids: I) -> Vec<&'a str>
where
    I: IntoIterator<Item = &'a str>,
{
    let mut ranked: Vec<(u64, &str)> = ids.into_iter().map(|id| (weight(model, id), id)).collect();
    ranked.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    ranked.dedup_by(|a, b| a.1 == b.1);
    ranked.into_iter().map(|(_, id)| id).collect()
}

/// The owner of `model` among `ids` (`None` when there are none): the first in rank.
pub fn owner<'a, I>(model: &str, ids: I) -> Option<&'a str>
where
    I: IntoIterator<Item = &'a str>,
{
    rank(model, ids).into_iter().next()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const IDS: [&str; 5] = ["node-a", "node-b", "node-c", "node-d", "node-e"];

    fn models(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("org/model-{i}")).collect()
    }

    #[test]
    fn the_rank_is_the_same_whatever_order_the_members_come_in() {
        for model in models(200) {
            let forward = rank(&model, IDS);
            let mut reversed: Vec<&str> = IDS.to_vec();
            reversed.reverse();
            assert_eq!(rank(&model, reversed), forward, "{model}");
            // Listed twice (a node given once by name and once by address): counted once.
            let twice = IDS.iter().chain(IDS.iter()).copied();
            assert_eq!(rank(&model, twice), forward, "{model}");
            assert_eq!(owner(&model, IDS), Some(forward[0]));
            assert_eq!(forward.len(), IDS.len());
        }
        assert_eq!(rank("m", []), Vec::<&str>::new());
        assert_eq!(owner("m", []), None);
    }

    #[test]
    fn a_member_leaving_moves_only_its_own_models_to_their_second_in_rank() {
        let gone = "node-c";
        let rest: Vec<&str> = IDS.iter().copied().filter(|&id| id != gone).collect();
        let mut moved = 0;
        for model in models(2000) {
            let before = rank(&model, IDS);
            let after = rank(&model, rest.iter().copied());
            if before[0] == gone {
                moved += 1;
                assert_eq!(after[0], before[1], "{model}");
            } else {
                assert_eq!(after[0], before[0], "{model}");
            }
            // The survivors keep their relative order.
            let kept: Vec<&str> = before.into_iter().filter(|&id| id != gone).collect();
            assert_eq!(after, kept, "{model}");
        }
        assert!(moved > 0);
    }

    #[test]
    fn owners_are_spread_evenly() {
        let mut owned: HashMap<&str, usize> = HashMap::new();
        let n = 10_000;
        for model in models(n) {
            *owned.entry(rank(&model, IDS)[0]).or_default() += 1;
        }
        let fair = n / IDS.len();
        for id in IDS {
            let count = owned.get(id).copied().unwrap_or(0);
            assert!(
                count > fair * 8 / 10 && count < fair * 12 / 10,
                "{id} owns {count} of {n}: {owned:?}"
            );
        }
    }

    #[test]
    fn weights_are_pinned() {
        // Nodes of different versions must agree on owners: the weight function is part
        // of the cluster's contract and may not change.
        assert_eq!(weight("resnet50", "node-a"), weight("resnet50", "node-a"));
        assert_ne!(weight("resnet50", "node-a"), weight("resnet50", "node-b"));
        assert_ne!(weight("ab", "c"), weight("a", "bc"));
        let pinned = format!("{:016x}", weight("resnet50", "node-a"));
        assert_eq!(pinned, PINNED_RESNET50_NODE_A);
    }

    const PINNED_RESNET50_NODE_A: &str = "fc418004c128cacf";
}
