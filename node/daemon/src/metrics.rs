//! The daemon's Prometheus metrics; libp2p's own metrics share the registry.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Counters and gauges the daemon updates.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Block bytes served to peers.
    pub bytes_sent: Counter,
    /// Block bytes received from peers.
    pub bytes_received: Counter,
    /// Frames that were oversized or malformed (the stream was reset).
    pub bad_frames: Counter,
    /// Blocks that failed verification.
    pub corrupt_blocks: Counter,
    /// Peers disconnected for misbehaviour.
    pub peers_disconnected: Counter,
    /// Announcements published.
    pub announcements: Counter,
    /// Publishes that found no subscribed peer (retried).
    pub publish_retries: Counter,
    /// Connected peers.
    pub peers_connected: Gauge,
    /// Objects being fetched.
    pub fetches_active: Gauge,
    /// Requests refused for lack of a grant (or a block outside the named root).
    pub refused_requests: Counter,
    /// Pins below their minimum replicas, as this node sees them.
    pub pins_under_replicated: Gauge,
    /// Pre-positions at risk of missing their deadline.
    pub prepositions_at_risk: Gauge,
    /// Pre-positions that missed their deadline.
    pub prepositions_missed: Gauge,
    /// Pins that cannot be placed.
    pub pins_unplaceable: Gauge,
    /// Cached objects evicted under the storage budget.
    pub evictions: Counter,
}

impl Metrics {
    /// Registers every metric under `mycel_`.
    pub fn register(registry: &mut Registry) -> Arc<Metrics> {
        let m = Arc::new(Metrics::default());
        let r = registry.sub_registry_with_prefix("mycel");
        r.register("sent_bytes", "Block bytes served to peers", m.bytes_sent.clone());
        r.register("received_bytes", "Block bytes received from peers", m.bytes_received.clone());
        r.register("bad_frames", "Oversized or malformed frames", m.bad_frames.clone());
        r.register("corrupt_blocks", "Blocks that failed verification", m.corrupt_blocks.clone());
        r.register(
            "peers_disconnected",
            "Peers disconnected for misbehaviour",
            m.peers_disconnected.clone(),
        );
        r.register("announcements", "Announcements published", m.announcements.clone());
        r.register(
            "publish_retries",
            "Announcements retried for lack of subscribers",
            m.publish_retries.clone(),
        );
        r.register("peers_connected", "Connected peers", m.peers_connected.clone());
        r.register("fetches_active", "Objects being fetched", m.fetches_active.clone());
        r.register(
            "refused_requests",
            "Requests refused for lack of a grant",
            m.refused_requests.clone(),
        );
        r.register(
            "pins_under_replicated",
            "Pins below their minimum replicas",
            m.pins_under_replicated.clone(),
        );
        r.register("prepositions_at_risk", "Pre-positions at risk", m.prepositions_at_risk.clone());
        r.register(
            "prepositions_missed",
            "Pre-positions past their deadline",
            m.prepositions_missed.clone(),
        );
        r.register("pins_unplaceable", "Pins that cannot be placed", m.pins_unplaceable.clone());
        r.register(
            "evictions",
            "Cached objects evicted under the storage budget",
            m.evictions.clone(),
        );
        m
    }
}
