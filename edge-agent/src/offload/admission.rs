//! The host's admission rules for an offered app, pure: whether the spec is
//! the pool catalog's app of the caller's slot ([`vet`]), what the app
//! counts for ([`admitted_amounts`]) and the bounds on one member's guests
//! ([`over_member_bound`]). `host` applies them under the offload state's
//! lock.

use edgepool_common::catalog::app_digest;
use edgepool_common::proto as pb;

use crate::offload_state::GuestLimits;
use crate::scheduler::{self, Amounts, Resource};

/// Whether `spec` is exactly the pool catalog's app of the caller's slot
/// (`entry` is the catalog's entry of that name, if any).
pub fn vet(
    entry: Option<&pb::CatalogApp>,
    caller_slot: u32,
    spec: &pb::AppSpec,
) -> Result<(), String> {
    let entry = entry.ok_or_else(|| format!("app {:?} is not in the pool's catalog", spec.name))?;
    if entry.slot != caller_slot {
        return Err(format!(
            "app {:?} belongs to slot {}, not to the caller's slot {caller_slot}",
            spec.name, entry.slot
        ));
    }
    if entry.digest.as_slice() != app_digest(spec).as_slice() {
        return Err(format!(
            "app {:?}: the offered spec differs from the pool's catalog",
            spec.name
        ));
    }
    Ok(())
}

/// What admission counts for an offered app: in each resource the larger
/// of its declared resources (network in Mbit/s, made kbit/s) and the usage
/// its owner stated, so an owner cannot slip an app in by stating 0.
pub fn admitted_amounts(spec: &pb::AppSpec, stated: Option<pb::Resources>) -> Amounts {
    let d = spec.resources.unwrap_or_default();
    let u = stated.unwrap_or_default();
    larger(
        [
            d.cpu_millis,
            d.memory_mb,
            d.disk_mb,
            d.network_mbps.saturating_mul(1000),
            d.disk_io_kbps,
        ],
        [
            u.cpu_millis,
            u.memory_mb,
            u.disk_mb,
            u.network_mbps,
            u.disk_io_kbps,
        ],
    )
}

/// The larger amount in each resource.
pub fn larger(a: Amounts, b: Amounts) -> Amounts {
    std::array::from_fn(|i| a[i].max(b[i]))
}

/// The bound one member would cross by adding a guest of `usage` to the
/// guests it holds here (`held`, each at the larger of what it was admitted
/// with and what it measures), if any.
pub fn over_member_bound(
    held: &[Amounts],
    usage: Amounts,
    capacity: Amounts,
    limits: GuestLimits,
) -> Option<String> {
    if held.len() >= limits.count as usize {
        return Some(format!(
            "the caller already has {} guests here (max_guests_per_member)",
            held.len()
        ));
    }
    let total = held.iter().fold(usage, |acc, h| scheduler::add(acc, *h));
    Resource::ALL
        .into_iter()
        .find(|r| {
            let i = r.index();
            capacity[i] > 0
                && total[i] as f64 > f64::from(limits.percent) / 100.0 * capacity[i] as f64
        })
        .map(|r| {
            format!(
                "the caller's guests would hold more than {}% of this node's {} \
                 (max_guest_percent_per_member)",
                limits.percent,
                r.name()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> pb::AppSpec {
        pb::AppSpec {
            name: "web".into(),
            command: vec!["sleep".into(), "10".into()],
            slot: Some(1),
            resources: Some(pb::Resources {
                cpu_millis: 200,
                network_mbps: 2,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn entry(slot: u32, spec: &pb::AppSpec) -> pb::CatalogApp {
        pb::CatalogApp {
            name: spec.name.clone(),
            slot,
            digest: app_digest(spec).to_vec(),
        }
    }

    #[test]
    fn only_the_catalogs_spec_from_its_own_slot_passes() {
        let s = spec();
        assert_eq!(vet(Some(&entry(1, &s)), 1, &s), Ok(()));
        let err = vet(None, 1, &s).unwrap_err();
        assert!(
            err.contains("\"web\" is not in the pool's catalog"),
            "{err}"
        );
        let err = vet(Some(&entry(2, &s)), 1, &s).unwrap_err();
        assert!(err.contains("belongs to slot 2"), "{err}");
        let mut argv = s.clone();
        argv.command = vec!["sh".into(), "-c".into(), "evil".into()];
        let err = vet(Some(&entry(1, &s)), 1, &argv).unwrap_err();
        assert!(err.contains("differs from the pool's catalog"), "{err}");
        let mut env = s.clone();
        env.env.insert("LD_PRELOAD".into(), "/tmp/x.so".into());
        assert!(vet(Some(&entry(1, &s)), 1, &env).is_err());
    }

    #[test]
    fn admission_counts_the_larger_of_declared_and_stated() {
        let s = spec();
        // Stated 0: the declared resources count (network Mbit/s -> kbit/s).
        assert_eq!(admitted_amounts(&s, None), [200, 0, 0, 2000, 0]);
        let stated = pb::Resources {
            cpu_millis: 50,
            memory_mb: 64,
            network_mbps: 3000,
            ..Default::default()
        };
        assert_eq!(admitted_amounts(&s, Some(stated)), [200, 64, 0, 3000, 0]);
    }

    #[test]
    fn one_members_guests_are_bounded_in_number_and_share() {
        let limits = GuestLimits {
            count: 2,
            percent: 50,
        };
        let cap = [1000, 1000, 1000, 1000, 0];
        assert_eq!(over_member_bound(&[], [500, 0, 0, 0, 9], cap, limits), None);
        let err = over_member_bound(&[], [501, 0, 0, 0, 0], cap, limits).unwrap();
        assert!(err.contains("50% of this node's cpu"), "{err}");
        let err = over_member_bound(&[[0, 400, 0, 0, 0]], [0, 101, 0, 0, 0], cap, limits).unwrap();
        assert!(err.contains("memory"), "{err}");
        // Guests of usage 0 are bounded by their number.
        let err = over_member_bound(&[[0; 5], [0; 5]], [0; 5], cap, limits).unwrap();
        assert!(err.contains("already has 2 guests"), "{err}");
    }
}
