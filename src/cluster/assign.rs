//! Which live node should own each shard: rendezvous hashing with bounded
//! loads. Each shard ranks the nodes by a hash of (node, shard) and goes to the
//! highest-ranked node that still has room: each node takes `shards / nodes`
//! shards, the first `shards % nodes` of them (in sorted order) one more.
//! Every node computes the same answer from the same member list, the spread is
//! even to within one shard, and a node joining or leaving moves few shards
//! besides its own share.
//!
//! Pure: no I/O, no clock. See Mirrokni, Thorup and Zadimoghaddam,
//! "Consistent Hashing with Bounded Loads" (2017) for why the bound keeps the
//! spread even without moving much.

use gavel_actors::ports::SHARD_COUNT;

/// The desired owner of every shard, as an index into `nodes` (which must be
/// sorted and without duplicates); `None` for every shard when there is no node.
pub fn assign(nodes: &[String]) -> Vec<Option<usize>> {
    if nodes.is_empty() {
        return vec![None; SHARD_COUNT as usize];
    }
    debug_assert!(nodes.windows(2).all(|pair| pair[0] < pair[1]), "nodes sorted and unique");
    let (base, extra) = (SHARD_COUNT as usize / nodes.len(), SHARD_COUNT as usize % nodes.len());
    let capacity: Vec<usize> = (0..nodes.len()).map(|index| base + usize::from(index < extra)).collect();
    let node_hashes: Vec<u64> = nodes.iter().map(|node| fnv1a(node.as_bytes())).collect();
    let mut load = vec![0usize; nodes.len()];
    let mut ranked: Vec<usize> = (0..nodes.len()).collect();
    (0..SHARD_COUNT)
        .map(|shard| {
            ranked.sort_by_key(|&index| std::cmp::Reverse((mix(node_hashes[index] ^ u64::from(shard)), index)));
            let chosen =
                ranked.iter().copied().find(|&index| load[index] < capacity[index]).expect("the capacities add up");
            load[chosen] += 1;
            Some(chosen)
        })
        .collect()
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// SplitMix64's finaliser: spreads close inputs (one node, neighbouring shards) apart.
fn mix(mut value: u64) -> u64 {
    value = value.wrapping_add(0x9e37_79b9_7f4a_7c15);
    value = (value ^ (value >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    value = (value ^ (value >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    value ^ (value >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(names: &[&str]) -> Vec<String> {
        let mut nodes: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        nodes.sort();
        nodes
    }

    fn loads(nodes: &[String]) -> Vec<usize> {
        let mut load = vec![0; nodes.len()];
        for owner in assign(nodes) {
            load[owner.expect("a node for every shard")] += 1;
        }
        load
    }

    #[test]
    fn every_shard_has_one_owner_and_the_spread_is_even() {
        for count in 1..=7 {
            let names: Vec<String> = (0..count).map(|index| format!("node-{index}")).collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let nodes = nodes(&names);
            let load = loads(&nodes);
            assert_eq!(load.iter().sum::<usize>(), SHARD_COUNT as usize);
            let even = SHARD_COUNT as usize / count;
            assert!(load.iter().all(|&shards| shards == even || shards == even + 1), "{count} nodes: {load:?}");
        }
        assert_eq!(assign(&[]), vec![None; SHARD_COUNT as usize]);
    }

    #[test]
    fn every_node_computes_the_same_assignment() {
        let one = assign(&nodes(&["a", "b", "c"]));
        let other = assign(&nodes(&["c", "a", "b"]));
        assert_eq!(one, other);
    }

    #[test]
    fn a_joining_node_takes_its_share_and_moves_little_else() {
        let before_nodes = nodes(&["alpha", "bravo", "charlie"]);
        let after_nodes = nodes(&["alpha", "bravo", "charlie", "delta"]);
        let before = assign(&before_nodes);
        let after = assign(&after_nodes);
        let delta = after_nodes.iter().position(|node| node == "delta").unwrap();
        let to_delta = after.iter().filter(|owner| **owner == Some(delta)).count();
        let moved_elsewhere = (0..SHARD_COUNT as usize)
            .filter(|&shard| after[shard] != Some(delta))
            .filter(|&shard| before_nodes[before[shard].unwrap()] != after_nodes[after[shard].unwrap()])
            .count();
        assert_eq!(to_delta, 64);
        // Plain modulo hashing would move about three quarters of all shards.
        assert!(moved_elsewhere < 64, "{moved_elsewhere} shards moved between the old nodes");
    }
}
