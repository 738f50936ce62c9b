//! `NodeKey`: how the manager names a node internally. Node ids are unique
//! within a tenant only (two tenants may each have a node `n1`), so every
//! table and map of nodes (the registry's rows, the live map, what members
//! say of each other, the failure detector's watch) is keyed by tenant and
//! node id together, and nothing one tenant does can name, find or block
//! another tenant's node.
//!
//! The key is `tenant/node_id` (neither name may contain '/', see
//! `identity::validate_name`), so a tenant's nodes are one contiguous,
//! id-ordered range of the registry's node table.

use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeKey(String);

impl NodeKey {
    pub fn new(tenant: &str, node_id: &str) -> Self {
        NodeKey(format!("{tenant}/{node_id}"))
    }

    /// The key of a stored row, checked: `None` if it is not `tenant/id`.
    pub fn parse(key: &str) -> Option<Self> {
        let (tenant, node_id) = key.split_once('/')?;
        (!tenant.is_empty() && !node_id.is_empty() && !node_id.contains('/'))
            .then(|| NodeKey(key.to_string()))
    }

    /// Where `tenant`'s rows start in the node table (every key of the
    /// tenant sorts after it, and only the tenant's keys start with it).
    pub fn tenant_prefix(tenant: &str) -> String {
        format!("{tenant}/")
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn tenant(&self) -> &str {
        self.0.split_once('/').map_or("", |(t, _)| t)
    }

    pub fn node_id(&self) -> &str {
        self.0.split_once('/').map_or(self.0.as_str(), |(_, n)| n)
    }
}

impl fmt::Display for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_tenant_and_id_and_tenants_are_contiguous_ranges() {
        let k = NodeKey::new("acme", "n1");
        assert_eq!(
            (k.tenant(), k.node_id(), k.as_str()),
            ("acme", "n1", "acme/n1")
        );
        assert_eq!(NodeKey::parse("acme/n1"), Some(k));
        for bad in ["n1", "/n1", "acme/", "a/b/c"] {
            assert_eq!(NodeKey::parse(bad), None, "{bad}");
        }
        // "a-b/..." sorts before "a/..." ('-' < '/'), and "a0/..." after:
        // no other tenant's key falls inside tenant a's range.
        let mut keys = ["a/z", "a-b/n", "a0/n", "a/n"].map(|k| k.to_string());
        keys.sort();
        assert_eq!(keys, ["a-b/n", "a/n", "a/z", "a0/n"]);
        assert!(
            keys.iter()
                .filter(|k| k.starts_with(&NodeKey::tenant_prefix("a")))
                .count()
                == 2
        );
    }
}
