//! The threshold scheduler (claims 4-6): pure logic that the agent calls on
//! every telemetry sample to decide whether, what and where to offload.
//!
//! **Resources needed to run group i.** For each resource `r` (compute as
//! CPU milli-cores, memory, storage as disk space and disk I/O rate,
//! network):
//!
//! ```text
//! need_i[r] = Σ_{a in group i} usage_a[r] + reserve_i[r]
//! util_i[r] = need_i[r] / capacity_i[r]      (0 if both are 0, ∞ if only capacity is 0)
//! ```
//!
//! where `usage_a` is app `a`'s measured usage and `reserve_i` is what node
//! i keeps for itself (agent, operating system).
//!
//! **Trigger rule.** Node i fires a trigger for resource `r` at sample time
//! `t_k` iff `util_i[r] > high[r]` in every sample from some sample time
//! `t_s` up to and including `t_k`, with `t_k - t_s >= sustain_ms` (the
//! sample that completes the window fires), and the node is not cooling
//! down, that is `t_k >= t_offload + cooldown_ms` for the last offload. A
//! sample with `util_i[r] <= high[r]` (or not a number) resets the window of
//! `r`; an offload resets every window. When several resources qualify, the
//! one with the highest utilisation wins (ties: compute, memory, disk,
//! network, disk I/O, in that order).
//!
//! **Plan.** The trigger moves the node's offloadable, non-cooling apps,
//! lowest priority first and larger usage of `r` first, until
//! `need_i[r] - moved <= low[r] * capacity_i[r]`. Peer j accepts a set of
//! apps only if `need_j + Σ usage <= high * capacity_j` holds afterwards in
//! every resource (see [`admits`]). The target is one peer
//! ([`Target::Single`]) or the peers together ([`Target::Spread`]).

use std::collections::BTreeSet;

/// The five resources, in the index order used by [`Amounts`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    Cpu,
    Memory,
    Disk,
    Network,
    DiskIo,
}

impl Resource {
    /// Every resource, in index order.
    pub const ALL: [Resource; 5] = [
        Resource::Cpu,
        Resource::Memory,
        Resource::Disk,
        Resource::Network,
        Resource::DiskIo,
    ];

    /// The position of this resource in [`Amounts`] and in per-resource arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether the resource is evaluated on a node with this capacity. Disk
    /// I/O capacity is not detected, only configured: 0 means unknown, and an
    /// unknown disk I/O capacity is not evaluated (utilisation 0, admits any
    /// usage). Every other resource is always evaluated.
    pub fn evaluated(self, capacity: u64) -> bool {
        capacity > 0 || self != Resource::DiskIo
    }

    /// The lower-case name used in logs and events.
    pub fn name(self) -> &'static str {
        match self {
            Resource::Cpu => "cpu",
            Resource::Memory => "memory",
            Resource::Disk => "disk",
            Resource::Network => "network",
            Resource::DiskIo => "disk_io",
        }
    }
}

/// Amounts per resource: CPU milli-cores, memory MB, disk MB, network
/// throughput, disk I/O rate (read + write). Units only have to be
/// consistent per index.
pub type Amounts = [u64; 5];

/// The two utilisation thresholds of one resource, as fractions of capacity.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Watermarks {
    /// Utilisation above which the resource counts as overloaded.
    pub high: f64,
    /// Utilisation an offload aims to bring the resource down to.
    pub low: f64,
}

/// Where offloaded apps go (claim 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// All moved apps go to one peer.
    Single,
    /// Moved apps are spread over the peers.
    Spread,
}

/// The scheduling policy pushed by the manager.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Watermarks per resource, in [`Resource`] index order.
    pub marks: [Watermarks; 5],
    /// How long a resource must stay above its high watermark to trigger.
    pub sustain_ms: u64,
    /// Quiet time after an offload, for the node and for each moved app.
    pub cooldown_ms: u64,
    /// Where moved apps go.
    pub target: Target,
}

/// Why a policy cannot be enforced.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PolicyError {
    /// The watermarks of a resource are not finite or not ordered.
    #[error("{resource} watermarks must be finite with 0 <= low <= high (low {low}, high {high})")]
    Marks {
        resource: &'static str,
        low: f64,
        high: f64,
    },
}

impl Policy {
    /// Checks that every resource has finite watermarks with `0 <= low <= high`.
    pub fn validate(&self) -> Result<(), PolicyError> {
        for r in Resource::ALL {
            let m = self.marks[r.index()];
            let ordered = 0.0 <= m.low && m.low <= m.high;
            if !(ordered && m.high.is_finite()) {
                return Err(PolicyError::Marks {
                    resource: r.name(),
                    low: m.low,
                    high: m.high,
                });
            }
        }
        Ok(())
    }
}

/// The resources needed to run a group: the sum of its apps' measured usage
/// plus the node's own `reserve`, per resource (saturating).
pub fn need(app_usage: &[Amounts], reserve: Amounts) -> Amounts {
    app_usage.iter().fold(reserve, |acc, u| add(acc, *u))
}

/// Utilisation per resource, `need / capacity`. A zero capacity gives 0 when
/// the need is 0 too and infinity otherwise, except for a resource that is
/// not [evaluated](Resource::evaluated) (disk I/O of unknown capacity): 0.
pub fn utilisation(need: Amounts, capacity: Amounts) -> [f64; 5] {
    std::array::from_fn(|i| match (need[i], capacity[i]) {
        (0, 0) => 0.0,
        (_, 0) if !Resource::ALL[i].evaluated(0) => 0.0,
        (_, 0) => f64::INFINITY,
        (n, c) => n as f64 / c as f64,
    })
}

/// Admission on the receiving peer: true iff `need + usage <= high *
/// capacity` for every resource. A resource with capacity 0 admits only zero
/// usage of that resource, unless it is not
/// [evaluated](Resource::evaluated) (disk I/O of unknown capacity): then it
/// admits any usage.
pub fn admits(need: Amounts, capacity: Amounts, marks: &[Watermarks; 5], usage: Amounts) -> bool {
    over_high(need, capacity, marks, usage).is_none()
}

/// The first resource (in index order) in which `need + usage` would cross
/// the high watermark, as [`admits`] decides it.
pub fn over_high(
    need: Amounts,
    capacity: Amounts,
    marks: &[Watermarks; 5],
    usage: Amounts,
) -> Option<Resource> {
    Resource::ALL.into_iter().find(|r| {
        let i = r.index();
        if !r.evaluated(capacity[i]) {
            return false;
        }
        if capacity[i] == 0 {
            return usage[i] != 0;
        }
        need[i].saturating_add(usage[i]) as f64 > marks[i].high * capacity[i] as f64
    })
}

/// Capacity a peer holds back for one guest it admitted and has not
/// measured at its declared usage yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// The usage the owner declared in its offer.
    pub declared: Amounts,
    /// What the peer measured for the guest in its last sample (0 before
    /// the first one).
    pub measured: Amounts,
    /// When the guest was admitted.
    pub admitted_at_ms: u64,
}

/// What admission adds to a peer's measured need for guests admitted less
/// than `window_ms` before `now_ms`: per resource, the part of each guest's
/// declared usage its measurement does not show yet
/// (`max(0, declared - measured)`), summed. Admitting against `need +
/// reserved` and recording the new guest in the same critical section keeps
/// concurrent offers from crossing the high watermark together: the second
/// offer sees the first one's reservation although no sample has measured
/// it yet.
pub fn reserved(guests: &[Reservation], now_ms: u64, window_ms: u64) -> Amounts {
    guests
        .iter()
        .filter(|g| now_ms < g.admitted_at_ms.saturating_add(window_ms))
        .fold([0; 5], |acc, g| {
            add(
                acc,
                std::array::from_fn(|i| g.declared[i].saturating_sub(g.measured[i])),
            )
        })
}

/// Adds two amounts per resource, saturating.
pub fn add(a: Amounts, b: Amounts) -> Amounts {
    std::array::from_fn(|i| a[i].saturating_add(b[i]))
}

/// A decision to offload because `resource` stayed above its high watermark.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Trigger {
    /// The overloaded resource.
    pub resource: Resource,
    /// Its utilisation in the firing sample.
    pub utilisation: f64,
    /// When the sustain window ended (the firing sample's time).
    pub at_ms: u64,
}

/// Tracks how long each resource has been above its high watermark, and
/// the node cooldown after an offload.
#[derive(Clone, Debug, Default)]
pub struct Evaluator {
    /// Time of the first sample of the current run above high, per resource.
    above_since: [Option<u64>; 5],
    /// Time of the last offload.
    last_offload_ms: Option<u64>,
}

impl Evaluator {
    /// An evaluator with no history and no cooldown.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one sample taken at `now_ms`. Returns a trigger when some
    /// resource's utilisation has been above its high watermark in every
    /// sample for at least `policy.sustain_ms` and the node is not within
    /// `policy.cooldown_ms` of the last [`Evaluator::offloaded`]. Windows keep
    /// being tracked during the cooldown. The trigger repeats on each later
    /// sample while the condition holds and no offload is reported.
    pub fn observe(&mut self, now_ms: u64, util: [f64; 5], policy: &Policy) -> Option<Trigger> {
        self.track(now_ms, util, policy);
        if self.cooling(now_ms, policy.cooldown_ms) {
            return None;
        }
        self.sustained(now_ms, util, policy.sustain_ms)
    }

    /// Reports an offload at `now_ms`: starts the node cooldown and resets
    /// every window.
    pub fn offloaded(&mut self, now_ms: u64) {
        self.last_offload_ms = Some(now_ms);
        self.above_since = [None; 5];
    }

    /// Whether the node is still cooling down at `now_ms`.
    pub fn cooling(&self, now_ms: u64, cooldown_ms: u64) -> bool {
        self.last_offload_ms
            .is_some_and(|t| now_ms < t.saturating_add(cooldown_ms))
    }

    /// Opens or keeps the window of each resource above high, and resets the
    /// others.
    fn track(&mut self, now_ms: u64, util: [f64; 5], policy: &Policy) {
        for (i, since) in self.above_since.iter_mut().enumerate() {
            if util[i] > policy.marks[i].high {
                since.get_or_insert(now_ms);
            } else {
                *since = None;
            }
        }
    }

    /// The resource whose window reached `sustain_ms` with the highest
    /// utilisation, lower index first on ties.
    fn sustained(&self, now_ms: u64, util: [f64; 5], sustain_ms: u64) -> Option<Trigger> {
        let mut best: Option<Trigger> = None;
        for r in Resource::ALL {
            let Some(since) = self.above_since[r.index()] else {
                continue;
            };
            let u = util[r.index()];
            if now_ms.saturating_sub(since) >= sustain_ms && best.is_none_or(|b| u > b.utilisation)
            {
                best = Some(Trigger {
                    resource: r,
                    utilisation: u,
                    at_ms: now_ms,
                });
            }
        }
        best
    }
}

/// One of the node's own apps, as a candidate for moving.
#[derive(Clone, Debug, PartialEq)]
pub struct AppLoad {
    pub name: String,
    /// Measured usage.
    pub usage: Amounts,
    /// Lower priorities move first.
    pub priority: i32,
    /// Whether the app may leave this node at all.
    pub offloadable: bool,
    /// When it last moved (for the per-app cooldown), if ever.
    pub moved_at_ms: Option<u64>,
}

/// What a peer reported in its last probe.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerLoad {
    /// The peer's slot in the pool.
    pub slot: u32,
    pub capacity: Amounts,
    /// The resources needed to run the peer's own group.
    pub need: Amounts,
    /// The peer's watermarks (it runs the same policy).
    pub marks: [Watermarks; 5],
}

impl PeerLoad {
    /// Room left below the high watermark of `r`: `high * capacity - need`.
    pub fn headroom(&self, r: usize) -> f64 {
        self.marks[r].high * self.capacity[r] as f64 - self.need[r] as f64
    }
}

/// One planned move: `app` goes to the peer in slot `to_slot`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    pub app: String,
    pub to_slot: u32,
}

/// Picks which apps to move and where, for a trigger on `resource`.
///
/// Candidates are the offloadable apps with some usage of `resource` that
/// did not move within `policy.cooldown_ms` of `now_ms` (the first app of a
/// name wins). They are taken lowest priority first, larger usage first
/// within a priority (then by name), and the plan stops as soon as
/// `need - moved <= low * capacity` for `resource`. An app that fits no
/// eligible peer is skipped and the next candidate is tried, so some load
/// moves even when the goal cannot be reached. No peer ever ends above its
/// high watermark in any resource (see [`admits`]).
///
/// With [`Target::Single`], every move goes to one peer: the peer with the
/// most headroom in `resource` (ties: lower slot) that admits all the apps
/// the goal calls for; when no peer admits them all, the peer onto which
/// the most of `resource` can move. With [`Target::Spread`], each app goes
/// to the peer with the most remaining headroom in `resource` after the
/// moves already planned (ties: lower slot). The plan is empty when nothing
/// can move.
pub fn plan(
    resource: Resource,
    need: Amounts,
    capacity: Amounts,
    apps: &[AppLoad],
    peers: &[PeerLoad],
    policy: &Policy,
    now_ms: u64,
) -> Vec<Move> {
    let r = resource.index();
    let goal = Goal {
        need: need[r],
        limit: policy.marks[r].low * capacity[r] as f64,
    };
    let cands = candidates(apps, r, policy.cooldown_ms, now_ms);
    match policy.target {
        Target::Single => plan_single(r, goal, &cands, peers),
        Target::Spread => plan_spread(r, goal, &cands, peers),
    }
}

/// The level an offload aims for on the triggering resource.
#[derive(Clone, Copy, Debug)]
struct Goal {
    need: u64,
    limit: f64,
}

impl Goal {
    /// Whether moving `moved` units of the resource reaches the low mark.
    fn reached(self, moved: u64) -> bool {
        self.need.saturating_sub(moved) as f64 <= self.limit
    }
}

/// The movable apps in the order they should move.
fn candidates(apps: &[AppLoad], r: usize, cooldown_ms: u64, now_ms: u64) -> Vec<&AppLoad> {
    let mut seen = BTreeSet::new();
    let mut out: Vec<&AppLoad> = apps
        .iter()
        .filter(|a| a.offloadable && a.usage[r] > 0)
        .filter(|a| {
            a.moved_at_ms
                .is_none_or(|t| now_ms >= t.saturating_add(cooldown_ms))
        })
        .filter(|a| seen.insert(a.name.as_str()))
        .collect();
    out.sort_by(|a, b| {
        a.priority
            .cmp(&b.priority)
            .then(b.usage[r].cmp(&a.usage[r]))
            .then(a.name.cmp(&b.name))
    });
    out
}

/// Walks the candidates in order until the goal is reached, asking `place`
/// for a slot for each; apps without a slot are skipped. Returns the moves
/// and the amount of the resource they move.
fn fill(
    cands: &[&AppLoad],
    r: usize,
    goal: Goal,
    mut place: impl FnMut(&AppLoad) -> Option<u32>,
) -> (Vec<Move>, u64) {
    let mut moves = Vec::new();
    let mut moved = 0u64;
    for app in cands {
        if goal.reached(moved) {
            break;
        }
        if let Some(to_slot) = place(app) {
            moved = moved.saturating_add(app.usage[r]);
            moves.push(Move {
                app: app.name.clone(),
                to_slot,
            });
        }
    }
    (moves, moved)
}

/// The peers by decreasing headroom in `r`, lower slot first on ties.
fn by_headroom(peers: &[PeerLoad], r: usize) -> Vec<&PeerLoad> {
    let mut order: Vec<&PeerLoad> = peers.iter().collect();
    order.sort_by(|a, b| {
        b.headroom(r)
            .total_cmp(&a.headroom(r))
            .then(a.slot.cmp(&b.slot))
    });
    order
}

/// The usage of the apps the goal calls for, ignoring where they could go.
fn wanted_usage(cands: &[&AppLoad], r: usize, goal: Goal) -> Amounts {
    let (_, total) = cands.iter().fold(([0; 5], [0; 5]), |(moved, total), a| {
        if goal.reached(moved[r]) {
            (moved, total)
        } else {
            (add(moved, a.usage), add(total, a.usage))
        }
    });
    total
}

/// Fills one peer with as many candidates as fit, in order.
fn fill_one(cands: &[&AppLoad], r: usize, goal: Goal, peer: &PeerLoad) -> (Vec<Move>, u64) {
    let mut load = peer.need;
    fill(cands, r, goal, |app| {
        admits(load, peer.capacity, &peer.marks, app.usage).then(|| {
            load = add(load, app.usage);
            peer.slot
        })
    })
}

/// [`Target::Single`]: everything goes to one peer.
fn plan_single(r: usize, goal: Goal, cands: &[&AppLoad], peers: &[PeerLoad]) -> Vec<Move> {
    let order = by_headroom(peers, r);
    let wanted = wanted_usage(cands, r, goal);
    if let Some(peer) = order
        .iter()
        .find(|p| admits(p.need, p.capacity, &p.marks, wanted))
    {
        return fill_one(cands, r, goal, peer).0;
    }
    let mut best: (Vec<Move>, u64) = (Vec::new(), 0);
    for peer in order {
        let attempt = fill_one(cands, r, goal, peer);
        if attempt.1 > best.1 {
            best = attempt;
        }
    }
    best.0
}

/// [`Target::Spread`]: each app goes to the peer with the most headroom left.
fn plan_spread(r: usize, goal: Goal, cands: &[&AppLoad], peers: &[PeerLoad]) -> Vec<Move> {
    let mut loads: Vec<PeerLoad> = peers.to_vec();
    fill(cands, r, goal, |app| {
        let peer = loads
            .iter_mut()
            .filter(|p| admits(p.need, p.capacity, &p.marks, app.usage))
            .max_by(|a, b| {
                a.headroom(r)
                    .total_cmp(&b.headroom(r))
                    .then(b.slot.cmp(&a.slot))
            })?;
        peer.need = add(peer.need, app.usage);
        Some(peer.slot)
    })
    .0
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: Watermarks = Watermarks {
        high: 0.8,
        low: 0.5,
    };

    fn policy(target: Target) -> Policy {
        Policy {
            marks: [M; 5],
            sustain_ms: 2_000,
            cooldown_ms: 10_000,
            target,
        }
    }

    fn cpu(u: f64) -> [f64; 5] {
        [u, 0.1, 0.1, 0.1, 0.0]
    }

    fn app(name: &str, usage: Amounts, priority: i32) -> AppLoad {
        AppLoad {
            name: name.into(),
            usage,
            priority,
            offloadable: true,
            moved_at_ms: None,
        }
    }

    fn peer(slot: u32, capacity: Amounts, need: Amounts) -> PeerLoad {
        PeerLoad {
            slot,
            capacity,
            need,
            marks: [M; 5],
        }
    }

    fn names(plan: &[Move]) -> Vec<(&str, u32)> {
        plan.iter().map(|m| (m.app.as_str(), m.to_slot)).collect()
    }

    /// Feeds `(time, cpu utilisation)` samples and returns the firing times.
    fn fires(ev: &mut Evaluator, series: &[(u64, f64)], p: &Policy) -> Vec<u64> {
        series
            .iter()
            .filter_map(|&(t, u)| ev.observe(t, cpu(u), p).map(|tr| tr.at_ms))
            .collect()
    }

    #[test]
    fn resource_names_and_indices() {
        let names: Vec<_> = Resource::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names, ["cpu", "memory", "disk", "network", "disk_io"]);
        for (i, r) in Resource::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }

    #[test]
    fn need_sums_apps_and_reserve() {
        let n = need(&[[100, 10, 1, 0, 0], [200, 20, 2, 5, 0]], [50, 5, 0, 1, 0]);
        assert_eq!(n, [350, 35, 3, 6, 0]);
        assert_eq!(need(&[], [1, 2, 3, 4, 0]), [1, 2, 3, 4, 0]);
        assert_eq!(
            need(&[[u64::MAX, 0, 0, 0, 0]], [1, 0, 0, 0, 0])[0],
            u64::MAX
        );
    }

    #[test]
    fn reservations_cover_what_is_not_measured_yet() {
        let fresh = Reservation {
            declared: [300, 100, 0, 0, 0],
            measured: [120, 200, 0, 0, 0],
            admitted_at_ms: 1_000,
        };
        let old = Reservation {
            declared: [500; 5],
            measured: [0; 5],
            admitted_at_ms: 0,
        };
        // Only the unmeasured part of a recent guest counts.
        assert_eq!(reserved(&[fresh, old], 2_000, 1_500), [180, 0, 0, 0, 0]);
        // Past the window the measurement alone speaks.
        assert_eq!(reserved(&[fresh], 2_500, 1_500), [0; 5]);
        assert_eq!(reserved(&[], 0, 1_000), [0; 5]);
    }

    #[test]
    fn admitting_against_reservations_never_crosses_high() {
        // Offers arrive faster than samples: each admission sees the
        // earlier guests only through their reservations.
        let mut rng = Rng(99);
        let marks = policy(Target::Single).marks;
        for _ in 0..500 {
            let capacity = rng.amounts(4_000, 0).map(|c| c + 1);
            let need = capacity.map(|c| rng.below(c / 2 + 1));
            let mut guests: Vec<Reservation> = Vec::new();
            for k in 0..rng.below(10) {
                let usage = rng.amounts(1_500, 30);
                let total = add(need, reserved(&guests, k, 10_000));
                if admits(total, capacity, &marks, usage) {
                    guests.push(Reservation {
                        declared: usage,
                        measured: [0; 5],
                        admitted_at_ms: k,
                    });
                }
            }
            let total = guests.iter().fold(need, |acc, g| add(acc, g.declared));
            for (i, m) in marks.iter().enumerate() {
                assert!(
                    guests.is_empty() || total[i] as f64 <= m.high * capacity[i] as f64,
                    "resource {i}: {} > {} * {}",
                    total[i],
                    m.high,
                    capacity[i]
                );
            }
        }
    }

    #[test]
    fn utilisation_handles_zero_capacity() {
        let u = utilisation([500, 0, 7, 0, 0], [1000, 0, 0, 10, 0]);
        assert_eq!(u, [0.5, 0.0, f64::INFINITY, 0.0, 0.0]);
        // Disk I/O of unknown capacity is not evaluated.
        let u = utilisation([0, 0, 0, 0, 500], [1, 1, 1, 1, 0]);
        assert_eq!(u[Resource::DiskIo.index()], 0.0);
        assert!(Resource::Cpu.evaluated(0) && !Resource::DiskIo.evaluated(0));
    }

    #[test]
    fn policy_validation() {
        assert_eq!(policy(Target::Single).validate(), Ok(()));
        let mut p = policy(Target::Single);
        p.marks[2] = Watermarks {
            high: 0.5,
            low: 0.6,
        };
        assert!(matches!(
            p.validate(),
            Err(PolicyError::Marks {
                resource: "disk",
                ..
            })
        ));
        p.marks[2] = Watermarks {
            high: f64::NAN,
            low: 0.1,
        };
        assert!(p.validate().is_err());
    }

    #[test]
    fn recorded_series_fires_when_window_is_reached() {
        let p = policy(Target::Single);
        let series = [
            (0, 0.5),
            (1_000, 0.9),
            (2_000, 0.9),
            (3_000, 0.9),
            (4_000, 0.95),
        ];
        let mut ev = Evaluator::new();
        let got: Vec<_> = series
            .iter()
            .map(|&(t, u)| ev.observe(t, cpu(u), &p))
            .collect();
        assert_eq!(got[..3], [None, None, None]);
        let first = got[3].expect("fires at 3 s");
        assert_eq!(first.resource, Resource::Cpu);
        assert_eq!(first.at_ms, 3_000);
        assert_eq!(first.utilisation, 0.9);
        assert_eq!(got[4].map(|t| t.at_ms), Some(4_000));
    }

    #[test]
    fn a_dip_resets_the_window() {
        let p = policy(Target::Single);
        let series = [
            (0, 0.9),
            (1_000, 0.9),
            (2_000, 0.8),
            (3_000, 0.9),
            (4_000, 0.9),
            (5_000, 0.9),
        ];
        assert_eq!(fires(&mut Evaluator::new(), &series, &p), [5_000]);
    }

    #[test]
    fn zero_sustain_fires_on_the_first_sample_above_high() {
        let mut p = policy(Target::Single);
        p.sustain_ms = 0;
        let series = [(0, 0.8), (1_000, 0.81)];
        assert_eq!(fires(&mut Evaluator::new(), &series, &p), [1_000]);
    }

    #[test]
    fn cooldown_suppresses_triggers_after_an_offload() {
        let p = policy(Target::Single);
        let mut ev = Evaluator::new();
        assert_eq!(fires(&mut ev, &[(0, 0.9), (2_000, 0.9)], &p), [2_000]);
        ev.offloaded(2_000);
        assert!(ev.cooling(11_999, p.cooldown_ms));
        let during: Vec<_> = (3..12).map(|s| (s * 1_000, 0.99)).collect();
        assert!(fires(&mut ev, &during, &p).is_empty());
        // The window kept running from 3 s, so the first sample after the
        // cooldown fires.
        assert!(!ev.cooling(12_000, p.cooldown_ms));
        assert_eq!(fires(&mut ev, &[(12_000, 0.99)], &p), [12_000]);
    }

    #[test]
    fn offload_resets_windows() {
        let mut p = policy(Target::Single);
        p.cooldown_ms = 0;
        let mut ev = Evaluator::new();
        assert!(fires(&mut ev, &[(0, 0.9), (1_000, 0.9)], &p).is_empty());
        ev.offloaded(1_500);
        let after = [(2_000, 0.9), (3_000, 0.9), (4_000, 0.9)];
        assert_eq!(fires(&mut ev, &after, &p), [4_000]);
    }

    #[test]
    fn highest_utilisation_wins_with_ties_to_lower_index() {
        let mut p = policy(Target::Single);
        p.sustain_ms = 0;
        let mut ev = Evaluator::new();
        let t = ev
            .observe(0, [0.85, 0.95, 0.9, 0.1, 0.0], &p)
            .map(|t| t.resource);
        assert_eq!(t, Some(Resource::Memory));
        let t = ev
            .observe(1, [0.1, 0.9, 0.9, 0.9, 0.0], &p)
            .map(|t| t.resource);
        assert_eq!(t, Some(Resource::Memory));
        let t = ev
            .observe(2, [0.1, 0.1, 0.9, 0.9, 0.0], &p)
            .map(|t| t.resource);
        assert_eq!(t, Some(Resource::Disk));
    }

    #[test]
    fn disk_io_triggers_and_plans_like_the_others() {
        let p = policy(Target::Single);
        let capacity = [1000, 1000, 1000, 1000, 4096];
        let apps = [
            app("writer", [10, 10, 10, 0, 3000], 0),
            app("quiet", [10, 10, 10, 0, 0], 0),
        ];
        let need = need(&[apps[0].usage, apps[1].usage], [0, 0, 0, 0, 600]);
        let util = utilisation(need, capacity);
        let mut ev = Evaluator::new();
        assert!(ev.observe(0, util, &p).is_none());
        let t = ev.observe(2_000, util, &p).expect("fires after the window");
        assert_eq!(t.resource, Resource::DiskIo);
        assert_eq!(t.resource.name(), "disk_io");
        assert_eq!(t.utilisation, 3600.0 / 4096.0);
        let peers = [peer(1, capacity, [0; 5])];
        let moves = plan(t.resource, need, capacity, &apps, &peers, &p, 2_000);
        assert_eq!(names(&moves), [("writer", 1)]);
        // A node of unknown disk I/O capacity never triggers on it, and
        // admits an app whatever its disk I/O.
        let blind = [1000, 1000, 1000, 1000, 0];
        let util = utilisation(need, blind);
        let mut ev = Evaluator::new();
        assert!(ev.observe(0, util, &p).is_none());
        assert!(ev.observe(5_000, util, &p).is_none());
        let peers = [peer(2, blind, [0; 5])];
        let moves = plan(t.resource, need, capacity, &apps, &peers, &p, 2_000);
        assert_eq!(names(&moves), [("writer", 2)]);
    }

    #[test]
    fn only_sustained_resources_qualify() {
        let mut p = policy(Target::Single);
        p.sustain_ms = 1_000;
        let mut ev = Evaluator::new();
        assert!(ev.observe(0, [0.9, 0.1, 0.1, 0.1, 0.0], &p).is_none());
        let t = ev.observe(1_000, [0.85, 0.99, 0.1, 0.1, 0.0], &p);
        assert_eq!(t.map(|t| t.resource), Some(Resource::Cpu));
    }

    #[test]
    fn infinite_utilisation_is_above_high_and_nan_is_not() {
        let mut p = policy(Target::Single);
        p.sustain_ms = 0;
        let mut ev = Evaluator::new();
        let t = ev.observe(0, [f64::NAN, f64::INFINITY, 0.0, 0.0, 0.0], &p);
        assert_eq!(t.map(|t| t.resource), Some(Resource::Memory));
    }

    #[test]
    fn admits_checks_every_resource() {
        let cap = [1000; 5];
        assert!(admits([700, 0, 0, 0, 0], cap, &[M; 5], [100, 0, 0, 0, 0]));
        assert!(!admits([700, 0, 0, 0, 0], cap, &[M; 5], [101, 0, 0, 0, 0]));
        // Already above high in memory: nothing more is admitted.
        assert!(!admits([0, 900, 0, 0, 0], cap, &[M; 5], [1, 0, 0, 0, 0]));
        assert!(admits(
            [0, 0, 0, 0, 0],
            [1000, 1000, 0, 1000, 0],
            &[M; 5],
            [1, 1, 0, 1, 0]
        ));
        assert!(!admits(
            [0, 0, 0, 0, 0],
            [1000, 1000, 0, 1000, 0],
            &[M; 5],
            [1, 1, 1, 1, 0]
        ));
        // Unknown disk I/O capacity admits any disk I/O; a known one is
        // checked like the others.
        assert!(admits(
            [0; 5],
            [1000, 1000, 1000, 1000, 0],
            &[M; 5],
            [1, 1, 1, 1, 9999]
        ));
        assert_eq!(
            over_high([0; 5], [1000; 5], &[M; 5], [1, 1, 1, 1, 801]),
            Some(Resource::DiskIo)
        );
    }

    #[test]
    fn plan_takes_lowest_priority_then_largest_first() {
        let apps = [
            app("important", [400, 1, 1, 1, 0], 5),
            app("small", [100, 1, 1, 1, 0], 0),
            app("big", [300, 1, 1, 1, 0], 0),
            app("mid", [200, 1, 1, 1, 0], 1),
        ];
        let peers = [peer(2, [4000; 5], [0; 5])];
        // need 900 of 1000, low 500: 400 must move; big (300) + small (100).
        let p = plan(
            Resource::Cpu,
            [900, 0, 0, 0, 0],
            [1000; 5],
            &apps,
            &peers,
            &policy(Target::Single),
            0,
        );
        assert_eq!(names(&p), [("big", 2), ("small", 2)]);
        // 450 must move: the mid app is next.
        let p = plan(
            Resource::Cpu,
            [950, 0, 0, 0, 0],
            [1000; 5],
            &apps,
            &peers,
            &policy(Target::Single),
            0,
        );
        assert_eq!(names(&p), [("big", 2), ("small", 2), ("mid", 2)]);
    }

    #[test]
    fn plan_uses_fewest_moves_within_a_priority() {
        let apps = [
            app("a", [100, 0, 0, 0, 0], 0),
            app("b", [100, 0, 0, 0, 0], 0),
            app("c", [350, 0, 0, 0, 0], 0),
        ];
        let peers = [peer(1, [4000; 5], [0; 5])];
        let p = plan(
            Resource::Cpu,
            [850, 0, 0, 0, 0],
            [1000; 5],
            &apps,
            &peers,
            &policy(Target::Spread),
            0,
        );
        assert_eq!(names(&p), [("c", 1)]);
    }

    #[test]
    fn plan_respects_cooldown_and_offloadable() {
        let mut pinned = app("pinned", [500, 0, 0, 0, 0], 0);
        pinned.offloadable = false;
        let mut recent = app("recent", [500, 0, 0, 0, 0], 0);
        recent.moved_at_ms = Some(95_000);
        let mut old = app("old", [100, 0, 0, 0, 0], 1);
        old.moved_at_ms = Some(90_000);
        let apps = [pinned, recent, old, app("idle", [0, 10, 0, 0, 0], 0)];
        let peers = [peer(1, [4000; 5], [0; 5])];
        let p = plan(
            Resource::Cpu,
            [900, 0, 0, 0, 0],
            [1000; 5],
            &apps,
            &peers,
            &policy(Target::Single),
            100_000,
        );
        assert_eq!(names(&p), [("old", 1)]);
    }

    #[test]
    fn plan_is_empty_when_already_at_low() {
        let apps = [app("a", [100, 0, 0, 0, 0], 0)];
        let peers = [peer(1, [4000; 5], [0; 5])];
        let p = plan(
            Resource::Cpu,
            [500, 0, 0, 0, 0],
            [1000; 5],
            &apps,
            &peers,
            &policy(Target::Single),
            0,
        );
        assert!(p.is_empty());
    }

    #[test]
    fn single_picks_the_peer_with_most_headroom() {
        let apps = [
            app("a", [200, 10, 0, 0, 0], 0),
            app("b", [200, 10, 0, 0, 0], 0),
        ];
        let peers = [
            peer(1, [1000; 5], [500, 0, 0, 0, 0]),
            peer(2, [1000; 5], [100, 0, 0, 0, 0]),
            peer(3, [1000; 5], [100, 0, 0, 0, 0]),
        ];
        let p = plan(
            Resource::Cpu,
            [900, 0, 0, 0, 0],
            [1000; 5],
            &apps,
            &peers,
            &policy(Target::Single),
            0,
        );
        assert_eq!(names(&p), [("a", 2), ("b", 2)]);
    }

    #[test]
    fn single_skips_a_peer_that_would_exceed_another_resource() {
        let apps = [
            app("a", [200, 300, 0, 0, 0], 0),
            app("b", [200, 300, 0, 0, 0], 0),
        ];
        let peers = [
            peer(1, [1000; 5], [0, 500, 0, 0, 0]),
            peer(2, [1000; 5], [300, 0, 0, 0, 0]),
        ];
        let p = plan(
            Resource::Cpu,
            [900, 0, 0, 0, 0],
            [1000; 5],
            &apps,
            &peers,
            &policy(Target::Single),
            0,
        );
        assert_eq!(names(&p), [("a", 2), ("b", 2)]);
    }

    #[test]
    fn single_drops_what_does_not_fit_and_never_exceeds_high() {
        let apps = [
            app("a", [300, 0, 0, 0, 0], 0),
            app("b", [300, 0, 0, 0, 0], 0),
        ];
        let peers = [
            peer(1, [1000; 5], [400, 0, 0, 0, 0]),
            peer(2, [1000; 5], [450, 0, 0, 0, 0]),
        ];
        // Neither peer takes both (400 + 600 > 800); slot 1 takes one.
        let p = plan(
            Resource::Cpu,
            [1000, 0, 0, 0, 0],
            [1000; 5],
            &apps,
            &peers,
            &policy(Target::Single),
            0,
        );
        assert_eq!(names(&p), [("a", 1)]);
    }

    #[test]
    fn spread_uses_both_peers_when_one_cannot_take_everything() {
        let apps = [
            app("a", [300, 0, 0, 0, 0], 0),
            app("b", [300, 0, 0, 0, 0], 0),
        ];
        let peers = [
            peer(1, [1000; 5], [400, 0, 0, 0, 0]),
            peer(2, [1000; 5], [450, 0, 0, 0, 0]),
        ];
        let p = plan(
            Resource::Cpu,
            [1000, 0, 0, 0, 0],
            [1000; 5],
            &apps,
            &peers,
            &policy(Target::Spread),
            0,
        );
        assert_eq!(names(&p), [("a", 1), ("b", 2)]);
    }

    #[test]
    fn spread_balances_equal_headroom() {
        let apps = [
            app("a", [100, 0, 0, 0, 0], 0),
            app("b", [100, 0, 0, 0, 0], 0),
            app("c", [100, 0, 0, 0, 0], 0),
            app("d", [100, 0, 0, 0, 0], 0),
        ];
        let peers = [peer(7, [1000; 5], [0; 5]), peer(3, [1000; 5], [0; 5])];
        let p = plan(
            Resource::Cpu,
            [900, 0, 0, 0, 0],
            [1000; 5],
            &apps,
            &peers,
            &policy(Target::Spread),
            0,
        );
        assert_eq!(names(&p), [("a", 3), ("b", 7), ("c", 3), ("d", 7)]);
    }

    #[test]
    fn moves_some_load_when_the_goal_is_out_of_reach() {
        let apps = [
            app("huge", [900, 0, 0, 0, 0], 0),
            app("a", [100, 0, 0, 0, 0], 1),
        ];
        let peers = [peer(1, [1000; 5], [500, 0, 0, 0, 0])];
        for target in [Target::Single, Target::Spread] {
            let p = plan(
                Resource::Cpu,
                [1000, 0, 0, 0, 0],
                [1000; 5],
                &apps,
                &peers,
                &policy(target),
                0,
            );
            assert_eq!(names(&p), [("a", 1)], "{target:?}");
        }
    }

    #[test]
    fn empty_plan_when_every_peer_is_at_its_threshold() {
        let apps = [app("a", [100, 0, 0, 0, 0], 0)];
        let peers = [
            peer(1, [1000; 5], [800, 0, 0, 0, 0]),
            peer(2, [1000; 5], [0, 0, 900, 0, 0]),
        ];
        for target in [Target::Single, Target::Spread] {
            let p = plan(
                Resource::Cpu,
                [1000, 0, 0, 0, 0],
                [1000; 5],
                &apps,
                &peers,
                &policy(target),
                0,
            );
            assert!(p.is_empty(), "{target:?}");
            let none = plan(
                Resource::Cpu,
                [1000, 0, 0, 0, 0],
                [1000; 5],
                &apps,
                &[],
                &policy(target),
                0,
            );
            assert!(none.is_empty());
        }
    }

    /// xorshift64*: a tiny deterministic generator for randomised tests.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }

        /// Random amounts below `max`, each zero with `zero_percent` chance.
        fn amounts(&mut self, max: u64, zero_percent: u64) -> Amounts {
            std::array::from_fn(|_| {
                if self.chance(zero_percent) {
                    0
                } else {
                    self.below(max)
                }
            })
        }

        fn shuffle<T>(&mut self, v: &mut [T]) {
            for i in (1..v.len()).rev() {
                v.swap(i, self.below(i as u64 + 1) as usize);
            }
        }
    }

    struct Case {
        resource: Resource,
        need: Amounts,
        capacity: Amounts,
        apps: Vec<AppLoad>,
        peers: Vec<PeerLoad>,
        policy: Policy,
        now_ms: u64,
    }

    impl Case {
        fn plan(&self) -> Vec<Move> {
            plan(
                self.resource,
                self.need,
                self.capacity,
                &self.apps,
                &self.peers,
                &self.policy,
                self.now_ms,
            )
        }
    }

    fn random_case(rng: &mut Rng) -> Case {
        let marks: [Watermarks; 5] = std::array::from_fn(|_| {
            let low = 0.2 + rng.below(40) as f64 / 100.0;
            Watermarks {
                high: low + 0.1 + rng.below(30) as f64 / 100.0,
                low,
            }
        });
        let policy = Policy {
            marks,
            sustain_ms: 0,
            cooldown_ms: rng.below(10_000),
            target: if rng.chance(50) {
                Target::Single
            } else {
                Target::Spread
            },
        };
        let now_ms = 20_000;
        let apps = (0..rng.below(12))
            .map(|i| AppLoad {
                name: format!("app{i}"),
                usage: rng.amounts(300, 15),
                priority: rng.below(3) as i32,
                offloadable: rng.chance(80),
                moved_at_ms: rng.chance(30).then(|| now_ms - rng.below(15_000)),
            })
            .collect();
        let peers = (0..rng.below(5))
            .map(|i| {
                let capacity = rng.amounts(3_000, 2);
                PeerLoad {
                    slot: i as u32 * 3 + 1,
                    capacity,
                    need: capacity.map(|c| rng.below(c * 6 / 10 + 1)),
                    marks,
                }
            })
            .collect();
        let capacity = rng.amounts(2_000, 5);
        Case {
            resource: Resource::ALL[rng.below(5) as usize],
            need: capacity.map(|c| c / 2 + rng.below(c + 1)),
            capacity,
            apps,
            peers,
            policy,
            now_ms,
        }
    }

    /// Checks the invariants every plan must satisfy.
    fn check(case: &Case, moves: &[Move]) {
        let r = case.resource.index();
        let mut seen = BTreeSet::new();
        let mut added: Vec<Amounts> = vec![[0; 5]; case.peers.len()];
        let mut moved = 0u64;
        for m in moves {
            assert!(seen.insert(m.app.clone()), "{} moved twice", m.app);
            let a = case
                .apps
                .iter()
                .find(|a| a.name == m.app)
                .expect("known app");
            assert!(a.offloadable, "{} is not offloadable", a.name);
            let cooling = a
                .moved_at_ms
                .is_some_and(|t| case.now_ms < t + case.policy.cooldown_ms);
            assert!(!cooling, "{} is cooling down", a.name);
            let i = case
                .peers
                .iter()
                .position(|p| p.slot == m.to_slot)
                .expect("known slot");
            added[i] = add(added[i], a.usage);
            moved += a.usage[r];
        }
        for (p, extra) in case.peers.iter().zip(&added) {
            for i in 0..5 {
                let ok = if !Resource::ALL[i].evaluated(p.capacity[i]) {
                    true
                } else if p.capacity[i] == 0 {
                    extra[i] == 0
                } else {
                    (p.need[i] + extra[i]) as f64 <= p.marks[i].high * p.capacity[i] as f64
                };
                assert!(
                    ok || *extra == [0; 5],
                    "peer {} exceeds high in {i}",
                    p.slot
                );
            }
        }
        if let Some(last) = moves.last() {
            let a = case
                .apps
                .iter()
                .find(|a| a.name == last.app)
                .expect("known app");
            let limit = case.policy.marks[r].low * case.capacity[r] as f64;
            let before = case.need[r].saturating_sub(moved - a.usage[r]) as f64;
            assert!(before > limit, "the plan went on after reaching low");
        }
        if case.policy.target == Target::Single {
            let slots: BTreeSet<_> = moves.iter().map(|m| m.to_slot).collect();
            assert!(slots.len() <= 1, "single target used {slots:?}");
        }
    }

    #[test]
    fn randomised_plans_keep_their_invariants() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for _ in 0..1_000 {
            let mut case = random_case(&mut rng);
            let moves = case.plan();
            check(&case, &moves);
            assert_eq!(case.plan(), moves, "plan is not deterministic");
            rng.shuffle(&mut case.apps);
            rng.shuffle(&mut case.peers);
            assert_eq!(case.plan(), moves, "plan depends on input order");
        }
    }

    #[test]
    fn randomised_plans_move_something_when_a_fresh_peer_exists() {
        let mut rng = Rng(42);
        for _ in 0..300 {
            let mut case = random_case(&mut rng);
            case.peers.push(peer(1_000, [u64::MAX / 4; 5], [0; 5]));
            let r = case.resource.index();
            let goal = Goal {
                need: case.need[r],
                limit: case.policy.marks[r].low * case.capacity[r] as f64,
            };
            let movable =
                !candidates(&case.apps, r, case.policy.cooldown_ms, case.now_ms).is_empty();
            assert_eq!(!case.plan().is_empty(), movable && !goal.reached(0));
        }
    }

    /// A reference model of the trigger rule, from the full sample history.
    fn reference(history: &[(u64, [f64; 5])], p: &Policy, cooling: bool) -> Option<Resource> {
        let &(now, util) = history.last()?;
        if cooling {
            return None;
        }
        let mut best: Option<(Resource, f64)> = None;
        for r in Resource::ALL {
            let i = r.index();
            let run = history
                .iter()
                .rev()
                .take_while(|(_, u)| u[i] > p.marks[i].high);
            let Some(&(start, _)) = run.last() else {
                continue;
            };
            if now - start >= p.sustain_ms && best.is_none_or(|(_, b)| util[i] > b) {
                best = Some((r, util[i]));
            }
        }
        best.map(|(r, _)| r)
    }

    #[test]
    fn randomised_series_match_the_reference_rule() {
        let mut rng = Rng(7);
        for _ in 0..200 {
            let mut p = policy(Target::Single);
            p.sustain_ms = rng.below(4) * 1_000;
            p.cooldown_ms = rng.below(5) * 1_000;
            let mut ev = Evaluator::new();
            let mut history = Vec::new();
            let mut last_offload: Option<u64> = None;
            let mut now = 0;
            for _ in 0..60 {
                now += 250 + rng.below(1_000);
                let util: [f64; 5] = std::array::from_fn(|_| rng.below(100) as f64 / 90.0);
                history.push((now, util));
                let cooling = last_offload.is_some_and(|t| now < t + p.cooldown_ms);
                let want = reference(&history, &p, cooling);
                let got = ev.observe(now, util, &p);
                assert_eq!(got.map(|t| t.resource), want, "at {now}");
                if let Some(t) = got {
                    assert_eq!((t.at_ms, t.utilisation), (now, util[t.resource.index()]));
                }
                if got.is_some() && rng.chance(50) {
                    ev.offloaded(now);
                    last_offload = Some(now);
                    history.clear();
                }
            }
        }
    }
}
