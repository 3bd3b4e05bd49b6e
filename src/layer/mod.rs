//! What sits between a stream's socket bytes and its protocol session: the PROXY protocol
//! header a load balancer puts first ([`proxy`]), TLS ([`tls`]), and the greeting
//! template filled in once the peer is known ([`greeting`]).
//!
//! Each is sans-IO, bytes in and bytes out with no socket, clock or thread, so the shared
//! connection core drives them the same way for every model.

pub mod greeting;
pub mod proxy;
pub mod tls;
