//! The packet asked about: `--from SRC[:PORT] --to DST:PORT[/PROTO]`.

use std::net::{IpAddr, SocketAddr};

use lb_common::proto;

use super::{DEFAULT_SOURCE_PORT, ExplainError};

/// The packet to explain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Query {
    /// Source address and port.
    pub from: SocketAddr,
    /// Destination address and port.
    pub to: SocketAddr,
    /// IP protocol number (`proto::TCP`, `proto::UDP`, `proto::SCTP`).
    pub l4_proto: u8,
    /// Interface the packet arrives on (its index); `None`: loopback.
    pub ifindex: Option<u32>,
}

impl Query {
    /// Reads `--from SRC[:PORT]`, `--to DST:PORT[/tcp|udp|sctp]`.
    ///
    /// # Errors
    /// A bad address, port or protocol, or mixed families: one line saying
    /// which.
    pub fn parse(from: &str, to: &str) -> Result<Self, ExplainError> {
        let bad = |what: String| ExplainError::Argument(what);
        let from = parse_addr(from, Some(DEFAULT_SOURCE_PORT))
            .map_err(|e| bad(format!("--from {from}: {e}")))?;
        let (to_addr, l4) = to.rsplit_once('/').map_or((to, "tcp"), |(a, p)| (a, p));
        let l4_proto = match l4.to_ascii_lowercase().as_str() {
            "tcp" => proto::TCP,
            "udp" => proto::UDP,
            "sctp" => proto::SCTP,
            other => {
                return Err(bad(format!(
                    "--to {to}: unknown protocol {other:?} (tcp, udp or sctp)"
                )));
            }
        };
        let to = parse_addr(to_addr, None).map_err(|e| bad(format!("--to {to}: {e}")))?;
        if from.is_ipv4() != to.is_ipv4() {
            return Err(bad(format!(
                "--from {from} and --to {to} are of different address families"
            )));
        }
        Ok(Self {
            from,
            to,
            l4_proto,
            ifindex: None,
        })
    }
}

/// `ADDR`, `ADDR:PORT`, `[V6]`, `[V6]:PORT`, or a bare IPv6 address.
fn parse_addr(text: &str, default_port: Option<u16>) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err("port 0".into());
        }
        return Ok(addr);
    }
    let bare = text.trim_start_matches('[').trim_end_matches(']');
    match (bare.parse::<IpAddr>(), default_port) {
        (Ok(ip), Some(port)) => Ok(SocketAddr::new(ip, port)),
        (Ok(_), None) => Err("a port is needed (ADDR:PORT, [V6]:PORT)".into()),
        (Err(_), _) => Err("not an address (ADDR[:PORT], [V6]:PORT)".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_parse_or_say_what_is_wrong() {
        let q = Query::parse("10.0.0.2", "172.30.0.41:80").unwrap();
        assert_eq!(q.from, "10.0.0.2:40000".parse().unwrap());
        assert_eq!(q.l4_proto, proto::TCP);
        let q = Query::parse("[fd00::2]:5000", "[fd00:96::10]:53/UDP").unwrap();
        assert_eq!(
            (q.from.port(), q.to.port(), q.l4_proto),
            (5000, 53, proto::UDP)
        );
        let q = Query::parse("fd00::2", "[fd00:96::10]:53/udp").unwrap();
        assert_eq!(q.from.port(), DEFAULT_SOURCE_PORT);
        let q = Query::parse("10.0.0.2", "172.30.0.41:3868/sctp").unwrap();
        assert_eq!(q.l4_proto, proto::SCTP);
        for (from, to, says) in [
            ("10.0.0.2", "172.30.0.41", "a port is needed"),
            ("10.0.0.x", "172.30.0.41:80", "not an address"),
            ("10.0.0.2", "172.30.0.41:80/icmp", "unknown protocol"),
            ("10.0.0.2", "[fd00::1]:80", "different address families"),
            ("10.0.0.2:0", "172.30.0.41:80", "port 0"),
        ] {
            let error = Query::parse(from, to).unwrap_err().to_string();
            assert!(error.contains(says), "{from} {to}: {error}");
            assert!(!error.contains('\n'), "one line: {error}");
        }
    }
}
