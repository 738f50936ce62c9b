//! The pool partitioner: divides a tenant's N apps into M groups, one per
//! edge node of the pool. Group `i` runs on the node at slot `i` (slots are
//! 1-based), and every group must be non-empty so that no node sits idle.
//! This module is pure domain logic: no I/O, no transport types.
//!
//! # Algorithm
//!
//! 1. Check the counts: there is at least one node (M >= 1) and at least as
//!    many apps as nodes (N >= M).
//! 2. Pin every app that names an explicit slot to that slot. The slot must
//!    lie in `1..=M`, and the explicit apps of one slot together must fit the
//!    node's capacity in each of the four resources (CPU, memory, disk,
//!    network). Explicit apps are never moved.
//! 3. Check that the apps without an explicit slot (the free apps) are at
//!    least as many as the slots that are still empty.
//! 4. Sort the free apps by decreasing *dominant share*, that is the largest,
//!    over the four resources, of the app's request divided by the total
//!    capacity of all nodes for that resource. Ties are broken by name and
//!    then by input index.
//! 5. Place the free apps one by one in that order. The candidates are all
//!    slots, except when the apps left to place are exactly as many as the
//!    empty slots: then only the empty slots are candidates. Among the
//!    candidates that can still hold the whole request (free capacity at
//!    least the request in all four resources; a zero request fits
//!    anywhere), pick the one whose *dominant utilisation* after the
//!    placement is lowest; ties go to the slot with fewer apps, then to the
//!    lower slot number (so that apps with zero requests, which leave every
//!    utilisation unchanged, are still spread over the nodes). The dominant
//!    utilisation of a slot is the largest, over the four resources, of used
//!    divided by capacity; a resource with zero capacity and zero use counts
//!    as 0. If no candidate can hold the app, fail with an error naming it.
//!
//! # Why it balances load
//!
//! Choosing the slot that ends up least utilised is the "least loaded
//! machine" rule: every placement keeps the most loaded node as low as the
//! current state allows, and a node with twice the capacity absorbs about
//! twice the work before it looks as busy as the others. Placing the largest
//! apps first (the LPT rule of scheduling) means the big, hard-to-move
//! pieces are spread while every node still has room, and the small apps
//! placed last fill the remaining gaps evenly; with one resource, equal
//! nodes and no explicit slots, this is Graham's LPT schedule, whose busiest
//! node is within 4/3 of the best possible. Measuring size and load by the dominant resource (as
//! in Dominant Resource Fairness) treats a memory-heavy app and a CPU-heavy
//! app alike, so that no single resource of one node is exhausted while the
//! others sit idle. Reserving the empty slots for the last apps, which are
//! the smallest ones, guarantees that every node gets at least one app at
//! the lowest cost in balance.
//!
//! # Guarantees and limits
//!
//! The result depends only on the input: there is no randomness, no hash
//! map, and all ratios are compared exactly (as fractions of integers, not
//! floating point), so ties are real ties and are broken the same way every
//! time. When the names are distinct, the slot of each app does not depend
//! on the order in which the apps are given. Packing is NP-hard in general,
//! so this greedy heuristic can report an app as unplaceable on a very tight
//! pool where a cleverer assignment exists; it never returns an assignment
//! that overloads a node or leaves one empty.

use std::cmp::{Ordering, Reverse};
use std::fmt;

use crate::resources::Resources;

/// One app of the tenant to place on the pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppRequest {
    /// The app's name, used in errors and to break ties deterministically.
    pub name: String,
    /// What the app needs from the node that runs it.
    pub request: Resources,
    /// The slot (1-based) the tenant pinned the app to, if any.
    pub slot: Option<u32>,
}

/// One of the four scheduled resources.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    CpuMillis,
    MemoryMb,
    DiskMb,
    NetworkMbps,
}

impl Resource {
    /// All four resources, in the order in which errors report them.
    pub const ALL: [Resource; 4] = [
        Resource::CpuMillis,
        Resource::MemoryMb,
        Resource::DiskMb,
        Resource::NetworkMbps,
    ];

    /// The name of the matching field of `Resources`.
    pub fn name(self) -> &'static str {
        match self {
            Resource::CpuMillis => "cpu_millis",
            Resource::MemoryMb => "memory_mb",
            Resource::DiskMb => "disk_mb",
            Resource::NetworkMbps => "network_mbps",
        }
    }

    /// The amount of this resource in `resources`.
    pub fn of(self, resources: &Resources) -> u64 {
        match self {
            Resource::CpuMillis => resources.cpu_millis,
            Resource::MemoryMb => resources.memory_mb,
            Resource::DiskMb => resources.disk_mb,
            Resource::NetworkMbps => resources.network_mbps,
        }
    }

    /// A mutable reference to the amount of this resource in `resources`.
    fn of_mut(self, resources: &mut Resources) -> &mut u64 {
        match self {
            Resource::CpuMillis => &mut resources.cpu_millis,
            Resource::MemoryMb => &mut resources.memory_mb,
            Resource::DiskMb => &mut resources.disk_mb,
            Resource::NetworkMbps => &mut resources.network_mbps,
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why one slot cannot take an app: the first resource (in the order of
/// `Resource::ALL`) of which it has less free than the app needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shortfall {
    pub slot: u32,
    pub resource: Resource,
    pub need: u64,
    pub free: u64,
}

impl fmt::Display for Shortfall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "slot {} has {} {} free but {} is needed",
            self.slot, self.free, self.resource, self.need
        )
    }
}

/// Why the apps cannot be partitioned. Every message names the offending
/// app (by input index and name), slot or resource, and the numbers.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PartitionError {
    /// The pool has no node at all.
    #[error("no nodes to partition onto: the pool needs at least one node")]
    NoNodes,
    /// There are fewer apps than nodes, so some node would get no app.
    #[error("fewer apps ({apps}) than nodes ({nodes}): every node needs at least one app")]
    TooFewApps { apps: usize, nodes: usize },
    /// An app names a slot that does not exist.
    #[error("apps[{index}] ({app:?}): slot {slot} is outside 1..={nodes}")]
    SlotOutOfRange {
        index: usize,
        app: String,
        slot: u32,
        nodes: usize,
    },
    /// The apps pinned to one slot need more of a resource than its node has.
    #[error(
        "slot {slot} is over capacity in {resource}: explicit apps need {need}, node has {capacity}"
    )]
    ExplicitOverCapacity {
        slot: u32,
        resource: Resource,
        need: u64,
        capacity: u64,
    },
    /// After the explicit slots, more slots are empty than apps are free.
    #[error(
        "slots without an explicit app ({}) outnumber the apps without an explicit slot ({free_apps}): every node needs at least one app",
        join(.empty_slots)
    )]
    TooFewFreeApps {
        free_apps: usize,
        empty_slots: Vec<u32>,
    },
    /// An app needs more of a resource than any node has free.
    #[error(
        "apps[{index}] ({app:?}) needs {need} {resource} but no node has that much free (the most free on one node is {largest_free})"
    )]
    AppTooLarge {
        index: usize,
        app: String,
        resource: Resource,
        need: u64,
        largest_free: u64,
    },
    /// Each resource of an app fits somewhere, but no node has all of them.
    #[error(
        "apps[{index}] ({app:?}) fits on no node, as none has all of its request free at once: {}",
        join(.shortfalls)
    )]
    NoNodeFits {
        index: usize,
        app: String,
        shortfalls: Vec<Shortfall>,
    },
    /// An app must fill an empty node so that every node gets an app, but
    /// none of the empty nodes can hold it.
    #[error(
        "apps[{index}] ({app:?}) must go to a node that has no app yet, so that every node gets one, but none of them has room: {}",
        join(.shortfalls)
    )]
    NoEmptyNodeFits {
        index: usize,
        app: String,
        shortfalls: Vec<Shortfall>,
    },
}

/// Joins displayable items with commas, for error messages.
fn join<T: fmt::Display>(items: &[T]) -> String {
    let parts: Vec<String> = items.iter().map(ToString::to_string).collect();
    parts.join(", ")
}

/// Divides `apps` into `nodes.len()` non-empty groups with the algorithm of
/// the module documentation. `nodes[i]` is the capacity of the node at slot
/// `i + 1` (what it can give to apps). Returns, for each app in input order,
/// its slot (1-based).
pub fn partition(apps: &[AppRequest], nodes: &[Resources]) -> Result<Vec<u32>, PartitionError> {
    check_counts(apps.len(), nodes.len())?;
    let mut pool = Pool::new(nodes);
    let mut slots = place_explicit(apps, &mut pool)?;
    pool.check_explicit_capacity()?;
    let free = order_free_apps(apps, nodes);
    pool.check_enough_free(free.len())?;
    for (placed, &index) in free.iter().enumerate() {
        let must_fill_empty = free.len() - placed == pool.empty_count();
        slots[index] = pool.place(index, &apps[index], must_fill_empty)?;
    }
    Ok(slots)
}

/// Checks that there is a node and that every node can get an app.
fn check_counts(apps: usize, nodes: usize) -> Result<(), PartitionError> {
    if nodes == 0 {
        return Err(PartitionError::NoNodes);
    }
    if apps < nodes {
        return Err(PartitionError::TooFewApps { apps, nodes });
    }
    Ok(())
}

/// Puts every app with an explicit slot into that slot. Returns the slot of
/// each app, with 0 for the apps that are still to be placed.
fn place_explicit(apps: &[AppRequest], pool: &mut Pool<'_>) -> Result<Vec<u32>, PartitionError> {
    let mut slots = vec![0; apps.len()];
    for (index, app) in apps.iter().enumerate() {
        let Some(slot) = app.slot else { continue };
        let in_range = slot >= 1 && (slot as usize) <= pool.len();
        if !in_range {
            return Err(PartitionError::SlotOutOfRange {
                index,
                app: app.name.clone(),
                slot,
                nodes: pool.len(),
            });
        }
        pool.add(slot as usize - 1, &app.request);
        slots[index] = slot;
    }
    Ok(slots)
}

/// Returns the indices of the apps without an explicit slot, by decreasing
/// dominant share, then by name, then by input index.
fn order_free_apps(apps: &[AppRequest], nodes: &[Resources]) -> Vec<usize> {
    let totals = total_capacity(nodes);
    let mut keyed: Vec<(Reverse<Ratio>, &str, usize)> = apps
        .iter()
        .enumerate()
        .filter(|(_, app)| app.slot.is_none())
        .map(|(index, app)| {
            let share = dominant_share(&app.request, &totals);
            (Reverse(share), app.name.as_str(), index)
        })
        .collect();
    keyed.sort();
    keyed.into_iter().map(|(_, _, index)| index).collect()
}

/// The capacity of all nodes together, per resource (in `Resource::ALL`
/// order). It is summed in `u128` so that it cannot overflow.
fn total_capacity(nodes: &[Resources]) -> [u128; 4] {
    Resource::ALL.map(|r| nodes.iter().map(|n| u128::from(r.of(n))).sum())
}

/// The largest, over the resources, of the request divided by the total
/// capacity of the pool for that resource.
fn dominant_share(request: &Resources, totals: &[u128; 4]) -> Ratio {
    Resource::ALL
        .iter()
        .zip(totals)
        .map(|(r, &total)| Ratio::new(u128::from(r.of(request)), total))
        .fold(Ratio::ZERO, Ord::max)
}

/// The state of the pool during the partition: what each slot has and what
/// is already placed on it. Slot indices here are 0-based.
struct Pool<'a> {
    capacity: &'a [Resources],
    used: Vec<Resources>,
    members: Vec<usize>,
}

impl<'a> Pool<'a> {
    /// An empty pool with the given node capacities.
    fn new(capacity: &'a [Resources]) -> Self {
        Pool {
            capacity,
            used: vec![Resources::default(); capacity.len()],
            members: vec![0; capacity.len()],
        }
    }

    /// The number of slots.
    fn len(&self) -> usize {
        self.capacity.len()
    }

    /// The number of slots that have no app yet.
    fn empty_count(&self) -> usize {
        self.members.iter().filter(|&&m| m == 0).count()
    }

    /// Adds an app's request to a slot. The sums saturate, so an absurd
    /// explicit total is reported as `u64::MAX` rather than wrapping.
    fn add(&mut self, slot: usize, request: &Resources) {
        for r in Resource::ALL {
            let used = r.of_mut(&mut self.used[slot]);
            *used = used.saturating_add(r.of(request));
        }
        self.members[slot] += 1;
    }

    /// How much of a resource a slot still has free.
    fn free(&self, slot: usize, r: Resource) -> u64 {
        r.of(&self.capacity[slot])
            .saturating_sub(r.of(&self.used[slot]))
    }

    /// Fails if the explicit apps of a slot exceed its node's capacity.
    fn check_explicit_capacity(&self) -> Result<(), PartitionError> {
        for (slot, (used, capacity)) in self.used.iter().zip(self.capacity).enumerate() {
            for r in Resource::ALL {
                if r.of(used) > r.of(capacity) {
                    return Err(PartitionError::ExplicitOverCapacity {
                        slot: slot_number(slot),
                        resource: r,
                        need: r.of(used),
                        capacity: r.of(capacity),
                    });
                }
            }
        }
        Ok(())
    }

    /// Fails if fewer apps are free than slots are empty.
    fn check_enough_free(&self, free_apps: usize) -> Result<(), PartitionError> {
        let empty_slots: Vec<u32> = (0..self.len())
            .filter(|&slot| self.members[slot] == 0)
            .map(slot_number)
            .collect();
        if free_apps < empty_slots.len() {
            return Err(PartitionError::TooFewFreeApps {
                free_apps,
                empty_slots,
            });
        }
        Ok(())
    }

    /// Places the app `apps[index]` on its best candidate slot and returns
    /// that slot (1-based). Only empty slots are candidates when
    /// `must_fill_empty` is set.
    fn place(
        &mut self,
        index: usize,
        app: &AppRequest,
        must_fill_empty: bool,
    ) -> Result<u32, PartitionError> {
        let candidates: Vec<usize> = (0..self.len())
            .filter(|&slot| !must_fill_empty || self.members[slot] == 0)
            .collect();
        match self.best_slot(&candidates, &app.request) {
            Some(slot) => {
                self.add(slot, &app.request);
                Ok(slot_number(slot))
            }
            None => Err(self.unplaceable(index, app, &candidates, must_fill_empty)),
        }
    }

    /// The candidate that can hold `request` and has the lowest dominant
    /// utilisation once it does, ties going to the slot with fewer apps and
    /// then to the lower slot.
    fn best_slot(&self, candidates: &[usize], request: &Resources) -> Option<usize> {
        candidates
            .iter()
            .copied()
            .filter(|&slot| self.shortfall(slot, request).is_none())
            .min_by_key(|&slot| {
                let utilisation = self.utilisation_with(slot, request);
                (utilisation, self.members[slot], slot)
            })
    }

    /// The first resource of which `slot` has less free than `request`
    /// needs, or `None` if the request fits.
    fn shortfall(&self, slot: usize, request: &Resources) -> Option<Shortfall> {
        Resource::ALL.into_iter().find_map(|r| {
            let (need, free) = (r.of(request), self.free(slot, r));
            (need > free).then_some(Shortfall {
                slot: slot_number(slot),
                resource: r,
                need,
                free,
            })
        })
    }

    /// The dominant utilisation of `slot` if it also held `request`: the
    /// largest, over the resources, of used divided by capacity.
    fn utilisation_with(&self, slot: usize, request: &Resources) -> Ratio {
        Resource::ALL
            .into_iter()
            .map(|r| {
                let used = u128::from(r.of(&self.used[slot])) + u128::from(r.of(request));
                Ratio::new(used, u128::from(r.of(&self.capacity[slot])))
            })
            .fold(Ratio::ZERO, Ord::max)
    }

    /// The error for an app that no candidate slot can hold. A resource that
    /// no node at all has enough of is the clearest reason, so it comes
    /// first; otherwise every candidate's shortfall is listed.
    fn unplaceable(
        &self,
        index: usize,
        app: &AppRequest,
        candidates: &[usize],
        must_fill_empty: bool,
    ) -> PartitionError {
        if let Some(error) = self.too_large(index, app) {
            return error;
        }
        let name = app.name.clone();
        let shortfalls: Vec<Shortfall> = candidates
            .iter()
            .filter_map(|&slot| self.shortfall(slot, &app.request))
            .collect();
        if must_fill_empty {
            PartitionError::NoEmptyNodeFits {
                index,
                app: name,
                shortfalls,
            }
        } else {
            PartitionError::NoNodeFits {
                index,
                app: name,
                shortfalls,
            }
        }
    }

    /// An `AppTooLarge` error for the first resource of which the app needs
    /// more than any slot has free, if there is one.
    fn too_large(&self, index: usize, app: &AppRequest) -> Option<PartitionError> {
        Resource::ALL.into_iter().find_map(|r| {
            let need = r.of(&app.request);
            let largest_free = (0..self.len())
                .map(|slot| self.free(slot, r))
                .max()
                .unwrap_or(0);
            (need > largest_free).then(|| PartitionError::AppTooLarge {
                index,
                app: app.name.clone(),
                resource: r,
                need,
                largest_free,
            })
        })
    }
}

/// The 1-based slot number of a 0-based slot index. The number of slots is
/// the number of nodes, which in practice is far below `u32::MAX`; larger
/// indices saturate.
fn slot_number(slot: usize) -> u32 {
    u32::try_from(slot + 1).unwrap_or(u32::MAX)
}

/// A non-negative fraction `num / den`, compared exactly. A zero
/// denominator with a non-zero numerator is infinity, which is above every
/// finite value; any fraction with a zero numerator is zero.
#[derive(Clone, Copy, Debug)]
struct Ratio {
    num: u128,
    den: u128,
}

impl Ratio {
    const ZERO: Ratio = Ratio { num: 0, den: 1 };

    /// The fraction `num / den`, with `0 / 0` taken as zero.
    fn new(num: u128, den: u128) -> Ratio {
        if num == 0 {
            Ratio::ZERO
        } else {
            Ratio { num, den }
        }
    }
}

impl Ord for Ratio {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self.den == 0, other.den == 0) {
            (true, true) => Ordering::Equal,
            (true, false) => Ordering::Greater,
            (false, true) => Ordering::Less,
            (false, false) => cmp_fractions(self.num, self.den, other.num, other.den),
        }
    }
}

impl PartialOrd for Ratio {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Ratio {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Ratio {}

/// Compares `an / ad` with `bn / bd` (both denominators non-zero) without
/// overflow or rounding. The integer parts are compared first; if they are
/// equal, comparing the remainders `ar / ad` and `br / bd` is the same as
/// comparing the reciprocals `bd / br` and `ad / ar`, which is repeated like
/// Euclid's algorithm until the answer is known.
fn cmp_fractions(mut an: u128, mut ad: u128, mut bn: u128, mut bd: u128) -> Ordering {
    loop {
        let (aq, bq) = (an / ad, bn / bd);
        if aq != bq {
            return aq.cmp(&bq);
        }
        let (ar, br) = (an % ad, bn % bd);
        match (ar == 0, br == 0) {
            (true, true) => return Ordering::Equal,
            (true, false) => return Ordering::Less,
            (false, true) => return Ordering::Greater,
            (false, false) => (an, ad, bn, bd) = (bd, br, ad, ar),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::ops::RangeInclusive;

    use proptest::prelude::*;

    use super::*;

    /// Resources with the four amounts in `Resource::ALL` order.
    fn res(cpu_millis: u64, memory_mb: u64, disk_mb: u64, network_mbps: u64) -> Resources {
        Resources {
            cpu_millis,
            memory_mb,
            disk_mb,
            network_mbps,
            disk_io_kbps: 0,
        }
    }

    /// Resources with only CPU.
    fn cpu(cpu_millis: u64) -> Resources {
        res(cpu_millis, 0, 0, 0)
    }

    /// A free app (no explicit slot).
    fn app(name: &str, request: Resources) -> AppRequest {
        AppRequest {
            name: name.to_string(),
            request,
            slot: None,
        }
    }

    /// An app pinned to a slot.
    fn pinned(name: &str, request: Resources, slot: u32) -> AppRequest {
        AppRequest {
            slot: Some(slot),
            ..app(name, request)
        }
    }

    /// A typical node.
    fn node() -> Resources {
        res(4000, 8192, 100_000, 1000)
    }

    /// How many apps each slot got.
    fn group_sizes(slots: &[u32], nodes: usize) -> Vec<usize> {
        (1..=nodes)
            .map(|s| slots.iter().filter(|&&x| x as usize == s).count())
            .collect()
    }

    #[test]
    fn no_nodes_is_an_error() {
        let err = partition(&[app("a", cpu(1))], &[]).unwrap_err();
        assert_eq!(err, PartitionError::NoNodes);
        assert_eq!(
            err.to_string(),
            "no nodes to partition onto: the pool needs at least one node"
        );
    }

    #[test]
    fn fewer_apps_than_nodes_is_an_error() {
        let apps = [app("a", cpu(1)), app("b", cpu(1))];
        let err = partition(&apps, &[node(); 3]).unwrap_err();
        assert_eq!(err, PartitionError::TooFewApps { apps: 2, nodes: 3 });
        assert_eq!(
            err.to_string(),
            "fewer apps (2) than nodes (3): every node needs at least one app"
        );
    }

    #[test]
    fn slot_out_of_range_is_an_error() {
        let apps = [
            app("web", cpu(1)),
            pinned("db", cpu(1), 5),
            app("c", cpu(1)),
        ];
        let err = partition(&apps, &[node(); 3]).unwrap_err();
        assert_eq!(err.to_string(), "apps[1] (\"db\"): slot 5 is outside 1..=3");
        let apps = [pinned("zero", cpu(1), 0)];
        let err = partition(&apps, &[node()]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "apps[0] (\"zero\"): slot 0 is outside 1..=1"
        );
    }

    #[test]
    fn explicit_apps_over_capacity_is_an_error() {
        let apps = [
            app("a", cpu(1)),
            pinned("b", res(0, 5000, 0, 0), 2),
            pinned("c", res(0, 4000, 0, 0), 2),
        ];
        let err = partition(&apps, &[node(); 2]).unwrap_err();
        assert_eq!(
            err,
            PartitionError::ExplicitOverCapacity {
                slot: 2,
                resource: Resource::MemoryMb,
                need: 9000,
                capacity: 8192,
            }
        );
        assert_eq!(
            err.to_string(),
            "slot 2 is over capacity in memory_mb: explicit apps need 9000, node has 8192"
        );
    }

    #[test]
    fn too_few_free_apps_for_the_empty_slots_is_an_error() {
        let apps = [
            pinned("a", cpu(1), 1),
            pinned("b", cpu(1), 1),
            app("c", cpu(1)),
        ];
        let err = partition(&apps, &[node(); 3]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "slots without an explicit app (2, 3) outnumber the apps without an \
             explicit slot (1): every node needs at least one app"
        );
    }

    #[test]
    fn app_larger_than_any_free_space_is_an_error() {
        let apps = [
            app("a", cpu(1500)),
            app("b", cpu(1500)),
            app("web", cpu(3000)),
        ];
        let err = partition(&apps, &[cpu(2000), cpu(2000)]).unwrap_err();
        assert_eq!(
            err,
            PartitionError::AppTooLarge {
                index: 2,
                app: "web".to_string(),
                resource: Resource::CpuMillis,
                need: 3000,
                largest_free: 2000,
            }
        );
        assert_eq!(
            err.to_string(),
            "apps[2] (\"web\") needs 3000 cpu_millis but no node has that much \
             free (the most free on one node is 2000)"
        );
    }

    #[test]
    fn app_whose_resources_fit_only_on_different_nodes_is_an_error() {
        let nodes = [res(4000, 1000, 0, 0), res(1000, 4000, 0, 0)];
        let apps = [
            pinned("a", res(0, 0, 0, 0), 1),
            pinned("b", res(0, 0, 0, 0), 2),
            app("both", res(2000, 2000, 0, 0)),
        ];
        let err = partition(&apps, &nodes).unwrap_err();
        assert_eq!(
            err.to_string(),
            "apps[2] (\"both\") fits on no node, as none has all of its request \
             free at once: slot 1 has 1000 memory_mb free but 2000 is needed, \
             slot 2 has 1000 cpu_millis free but 2000 is needed"
        );
    }

    #[test]
    fn app_that_must_fill_a_too_small_empty_node_is_an_error() {
        let apps = [
            app("a", cpu(50)),
            app("b", cpu(50)),
            pinned("c", cpu(50), 1),
        ];
        let err = partition(&apps, &[cpu(1000), cpu(10), cpu(100)]).unwrap_err();
        assert_eq!(
            err,
            PartitionError::NoEmptyNodeFits {
                index: 1,
                app: "b".to_string(),
                shortfalls: vec![Shortfall {
                    slot: 2,
                    resource: Resource::CpuMillis,
                    need: 50,
                    free: 10,
                }],
            }
        );
        assert_eq!(
            err.to_string(),
            "apps[1] (\"b\") must go to a node that has no app yet, so that every \
             node gets one, but none of them has room: slot 2 has 10 cpu_millis \
             free but 50 is needed"
        );
    }

    #[test]
    fn explicit_slots_are_honoured() {
        let apps = [
            pinned("a", cpu(100), 2),
            pinned("b", cpu(100), 2),
            app("c", cpu(100)),
            app("d", cpu(100)),
            pinned("e", cpu(100), 1),
        ];
        let slots = partition(&apps, &[cpu(1000), cpu(1000)]).unwrap();
        assert_eq!(slots, vec![2, 2, 1, 1, 1]);
    }

    #[test]
    fn equal_apps_on_equal_nodes_are_spread_evenly() {
        let apps: Vec<AppRequest> = (0..6).map(|i| app(&format!("app{i}"), cpu(100))).collect();
        let slots = partition(&apps, &[node(); 3]).unwrap();
        assert_eq!(slots, vec![1, 2, 3, 1, 2, 3]);
        assert_eq!(group_sizes(&slots, 3), vec![2, 2, 2]);
    }

    #[test]
    fn a_bigger_node_gets_proportionally_more_load() {
        let apps: Vec<AppRequest> = (0..6).map(|i| app(&format!("app{i}"), cpu(100))).collect();
        let slots = partition(&apps, &[cpu(2000), cpu(1000)]).unwrap();
        assert_eq!(group_sizes(&slots, 2), vec![4, 2]);
    }

    #[test]
    fn largest_apps_are_placed_first() {
        // Input order would put the small apps first and the big one on top
        // of them; by size, the big app gets a node of its own.
        let apps = [
            app("s1", cpu(100)),
            app("s2", cpu(100)),
            app("s3", cpu(100)),
            app("big", cpu(300)),
        ];
        let slots = partition(&apps, &[cpu(1000), cpu(1000)]).unwrap();
        assert_eq!(slots, vec![2, 2, 2, 1]);
    }

    #[test]
    fn dominant_resource_drives_balance() {
        // Slot 1 uses no CPU but most of its memory, so a CPU-only measure
        // would call it a tie and pick slot 1; by dominant utilisation the
        // CPU app belongs on slot 2.
        let apps = [
            pinned("mem", res(0, 6000, 0, 0), 1),
            pinned("idle", res(0, 0, 0, 0), 2),
            app("cpu", res(2000, 0, 0, 0)),
        ];
        let slots = partition(&apps, &[node(); 2]).unwrap();
        assert_eq!(slots, vec![1, 2, 2]);
    }

    #[test]
    fn memory_heavy_and_cpu_heavy_apps_are_kept_apart() {
        let apps = [
            app("mem", res(100, 6000, 0, 0)),
            app("cpu", res(3000, 100, 0, 0)),
        ];
        let slots = partition(&apps, &[node(); 2]).unwrap();
        assert_ne!(slots[0], slots[1]);
    }

    #[test]
    fn zero_request_apps_are_spread_by_count() {
        let apps: Vec<AppRequest> = (0..5)
            .map(|i| app(&format!("app{i}"), Resources::default()))
            .collect();
        let slots = partition(&apps, &[node(); 2]).unwrap();
        assert_eq!(slots, vec![1, 2, 1, 2, 1]);
    }

    #[test]
    fn every_group_gets_an_app_even_when_greedy_would_skip_a_node() {
        // Slot 1 is so large that the least-utilised choice for every tiny
        // app is slot 1, which would leave slots 2 and 3 empty; the last two
        // apps are therefore sent to the empty slots.
        let apps = [
            app("a", cpu(5)),
            app("b", cpu(5)),
            app("c", cpu(5)),
            app("d", cpu(5)),
        ];
        let slots = partition(&apps, &[cpu(1000), cpu(10), cpu(10)]).unwrap();
        assert_eq!(slots, vec![1, 1, 2, 3]);
    }

    #[test]
    fn zero_requests_fit_on_zero_capacity_nodes() {
        let apps = [app("a", cpu(0)), app("b", cpu(0)), app("c", cpu(0))];
        let slots = partition(&apps, &[Resources::default(); 2]).unwrap();
        assert_eq!(slots, vec![1, 2, 1]);
    }

    #[test]
    fn ties_are_broken_by_name_then_input_index() {
        let apps = [app("b", cpu(100)), app("a", cpu(100)), app("a", cpu(100))];
        let slots = partition(&apps, &[cpu(1000); 3]).unwrap();
        assert_eq!(slots, vec![3, 1, 2]);
    }

    #[test]
    fn ratios_compare_exactly() {
        assert_eq!(Ratio::new(1, 3), Ratio::new(2, 6));
        assert!(Ratio::new(1, 3) < Ratio::new(334, 1000));
        assert!(Ratio::new(u128::MAX - 1, u128::MAX) < Ratio::new(u128::MAX, u128::MAX));
        assert_eq!(Ratio::new(0, 0), Ratio::ZERO);
        assert!(Ratio::new(1, 0) > Ratio::new(u128::MAX, 1));
    }

    /// An amount in `range` that is zero `zero_percent` percent of the time.
    fn amount(range: RangeInclusive<u64>, zero_percent: u32) -> impl Strategy<Value = u64> {
        prop_oneof![zero_percent => Just(0u64), 100 - zero_percent => range]
    }

    /// Random resources with each amount as `amount(range, zero_percent)`.
    fn resources(
        range: RangeInclusive<u64>,
        zero_percent: u32,
    ) -> impl Strategy<Value = Resources> {
        let one = || amount(range.clone(), zero_percent);
        (one(), one(), one(), one()).prop_map(|(c, m, d, n)| res(c, m, d, n))
    }

    /// A random app for a pool of `m` nodes: a short name (so that names
    /// repeat), a request that is zero in a quarter of the resources and, a
    /// quarter of the time, an explicit slot.
    fn random_app(m: usize, max_request: u64) -> impl Strategy<Value = AppRequest> {
        let slot = proptest::option::weighted(0.25, 1..=m as u32);
        let request = resources(0..=max_request, 25);
        ("[a-d]{1,2}", request, slot).prop_map(|(name, request, slot)| AppRequest {
            name,
            request,
            slot,
        })
    }

    /// Random apps and nodes: M in 1..6 nodes and N in M..20 apps. Each
    /// capacity is zero `zero_percent` percent of the time.
    fn random_input(
        capacity: RangeInclusive<u64>,
        zero_percent: u32,
        max_request: u64,
    ) -> impl Strategy<Value = (Vec<AppRequest>, Vec<Resources>)> {
        (1usize..6).prop_flat_map(move |m| {
            let nodes = proptest::collection::vec(resources(capacity.clone(), zero_percent), m);
            let apps = proptest::collection::vec(random_app(m, max_request), m..20);
            (apps, nodes)
        })
    }

    /// Whether the explicit slots leave at least as many free apps as empty
    /// slots (all explicit slots being in range).
    fn counts_allow(apps: &[AppRequest], m: usize) -> bool {
        let free = apps.iter().filter(|a| a.slot.is_none()).count();
        let pinned_slots: BTreeSet<u32> = apps.iter().filter_map(|a| a.slot).collect();
        free >= m - pinned_slots.len()
    }

    /// Checks that `slots` is a valid partition of `apps` onto `nodes`.
    fn check_valid(
        apps: &[AppRequest],
        nodes: &[Resources],
        slots: &[u32],
    ) -> Result<(), TestCaseError> {
        prop_assert_eq!(slots.len(), apps.len());
        let mut used = vec![Resources::default(); nodes.len()];
        for (app, &slot) in apps.iter().zip(slots) {
            prop_assert!(slot >= 1 && slot as usize <= nodes.len());
            if let Some(explicit) = app.slot {
                prop_assert_eq!(slot, explicit);
            }
            for r in Resource::ALL {
                *r.of_mut(&mut used[slot as usize - 1]) += r.of(&app.request);
            }
        }
        for (slot, (used, capacity)) in used.iter().zip(nodes).enumerate() {
            for r in Resource::ALL {
                prop_assert!(
                    r.of(used) <= r.of(capacity),
                    "slot {} over in {}",
                    slot + 1,
                    r
                );
            }
        }
        prop_assert!(group_sizes(slots, nodes.len()).iter().all(|&n| n > 0));
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn ok_results_are_valid_and_deterministic((apps, nodes) in random_input(1000..=12_000, 2, 1500)) {
            let first = partition(&apps, &nodes);
            let second = partition(&apps, &nodes);
            prop_assert_eq!(&first, &second);
            if let Ok(slots) = first {
                check_valid(&apps, &nodes, &slots)?;
            }
        }

        #[test]
        fn zero_requests_never_fail_when_the_counts_allow(
            (apps, nodes) in random_input(0..=10_000, 30, 0)
        ) {
            match partition(&apps, &nodes) {
                Ok(slots) => check_valid(&apps, &nodes, &slots)?,
                Err(err) => {
                    prop_assert!(!counts_allow(&apps, nodes.len()), "unexpected {}", err);
                    let is_count_error = matches!(err, PartitionError::TooFewFreeApps { .. });
                    prop_assert!(is_count_error, "unexpected {}", err);
                }
            }
        }

        #[test]
        fn roomy_nodes_never_fail_when_the_counts_allow(
            (apps, extra) in random_input(0..=10_000, 25, 2000)
        ) {
            // Every node can hold all the apps at once, so any assignment
            // fits and only the explicit slots can make it impossible.
            let total = apps.iter().fold(Resources::default(), |mut sum, app| {
                for r in Resource::ALL {
                    *r.of_mut(&mut sum) += r.of(&app.request);
                }
                sum
            });
            let nodes: Vec<Resources> = extra
                .iter()
                .map(|e| res(total.cpu_millis + e.cpu_millis, total.memory_mb + e.memory_mb,
                    total.disk_mb + e.disk_mb, total.network_mbps + e.network_mbps))
                .collect();
            let result = partition(&apps, &nodes);
            prop_assert_eq!(result.is_ok(), counts_allow(&apps, nodes.len()), "{:?}", result);
            if let Ok(slots) = result {
                check_valid(&apps, &nodes, &slots)?;
            }
        }

        #[test]
        fn input_order_does_not_matter_for_distinct_names(
            (apps, nodes, shuffled) in random_input(1000..=12_000, 2, 1500).prop_flat_map(|(apps, nodes)| {
                let named: Vec<AppRequest> = apps
                    .into_iter()
                    .enumerate()
                    .map(|(i, a)| AppRequest { name: format!("app{i}"), ..a })
                    .collect();
                (Just(named.clone()), Just(nodes), Just(named).prop_shuffle())
            })
        ) {
            let by_name = |apps: &[AppRequest], slots: Vec<u32>| -> BTreeMap<String, u32> {
                apps.iter().map(|a| a.name.clone()).zip(slots).collect()
            };
            let original = partition(&apps, &nodes).map(|s| by_name(&apps, s));
            let permuted = partition(&shuffled, &nodes).map(|s| by_name(&shuffled, s));
            prop_assert_eq!(original.is_ok(), permuted.is_ok());
            if let (Ok(original), Ok(permuted)) = (original, permuted) {
                prop_assert_eq!(original, permuted);
            }
        }

        #[test]
        fn equal_apps_on_equal_nodes_differ_by_at_most_one(
            m in 1usize..6,
            extra in 0usize..30,
            request in resources(0..=100, 25),
        ) {
            let n = m + extra;
            let apps: Vec<AppRequest> = (0..n).map(|i| app(&format!("app{i}"), request)).collect();
            let capacity = res(100 * n as u64, 100 * n as u64, 100 * n as u64, 100 * n as u64);
            let slots = partition(&apps, &vec![capacity; m]).map_err(|e| TestCaseError::fail(e.to_string()))?;
            check_valid(&apps, &vec![capacity; m], &slots)?;
            let sizes = group_sizes(&slots, m);
            let (min, max) = (sizes.iter().min(), sizes.iter().max());
            prop_assert!(max.zip(min).is_some_and(|(max, min)| max - min <= 1), "{:?}", sizes);
        }

        #[test]
        fn fraction_comparison_matches_cross_multiplication(
            an in 0u64.., ad in 1u64.., bn in 0u64.., bd in 1u64..
        ) {
            let expected = (u128::from(an) * u128::from(bd)).cmp(&(u128::from(bn) * u128::from(ad)));
            let actual = cmp_fractions(an.into(), ad.into(), bn.into(), bd.into());
            prop_assert_eq!(actual, expected);
        }
    }
}
