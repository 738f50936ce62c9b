//! The stored lifecycle of a node: every change of `NodeRecord::state` goes
//! through `transition` (via `NodeRecord::change`), so the allowed moves
//! live in one table. SUSPECT is never stored: it is how a member whose
//! agent is disconnected is shown (`node_list::shown_state`).
//!
//! ```text
//! FREE   --Join--> MEMBER   (a pool is created on it, or it is the spare a slot moves to)
//! MEMBER --Leave--> FREE    (its pool is deleted)
//! MEMBER --Fail--> FAILED   (its slot moved to a spare)
//! FAILED --Return--> FENCED (it connected again: told to stop its old group)
//! FENCED --Drained--> FREE  (it reports that nothing runs)
//! ```

use crate::model::NodeState;

/// What happens to a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeEvent {
    /// It becomes the member holding a slot of a pool.
    Join,
    /// Its pool was deleted.
    Leave,
    /// Its slot moved to a spare.
    Fail,
    /// A failed node connected again.
    Return,
    /// A fenced node runs nothing any more.
    Drained,
}

/// A move the lifecycle does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a {from:?} node cannot {event:?}")]
pub struct InvalidTransition {
    pub from: NodeState,
    pub event: NodeEvent,
}

/// The state after `event`, or why it cannot happen.
pub fn transition(from: NodeState, event: NodeEvent) -> Result<NodeState, InvalidTransition> {
    use NodeEvent::*;
    use NodeState::*;
    match (from, event) {
        (Free, Join) => Ok(Member),
        (Member, Leave) => Ok(Free),
        (Member, Fail) => Ok(Failed),
        (Failed, Return) => Ok(Fenced),
        (Fenced, Drained) => Ok(Free),
        _ => Err(InvalidTransition { from, event }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_whole_table() {
        use NodeEvent::*;
        use NodeState::*;
        let states = [Free, Member, Suspect, Failed, Fenced];
        let events = [Join, Leave, Fail, Return, Drained];
        // (from, event) -> to; every other pair is refused.
        let allowed = [
            (Free, Join, Member),
            (Member, Leave, Free),
            (Member, Fail, Failed),
            (Failed, Return, Fenced),
            (Fenced, Drained, Free),
        ];
        for from in states {
            for event in events {
                let expected = allowed
                    .iter()
                    .find(|(f, e, _)| *f == from && *e == event)
                    .map(|(_, _, to)| *to);
                match (transition(from, event), expected) {
                    (Ok(to), Some(want)) => assert_eq!(to, want, "{from:?} + {event:?}"),
                    (Err(e), None) => assert_eq!(e, InvalidTransition { from, event }),
                    (got, want) => panic!("{from:?} + {event:?}: got {got:?}, want {want:?}"),
                }
            }
        }
    }

    #[test]
    fn suspect_is_never_stored() {
        for event in [
            NodeEvent::Join,
            NodeEvent::Leave,
            NodeEvent::Fail,
            NodeEvent::Return,
            NodeEvent::Drained,
        ] {
            for from in [
                NodeState::Free,
                NodeState::Member,
                NodeState::Failed,
                NodeState::Fenced,
            ] {
                assert_ne!(transition(from, event), Ok(NodeState::Suspect));
            }
        }
    }
}
