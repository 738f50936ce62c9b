//! The pool's app catalog: a digest of each app's spec that does not depend
//! on how a protobuf library lays out the message (map order, unknown
//! fields, default values), so the manager and every agent compute the same
//! bytes for the same app.
//!
//! The manager sends every member the digests of all the pool's apps in its
//! assignment (`Assignment.catalog`); a member runs another member's app as
//! a guest only when the offered spec's digest is the catalog's.

use sha2::{Digest, Sha256};

use crate::proto as pb;

/// Tags the layout, so a future change of it can never collide with this one.
const LAYOUT: &[u8] = b"edgepool.AppSpec.v1\0";

/// SHA-256 of `spec`'s canonical encoding (see [`canonical`]).
pub fn app_digest(spec: &pb::AppSpec) -> [u8; 32] {
    Sha256::digest(canonical(spec)).into()
}

/// The canonical encoding of an app spec: the layout tag, then every field
/// in field-number order. A string is its length (u64, little endian) and
/// its UTF-8 bytes; a list is its length and its items; `env` is sorted by
/// key; an absent `resources` is five zeros (as proto3 reads it); `slot` is
/// one byte (0 absent, 1 present) and a u32; `limits` is one byte (0
/// absent, 1 present) and five u64; integers are little endian,
/// `offloadable` one byte.
pub fn canonical(spec: &pb::AppSpec) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.extend_from_slice(LAYOUT);
    put_str(&mut out, &spec.name);
    put_u64(&mut out, spec.command.len() as u64);
    for arg in &spec.command {
        put_str(&mut out, arg);
    }
    let mut env: Vec<(&String, &String)> = spec.env.iter().collect();
    env.sort();
    put_u64(&mut out, env.len() as u64);
    for (k, v) in env {
        put_str(&mut out, k);
        put_str(&mut out, v);
    }
    put_resources(&mut out, spec.resources.unwrap_or_default());
    out.extend_from_slice(&spec.priority.to_le_bytes());
    out.push(u8::from(spec.offloadable));
    out.push(u8::from(spec.slot.is_some()));
    out.extend_from_slice(&spec.slot.unwrap_or(0).to_le_bytes());
    put_str(&mut out, &spec.artifact);
    out.extend_from_slice(&spec.on_disconnect.to_le_bytes());
    out.push(u8::from(spec.limits.is_some()));
    put_resources(&mut out, spec.limits.unwrap_or_default());
    out
}

/// The five fields of a `Resources`, in field-number order.
fn put_resources(out: &mut Vec<u8>, r: pb::Resources) {
    for v in [
        r.cpu_millis,
        r.memory_mb,
        r.disk_mb,
        r.network_mbps,
        r.disk_io_kbps,
    ] {
        put_u64(out, v);
    }
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u64(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn spec() -> pb::AppSpec {
        pb::AppSpec {
            name: "web".into(),
            command: vec!["sleep".into(), "10".into()],
            env: [("B", "2"), ("A", "1"), ("C", "")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            resources: Some(pb::Resources {
                cpu_millis: 100,
                ..Default::default()
            }),
            priority: -3,
            offloadable: true,
            slot: Some(2),
            artifact: String::new(),
            on_disconnect: pb::OnDisconnect::Stop as i32,
            limits: Some(pb::Resources {
                memory_mb: 64,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn the_digest_survives_the_wire_and_ignores_map_order() {
        let a = spec();
        let back = pb::AppSpec::decode(a.encode_to_vec().as_slice()).unwrap();
        assert_eq!(app_digest(&a), app_digest(&back));
        // The same env inserted in another order (each map also hashes
        // with its own random keys).
        let mut pairs: Vec<(String, String)> = a.env.clone().into_iter().collect();
        pairs.sort();
        pairs.reverse();
        let mut b = a.clone();
        b.env = pairs.into_iter().collect();
        assert_eq!(app_digest(&a), app_digest(&b));
        // Absent resources read as zeros, as proto3 does.
        let mut c = a.clone();
        c.resources = None;
        let mut d = a.clone();
        d.resources = Some(pb::Resources::default());
        assert_eq!(app_digest(&c), app_digest(&d));
    }

    type Change = Box<dyn Fn(&mut pb::AppSpec)>;

    #[test]
    fn every_field_changes_the_digest() {
        let a = spec();
        let changes: Vec<Change> = vec![
            Box::new(|s| s.name.push('x')),
            Box::new(|s| s.command.push("x".into())),
            Box::new(|s| s.command[1] = "11".into()),
            // Moving a byte between two arguments is another argv.
            Box::new(|s| s.command = vec!["slee".into(), "p10".into()]),
            Box::new(|s| {
                s.env.insert("A".into(), "other".into());
            }),
            Box::new(|s| {
                s.env.insert("LD_PRELOAD".into(), "/tmp/x.so".into());
            }),
            Box::new(|s| s.resources = None),
            Box::new(|s| s.priority = 0),
            Box::new(|s| s.offloadable = false),
            Box::new(|s| s.slot = None),
            Box::new(|s| s.slot = Some(3)),
            Box::new(|s| s.artifact = "a".into()),
            Box::new(|s| s.on_disconnect = 0),
            Box::new(|s| s.limits = None),
            Box::new(|s| s.limits = Some(pb::Resources::default())),
            Box::new(|s| {
                s.limits = Some(pb::Resources {
                    cpu_millis: 1,
                    memory_mb: 64,
                    ..Default::default()
                })
            }),
        ];
        for (i, change) in changes.iter().enumerate() {
            let mut b = a.clone();
            change(&mut b);
            assert_ne!(app_digest(&a), app_digest(&b), "change {i}");
        }
    }
}
