//! The libp2p side of the daemon: QUIC transport, the membership gate, identify, ping,
//! gossipsub for announcements, and the `/mycel/exchange/1` stream protocol.
//!
//! This module moves bytes and makes no protocol decision: frames are encoded and checked
//! by `mycel_proto::wire`, what to ask and whom is decided by `mycel_proto::fetch`, and the
//! daemon loop connects the two.

pub mod exchange;
pub mod gate;
pub mod limit;

use std::time::Duration;

use libp2p::{
    PeerId, StreamProtocol, Swarm, gossipsub, identify, identity, ping, swarm::NetworkBehaviour,
};

/// The exchange protocol.
pub const EXCHANGE: StreamProtocol = StreamProtocol::new("/mycel/exchange/1");
/// Identify's protocol version string.
pub const IDENTIFY_PROTOCOL: &str = "/mycel/1.0.0";

/// The gossip topic of a zone's announcements.
pub fn announce_topic(zone: &str) -> gossipsub::IdentTopic {
    gossipsub::IdentTopic::new(format!("/mycel/announce/1/{zone}"))
}

/// Everything the swarm runs.
#[derive(NetworkBehaviour)]
#[allow(missing_debug_implementations)] // libp2p behaviours do not implement Debug
pub struct Behaviour {
    /// Only members connect: every other connection is denied before any protocol runs.
    pub gate: gate::Gate,
    /// Peers learn each other's listen addresses and versions.
    pub identify: identify::Behaviour,
    /// Liveness and round-trip times.
    pub ping: ping::Behaviour,
    /// Announcements.
    pub gossipsub: gossipsub::Behaviour,
    /// The exchange streams.
    pub stream: libp2p_stream::Behaviour,
    /// Local-network discovery (`[node] mdns = true`; off by default). Discovered peers are
    /// dialled; the gate still admits only members.
    pub mdns: libp2p::swarm::behaviour::toggle::Toggle<libp2p::mdns::tokio::Behaviour>,
}

/// Why the network could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// libp2p refused the configuration.
    #[error("network setup: {0}")]
    Setup(String),
    /// A listen or bootstrap address is not a multiaddr.
    #[error("bad multiaddr {addr:?}: {why}")]
    Addr {
        /// The text.
        addr: String,
        /// Why.
        why: String,
    },
}

/// Builds the swarm for `keypair`, with libp2p's metrics registered in `registry`.
///
/// # Errors
/// [`NetError::Setup`] if a component rejects its configuration.
pub fn build_swarm(
    keypair: identity::Keypair,
    registry: &mut prometheus_client::registry::Registry,
    policy: std::sync::Arc<std::sync::RwLock<gate::Policy>>,
    mdns: bool,
) -> Result<Swarm<Behaviour>, NetError> {
    let setup = |e: &dyn std::fmt::Display| NetError::Setup(e.to_string());
    let gossip_config = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(Duration::from_millis(500))
        .validation_mode(gossipsub::ValidationMode::Strict)
        .max_transmit_size(mycel_proto::wire::ANNOUNCE_BYTES_MAX + 4096)
        .build()
        .map_err(|e| setup(&e))?;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_quic()
        .with_bandwidth_metrics(registry)
        .with_behaviour(|key| {
            let mut gossipsub = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                gossip_config,
            )?;
            let mdns = if mdns {
                Some(libp2p::mdns::tokio::Behaviour::new(
                    libp2p::mdns::Config::default(),
                    key.public().to_peer_id(),
                )?)
            } else {
                None
            };
            gossipsub.with_peer_score(
                gossipsub::PeerScoreParams::default(),
                gossipsub::PeerScoreThresholds::default(),
            )?;
            Ok(Behaviour {
                gate: gate::Gate::new(policy.clone()),
                identify: identify::Behaviour::new(identify::Config::new(
                    IDENTIFY_PROTOCOL.into(),
                    key.public(),
                )),
                ping: ping::Behaviour::new(
                    ping::Config::new().with_interval(Duration::from_secs(2)),
                ),
                gossipsub,
                stream: libp2p_stream::Behaviour::new(),
                mdns: mdns.into(),
            })
        })
        .map_err(|e| setup(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build();
    Ok(swarm)
}

/// Parses a PeerId, with the text in the error.
///
/// # Errors
/// A message naming the bad value.
pub fn parse_peer(s: &str) -> Result<PeerId, String> {
    s.trim().parse::<PeerId>().map_err(|e| format!("bad PeerId {s:?}: {e}"))
}

/// The core's opaque peer identity for a libp2p PeerId.
pub fn core_peer(p: &PeerId) -> mycel_proto::PeerId {
    mycel_proto::PeerId::from_bytes(&p.to_bytes()).expect("libp2p PeerIds fit the core's bound")
}

/// The libp2p PeerId for the core's identity.
pub fn libp2p_peer(p: &mycel_proto::PeerId) -> Option<PeerId> {
    PeerId::from_bytes(p.as_bytes()).ok()
}
