//! The membership gate: a connection from or to a peer is denied before any protocol runs
//! unless the policy allows it. The policy is shared with the daemon loop, so membership
//! changes take effect without swapping behaviours (which would drop live connections).

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};

/// Who may connect.
#[derive(Debug, Default, Clone)]
pub struct Policy {
    /// Admit peers that are not members (cluster managers, so joiners can present tokens;
    /// their protocols still refuse non-members).
    pub open: bool,
    /// Members.
    pub allowed: BTreeSet<PeerId>,
    /// Removed members: refused even when open.
    pub blocked: BTreeSet<PeerId>,
}

impl Policy {
    fn check(&self, peer: &PeerId) -> Result<(), ConnectionDenied> {
        if self.blocked.contains(peer) {
            return Err(ConnectionDenied::new(Refused("removed from the cluster")));
        }
        if self.open || self.allowed.contains(peer) {
            return Ok(());
        }
        Err(ConnectionDenied::new(Refused("not a member")))
    }
}

#[derive(Debug)]
struct Refused(&'static str);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Refused {}

/// The gate behaviour.
#[derive(Debug, Default)]
pub struct Gate {
    policy: Arc<RwLock<Policy>>,
}

impl Gate {
    /// A gate enforcing `policy`.
    pub fn new(policy: Arc<RwLock<Policy>>) -> Gate {
        Gate { policy }
    }

    fn check(&self, peer: &PeerId) -> Result<(), ConnectionDenied> {
        self.policy.read().expect("gate policy lock").check(peer)
    }
}

impl NetworkBehaviour for Gate {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.check(&peer)?;
        Ok(dummy::ConnectionHandler)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: Option<PeerId>,
        _: &[Multiaddr],
        _: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        if let Some(peer) = peer {
            self.check(&peer)?;
        }
        Ok(vec![])
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.check(&peer)?;
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, _event: FromSwarm) {}

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}
