//! Who is on the other end of a connection, as the transport proved it.
//!
//! The doors fill this in per connection (TLS client certificate, socket
//! address) and hand it to caller resolution and to the identity rules, so
//! that "is this peer authenticated?" has one answer shared by both doors
//! instead of each door inspecting sockets and certificates its own way.

use std::net::SocketAddr;

/// What the transport established about a connection's peer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// URI and DNS subject alternative names of a client certificate that
    /// verified against `CASF_TLS_CLIENT_CA`. Empty when the connection
    /// presented none (or the door does not require client certificates).
    pub sans: Vec<String>,
    /// The peer's socket address, when the door knows it.
    pub remote: Option<SocketAddr>,
}

impl PeerIdentity {
    /// A client certificate verified against the configured client CA.
    pub fn is_certified(&self) -> bool {
        !self.sans.is_empty()
    }

    /// The connection arrived over loopback (the sidecar topology).
    pub fn is_loopback(&self) -> bool {
        self.remote.is_some_and(|addr| addr.ip().is_loopback())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_certified_are_told_apart() {
        let local = PeerIdentity {
            sans: vec![],
            remote: Some("127.0.0.1:4000".parse().unwrap()),
        };
        assert!(local.is_loopback() && !local.is_certified());
        let remote = PeerIdentity {
            sans: vec!["spiffe://clinic/ns/agents/sa/scheduler".into()],
            remote: Some("10.0.0.7:4000".parse().unwrap()),
        };
        assert!(!remote.is_loopback() && remote.is_certified());
        assert!(!PeerIdentity::default().is_loopback());
    }
}
