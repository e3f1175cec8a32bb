//! One event filter over the stored header and correlation fields, shared by
//! live subscriptions ([`crate::subscribe`]) and multi-dimensional queries
//! ([`crate::query`]), so both mean the same thing by "matches".

use crate::event::EventKind;
use crate::store::StoredEvent;

/// The type bit of an unlink event (links and unlinks share a kind and
/// differ by `aux`; unlinks take the unused bit 13).
pub const UNLINK_BIT: u32 = 13;

/// The type bit of a stored event: `1 << kind`, except unlinks
/// (`1 << UNLINK_BIT`).
#[inline]
pub fn type_bit(kind: u8, aux: i64) -> u64 {
    if kind == EventKind::ProcessLink as u8 && aux == 0 {
        1 << UNLINK_BIT
    } else {
        1 << (kind & 63)
    }
}

/// What an event must have to match; `None` (or `types == 0`) is "any".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventFilter {
    /// The event's process word.
    pub pid: Option<u64>,
    /// Module word.
    pub module: Option<u64>,
    /// Function word.
    pub function: Option<u64>,
    /// Arity (calls only: a call's `aux`).
    pub arity: Option<i64>,
    /// A mask of [`type_bit`]s; 0 = any type.
    pub types: u64,
    /// Correlation id.
    pub correlation_id: Option<u64>,
    /// Only events of local processes (a non-zero process word).
    pub local_process: bool,
    /// Inclusive timestamp window.
    pub from_ts: Option<i64>,
    /// Inclusive upper bound of the window.
    pub to_ts: Option<i64>,
    /// Events with a link to this event id: calls made inside it
    /// (`parent_id`), its return (`correlation_id`), the receive of a send,
    /// state changes inside a call.
    pub linked_to: Option<u64>,
    /// Records stored whole as terms with this event-type key
    /// ([`crate::store::EventStore::insert_term`]).
    pub event_type: Option<u64>,
    /// Records with this AST-node key.
    pub ast_node: Option<u64>,
}

impl EventFilter {
    /// Does `e` match every given field?
    #[inline]
    pub fn matches(&self, e: &StoredEvent<'_>) -> bool {
        (self.types == 0 || self.types & type_bit(e.kind, e.aux) != 0)
            && self.pid.map_or(true, |p| e.pid == p)
            && self.module.map_or(true, |m| e.module == m)
            && self.function.map_or(true, |f| e.function == f)
            && self.arity.map_or(true, |a| {
                e.kind == EventKind::FunctionCall as u8 && e.aux == a
            })
            && self.correlation_id.map_or(true, |c| e.correlation_id == c)
            && (!self.local_process || e.pid != 0)
            && self.from_ts.map_or(true, |t| e.timestamp >= t)
            && self.to_ts.map_or(true, |t| e.timestamp <= t)
            && self.linked_to.map_or(true, |t| links_to(e, t))
            && self.event_type.map_or(true, |t| {
                e.kind == EventKind::Term as u8 && e.aux as u64 == t && t != 0
            })
            && self.ast_node.map_or(true, |a| e.ast_node == a && a != 0)
    }

    /// The union of types this filter can match (`u64::MAX`: any).
    pub fn type_mask(&self) -> u64 {
        let mut m = if self.types == 0 {
            u64::MAX
        } else {
            self.types
        };
        if self.arity.is_some() {
            m &= 1 << EventKind::FunctionCall as u8;
        }
        if self.event_type.is_some() {
            m &= 1 << EventKind::Term as u8;
        }
        m
    }
}

/// Does `e` have a link (see [`crate::pipeline::links_of`]) to event
/// `target`?
#[inline]
pub fn links_to(e: &StoredEvent<'_>, target: u64) -> bool {
    if target == 0 || e.id == target {
        return false;
    }
    match EventKind::from_u8(e.kind) {
        EventKind::FunctionCall | EventKind::StateChange => e.parent_id == target,
        EventKind::FunctionReturn | EventKind::FunctionException | EventKind::MessageReceive => {
            e.correlation_id == target
        }
        _ => false,
    }
}
