//! Delivery shards and which deliverer replica owns each.
//!
//! An integration's jobs all go to one shard queue (`Topology::shard_of`),
//! and each shard is consumed by exactly one replica at a time, so the
//! integration's token bucket lives in one process and its rate limit holds
//! however many replicas run. Ownership uses nothing but RabbitMQ:
//!
//! - **Membership.** Every replica binds a private queue to the fanout
//!   exchange `<prefix>.deliverers` and announces its id there twice a
//!   second; a replica not heard from for [`MEMBER_TTL`] is gone.
//! - **Assignment.** Every replica computes the same [`assign`]ment from the
//!   same member list and configuration: shards weighted by the number of
//!   integrations in them, heaviest first, each to the least-loaded member.
//! - **Leases.** A replica serves a shard only while it holds the shard's
//!   exclusive queue `<prefix>.deliveries.<k>.lease`. The broker grants an
//!   exclusive queue to one connection and deletes it when that connection
//!   dies, so two replicas whose views briefly differ never serve one shard
//!   together, and a killed replica's shards are free at once. A replica
//!   giving a shard up stops consuming it, finishes the work under way, and
//!   only then deletes the lease.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use swallow_shared::{Integrations, Topology};

/// A replica not heard from for this long is no longer a member.
pub const MEMBER_TTL: Duration = Duration::from_secs(3);
/// How often a replica announces itself and revisits its shards.
pub const TICK: Duration = Duration::from_millis(500);

/// How many integrations each shard carries.
pub fn shard_weights(topology: &Topology, integrations: &Integrations) -> Vec<u64> {
    let mut weights = vec![0u64; topology.shards() as usize];
    for integration in &integrations.list {
        weights[topology.shard_of(&integration.id) as usize] += 1;
    }
    weights
}

/// Assigns every shard to one member: heaviest shards first, each to the
/// member with the least weight so far (then the fewest shards, then the
/// smallest id). Deterministic, so all replicas agree given the same inputs.
pub fn assign(weights: &[u64], members: &BTreeSet<String>) -> BTreeMap<String, BTreeSet<u32>> {
    let mut result: BTreeMap<String, BTreeSet<u32>> = members.iter().map(|m| (m.clone(), BTreeSet::new())).collect();
    if members.is_empty() {
        return result;
    }
    let mut load: BTreeMap<&String, u64> = members.iter().map(|m| (m, 0)).collect();
    let mut order: Vec<u32> = (0..weights.len() as u32).collect();
    order.sort_by_key(|&k| (std::cmp::Reverse(weights[k as usize]), k));
    for k in order {
        let member = members
            .iter()
            .min_by_key(|m| (load[m], result[*m].len(), *m))
            .expect("members is not empty");
        *load.get_mut(member).expect("every member has a load") += weights[k as usize];
        result.get_mut(member).expect("every member has a set").insert(k);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> BTreeSet<String> {
        (0..n).map(|i| format!("m{i}")).collect()
    }

    #[test]
    fn every_shard_has_exactly_one_owner() {
        let weights: Vec<u64> = (0..16).map(|k| (k % 3) as u64).collect();
        for n in 1..=5 {
            let a = assign(&weights, &members(n));
            let all: Vec<u32> = a.values().flatten().copied().collect();
            assert_eq!(all.len(), 16);
            assert_eq!(all.iter().collect::<BTreeSet<_>>().len(), 16);
        }
    }

    #[test]
    fn weight_is_balanced() {
        // 30 integrations hashed over 16 shards, three members.
        let t = Topology::with_shards("p", 16);
        let mut weights = vec![0u64; 16];
        for i in 0..30 {
            weights[t.shard_of(&format!("busy{i}")) as usize] += 1;
        }
        let a = assign(&weights, &members(3));
        for (m, shards) in &a {
            let w: u64 = shards.iter().map(|&k| weights[k as usize]).sum();
            assert!((6..=14).contains(&w), "{m} carries {w} of 30: {a:?}");
        }
    }

    #[test]
    fn everyone_computes_the_same_answer() {
        let weights = vec![3, 1, 4, 1, 5, 9, 2, 6];
        assert_eq!(assign(&weights, &members(3)), assign(&weights, &members(3)));
        assert!(assign(&weights, &BTreeSet::new()).is_empty());
    }
}
