//! The cluster protocol in the node core: its frames ([`wire`]) and the cluster client
//! ([`client`]) that carries every node's proposals to the quorum and answers others'
//! proposals on a manager.

pub mod client;
pub mod follow;
pub mod wire;
