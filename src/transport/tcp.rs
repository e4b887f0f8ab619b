//! Socket options of every session connection (agent → relay, target → relay,
//! and the relay's side of both), and of the NBD frontend's TCP clients: no
//! Nagle delay, and TCP keepalive so that a peer whose host vanished is
//! noticed while the connection is idle.
//!
//! Why keepalive: the target only ever answers frames, so while no frame
//! arrives it sends nothing. If the relay's host loses power or reboots, no FIN
//! or RST ever reaches the target, and without probes its connection stays
//! "established" for ever: the new relay waits for a target that believes it
//! is connected. With the values below a silent peer is found within
//! `KEEPALIVE_IDLE + KEEPALIVE_INTERVAL × KEEPALIVE_PROBES` (30 s) of idleness;
//! a rebooted host answers the first probe with a reset at once.
//!
//! `TCP_USER_TIMEOUT` is deliberately not set: since Linux 5.12 it also ends a
//! connection whose peer keeps a zero window for that long, which is what a
//! target paused on a full disk legitimately does to the relay for hours.

use std::time::Duration;

use tokio::net::TcpStream;

/// Idle time before the first keepalive probe.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// Time between unanswered probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// Unanswered probes after which the kernel ends the connection.
pub const KEEPALIVE_PROBES: u32 = 4;

/// Set the session options on a freshly connected or accepted socket. A
/// failure is logged and otherwise ignored: the connection still works, it
/// only notices a vanished peer later.
pub fn configure(tcp: &TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!("TCP_NODELAY not set: {e}");
    }
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka) {
        tracing::warn!("TCP keepalive not set (a vanished peer is noticed late): {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keepalive_and_nodelay_are_set_on_both_ends() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        let (c, (s, _)) = (c.unwrap(), s.unwrap());
        for t in [&c, &s] {
            configure(t);
            let r = socket2::SockRef::from(t);
            assert!(t.nodelay().unwrap());
            assert!(r.keepalive().unwrap());
            assert_eq!(r.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
            assert_eq!(r.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
            assert_eq!(r.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
        }
    }
}
