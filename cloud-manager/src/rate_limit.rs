//! Per-source rate limit (pure: the caller passes the time). A token
//! bucket per source address: `burst` calls at once, then `rate` per
//! second. Used by `Enroll`, the one call that needs no certificate.
//!
//! IPv6 sources count by their /64 (one machine is usually given a whole
//! /64, so counting single addresses would let it pick a fresh one for
//! each call). The table is bounded: past `MAX_SOURCES` addresses, the full
//! buckets (sources quiet long enough to have refilled) are forgotten, and
//! if it is still full every new source shares one overflow bucket, so a
//! caller with very many addresses is limited as one.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Sources remembered at most.
pub const MAX_SOURCES: usize = 65_536;

pub struct RateLimit {
    /// Calls per second per source (0: no limit).
    rate: f64,
    burst: f64,
    buckets: Mutex<Buckets>,
}

#[derive(Default)]
struct Buckets {
    /// `None`: the overflow bucket of the sources not remembered.
    by_source: HashMap<Option<IpAddr>, Bucket>,
    last_prune: Option<Instant>,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimit {
    /// `rate` calls per second after a burst of `burst` (at least 1); a
    /// rate of 0 allows everything.
    pub fn new(rate: u32, burst: u32) -> Self {
        RateLimit {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(Buckets::default()),
        }
    }

    /// Takes one call of `source` at `now`: `Ok`, or how long until the
    /// next call would be allowed.
    pub fn take(&self, source: IpAddr, now: Instant) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let Ok(mut b) = self.buckets.lock() else {
            return Ok(());
        };
        let mut key = Some(key_of(source));
        if !b.by_source.contains_key(&key) && b.by_source.len() >= MAX_SOURCES {
            self.prune(&mut b, now);
            if b.by_source.len() >= MAX_SOURCES {
                key = None;
            }
        }
        let (rate, burst) = (self.rate, self.burst);
        let bucket = b.by_source.entry(key).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / rate))
        }
    }

    /// Forgets the sources whose bucket has refilled (at most once a
    /// second, so a full table is not walked on every call).
    fn prune(&self, b: &mut Buckets, now: Instant) {
        if b.last_prune
            .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        b.last_prune = Some(now);
        let refill = Duration::from_secs_f64(self.burst / self.rate);
        b.by_source
            .retain(|k, v| k.is_none() || now.saturating_duration_since(v.at) < refill);
    }
}

/// The address a source is counted by: itself (IPv4), or its /64 (IPv6;
/// an IPv4-mapped address counts as the IPv4 address).
fn key_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_burst_then_the_rate_per_source() {
        let limit = RateLimit::new(5, 10);
        let t0 = Instant::now();
        for _ in 0..10 {
            assert!(limit.take(ip("127.0.0.2"), t0).is_ok());
        }
        let wait = limit.take(ip("127.0.0.2"), t0).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(200),
            "{wait:?}"
        );
        // Another source is not affected.
        assert!(limit.take(ip("127.0.0.3"), t0).is_ok());
        // One call per 200 ms comes back.
        let t1 = t0 + Duration::from_millis(200);
        assert!(limit.take(ip("127.0.0.2"), t1).is_ok());
        assert!(limit.take(ip("127.0.0.2"), t1).is_err());
    }

    #[test]
    fn ipv6_counts_by_its_64_and_zero_means_no_limit() {
        let limit = RateLimit::new(1, 1);
        let t0 = Instant::now();
        assert!(limit.take(ip("2001:db8::1"), t0).is_ok());
        assert!(limit.take(ip("2001:db8::2"), t0).is_err());
        assert!(limit.take(ip("2001:db8:0:1::1"), t0).is_ok());
        assert!(limit.take(ip("::ffff:10.0.0.1"), t0).is_ok());
        assert!(limit.take(ip("10.0.0.1"), t0).is_err());
        let none = RateLimit::new(0, 1);
        for _ in 0..1000 {
            assert!(none.take(ip("10.0.0.1"), t0).is_ok());
        }
    }

    #[test]
    fn the_table_is_bounded() {
        let limit = RateLimit::new(1, 1);
        let t0 = Instant::now();
        for i in 0..MAX_SOURCES as u32 {
            let _ = limit.take(IpAddr::V4(i.into()), t0);
        }
        // Full of fresh (empty) buckets: a new source shares the overflow
        // bucket.
        assert!(limit.take(ip("255.255.255.255"), t0).is_ok());
        assert!(limit.take(ip("255.255.255.254"), t0).is_err());
        // Once they refilled they are forgotten.
        let later = t0 + Duration::from_secs(2);
        assert!(limit.take(ip("255.255.255.253"), later).is_ok());
        assert!(limit.buckets.lock().unwrap().by_source.len() <= 3);
    }
}
