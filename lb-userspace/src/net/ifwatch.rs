//! Interface discovery: which interfaces match `--attach-pattern`, now and
//! as they come and go.
//!
//! A `NETLINK_ROUTE` socket subscribed to `RTMGRP_LINK` reports every link
//! created, renamed or deleted in the agent's network namespace. The watcher
//! subscribes first and lists the existing interfaces second, so no interface
//! created in between is missed; if the kernel drops events (socket buffer
//! full), it lists again and reports the difference.

use std::{collections::BTreeMap, io};

use netlink_packet_core::{NetlinkBuffer, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{RouteNetlinkMessage, link::LinkAttribute};
use netlink_sys::{
    AsyncSocket as _, AsyncSocketExt as _, SocketAddr, TokioSocket, protocols::NETLINK_ROUTE,
};
use tokio::sync::mpsc;

/// A change the agent acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// A matching interface exists (at start, created, or renamed to match).
    Added(String),
    /// A matching interface went away (deleted, moved to another namespace,
    /// or renamed).
    Removed(String),
}

/// Interface discovery could not start.
#[derive(Debug, thiserror::Error)]
pub enum IfWatchError {
    /// A pattern is empty or longer than an interface name can be.
    #[error("invalid --attach-pattern {0:?}: expected a glob of 1 to 15 characters")]
    BadPattern(String),
    /// The netlink socket could not be opened or subscribed.
    #[error("cannot subscribe to link events (netlink)")]
    Netlink(#[source] io::Error),
}

/// `--attach-pattern` globs: `*` matches any run of characters, `?` one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Patterns(Vec<String>);

impl Patterns {
    /// Checks and keeps PATTERNS (`IFNAMSIZ` - 1 = 15 characters at most).
    ///
    /// # Errors
    /// An empty or over-long pattern.
    pub fn new(patterns: impl IntoIterator<Item = String>) -> Result<Self, IfWatchError> {
        let patterns: Vec<String> = patterns.into_iter().collect();
        if let Some(bad) = patterns.iter().find(|p| p.is_empty() || p.len() > 15) {
            return Err(IfWatchError::BadPattern(bad.clone()));
        }
        Ok(Self(patterns))
    }

    /// Whether NAME matches any pattern.
    #[must_use]
    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|pattern| glob_match(pattern, name))
    }

    /// The patterns of both.
    #[must_use]
    pub fn union(&self, other: &Self) -> Self {
        let mut all = self.0.clone();
        all.extend(other.0.iter().filter(|p| !self.0.contains(p)).cloned());
        Self(all)
    }

    /// No pattern at all.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Glob matching with `*` (any run, empty included) and `?` (one character).
#[must_use]
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let name: Vec<char> = name.chars().collect();
    let (mut p, mut n) = (0, 0);
    // Where the last `*` was, and how much of NAME it has swallowed so far.
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == '?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((star_p, star_n)) => {
                    p = star_p + 1;
                    n = star_n + 1;
                    star = Some((star_p, star_n + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

/// The interfaces seen so far (index -> name), turning link messages into
/// [`LinkEvent`]s for the matching ones.
#[derive(Debug)]
pub struct Tracker {
    patterns: Patterns,
    known: BTreeMap<u32, String>,
}

impl Tracker {
    /// An empty tracker.
    #[must_use]
    pub fn new(patterns: Patterns) -> Self {
        Self {
            patterns,
            known: BTreeMap::new(),
        }
    }

    /// Interface INDEX is now called NAME.
    pub fn link_up(&mut self, index: u32, name: &str, out: &mut Vec<LinkEvent>) {
        match self.known.get(&index) {
            Some(old) if old == name => return,
            Some(_) => self.link_gone(index, out),
            None => {}
        }
        self.known.insert(index, name.to_owned());
        if self.patterns.matches(name) {
            out.push(LinkEvent::Added(name.to_owned()));
        }
    }

    /// Interface INDEX is gone from this namespace.
    pub fn link_gone(&mut self, index: u32, out: &mut Vec<LinkEvent>) {
        if let Some(old) = self.known.remove(&index)
            && self.patterns.matches(&old)
        {
            out.push(LinkEvent::Removed(old));
        }
    }

    /// Replaces what is known with a full listing, reporting the difference.
    pub fn resync(&mut self, links: &BTreeMap<u32, String>, out: &mut Vec<LinkEvent>) {
        let gone: Vec<u32> = self
            .known
            .keys()
            .filter(|index| !links.contains_key(index))
            .copied()
            .collect();
        for index in gone {
            self.link_gone(index, out);
        }
        for (&index, name) in links {
            self.link_up(index, name, out);
        }
    }
}

/// Starts watching: sends an `Added` for every matching interface that
/// exists now, then an event for each later change, until `tx` is closed.
///
/// # Errors
/// The netlink socket could not be opened (must be called inside a tokio
/// runtime).
pub fn spawn(
    patterns: Patterns,
    tx: mpsc::Sender<LinkEvent>,
) -> Result<tokio::task::JoinHandle<()>, IfWatchError> {
    let socket = subscribe().map_err(IfWatchError::Netlink)?;
    Ok(tokio::spawn(async move {
        if let Err(error) = watch(&socket, Tracker::new(patterns), &tx).await {
            tracing::error!(error = %crate::error::Causes(&error), "interface watcher stopped; new interfaces are not attached");
        }
    }))
}

async fn watch(
    socket: &TokioSocket,
    mut tracker: Tracker,
    tx: &mpsc::Sender<LinkEvent>,
) -> io::Result<()> {
    let mut events = Vec::new();
    tracker.resync(&list_links(), &mut events);
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    loop {
        for event in events.drain(..) {
            if tx.send(event).await.is_err() {
                return Ok(());
            }
        }
        buf.clear();
        let received = tokio::select! {
            () = tx.closed() => return Ok(()),
            received = socket.recv(&mut buf) => received,
        };
        match received {
            Ok(()) => {
                for message in parse_link_messages(&buf) {
                    match message {
                        LinkMessage::New { index, name } => {
                            tracker.link_up(index, &name, &mut events);
                        }
                        LinkMessage::Del { index } => tracker.link_gone(index, &mut events),
                        LinkMessage::Unreadable => {
                            tracing::warn!(
                                "a link event could not be read; listing interfaces again"
                            );
                            tracker.resync(&list_links(), &mut events);
                        }
                    }
                }
            }
            // The kernel dropped events: list again.
            Err(error) if error.raw_os_error() == Some(libc::ENOBUFS) => {
                tracing::warn!("link events were lost; listing interfaces again");
                tracker.resync(&list_links(), &mut events);
            }
            Err(error) => return Err(error),
        }
    }
}

/// A non-blocking `NETLINK_ROUTE` socket subscribed to link events.
fn subscribe() -> io::Result<TokioSocket> {
    let mut socket = TokioSocket::new(NETLINK_ROUTE)?;
    // A larger buffer makes lost events (ENOBUFS) rare when many pods start;
    // best effort, as the resync covers lost events anyway.
    let _ = socket.socket_ref().set_rx_buf_sz(1_usize << 20);
    let groups = u32::try_from(libc::RTMGRP_LINK).unwrap_or_default();
    socket.socket_mut().bind(&SocketAddr::new(0, groups))?;
    Ok(socket)
}

/// Every interface of this namespace, index -> name (`if_nameindex`, which
/// asks the kernel over netlink).
#[must_use]
pub fn list_links() -> BTreeMap<u32, String> {
    nix::net::if_::if_nameindex()
        .map(|interfaces| {
            interfaces
                .iter()
                .map(|interface| {
                    (
                        interface.index(),
                        interface.name().to_string_lossy().into_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A link message, reduced to what the tracker needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkMessage {
    /// `RTM_NEWLINK`: created or changed.
    New {
        /// Interface index.
        index: u32,
        /// Interface name.
        name: String,
    },
    /// `RTM_DELLINK`.
    Del {
        /// Interface index.
        index: u32,
    },
    /// A link message netlink-packet-route could not decode (a kernel
    /// newer than the crate): the interfaces are listed again instead.
    Unreadable,
}

/// Netlink messages start on 4-byte boundaries.
fn align4(len: usize) -> usize {
    (len + 3) & !3
}

/// Parses one datagram of netlink messages; anything not a link message is
/// skipped, and a truncated message ends the datagram.
#[must_use]
pub fn parse_link_messages(buf: &[u8]) -> Vec<LinkMessage> {
    let mut messages = Vec::new();
    let mut at = 0;
    while let Some(rest) = buf.get(at..).filter(|rest| !rest.is_empty()) {
        let Ok(header) = NetlinkBuffer::new_checked(rest) else {
            break;
        };
        let len = header.length() as usize;
        if len == 0 {
            break;
        }
        let kind = header.message_type();
        if kind == libc::RTM_NEWLINK || kind == libc::RTM_DELLINK {
            let decoded = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rest[..len]);
            match decoded.map(|message| message.payload) {
                Ok(NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link))) => {
                    let name = link
                        .attributes
                        .into_iter()
                        .find_map(|attribute| match attribute {
                            LinkAttribute::IfName(name) => Some(name),
                            _ => None,
                        });
                    // Without a name there is nothing to match.
                    if let Some(name) = name {
                        messages.push(LinkMessage::New {
                            index: link.header.index,
                            name,
                        });
                    }
                }
                Ok(NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link))) => {
                    messages.push(LinkMessage::Del {
                        index: link.header.index,
                    });
                }
                _ => messages.push(LinkMessage::Unreadable),
            }
        }
        at += align4(len);
    }
    messages
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn union_matches_what_either_matches_once() {
        let tc = Patterns::new(["h-*".to_owned()]).unwrap();
        let xdp = Patterns::new(["eth0".to_owned(), "h-*".to_owned()]).unwrap();
        let both = tc.union(&xdp);
        assert_eq!(both, Patterns(vec!["h-*".to_owned(), "eth0".to_owned()]));
        assert!(both.matches("h-late") && both.matches("eth0") && !both.matches("eth1"));
    }

    #[test]
    fn globs() {
        for (pattern, name, expected) in [
            ("lxc*", "lxc12ab", true),
            ("lxc*", "lxc", true),
            ("lxc*", "veth0", false),
            ("eth0", "eth0", true),
            ("eth0", "eth01", false),
            ("eth?", "eth1", true),
            ("eth?", "eth", false),
            ("*", "anything", true),
            ("h-*-x", "h-a-b-x", true),
            ("h-*-x", "h-a-b-y", false),
            ("*a*b", "xxaxxb", true),
            ("*a*b", "xxbxxa", false),
            ("c?li*", "cali1234", true),
        ] {
            assert_eq!(glob_match(pattern, name), expected, "{pattern} vs {name}");
        }
    }

    #[test]
    fn patterns_are_checked() {
        assert!(Patterns::new(vec![String::new()]).is_err());
        assert!(Patterns::new(vec!["x".repeat(16)]).is_err());
        let patterns = Patterns::new(vec!["lxc*".into(), "eth0".into()]).expect("valid");
        assert!(patterns.matches("eth0") && patterns.matches("lxcab") && !patterns.matches("lo"));
    }

    fn tracker() -> Tracker {
        Tracker::new(Patterns::new(vec!["h-*".into()]).expect("valid"))
    }

    #[test]
    fn tracker_reports_matching_changes_once() {
        let mut t = tracker();
        let mut out = Vec::new();
        t.link_up(1, "lo", &mut out);
        t.link_up(5, "h-a", &mut out);
        // Flags change: same index and name, nothing new.
        t.link_up(5, "h-a", &mut out);
        assert_eq!(out, vec![LinkEvent::Added("h-a".into())]);
        out.clear();
        // Renamed out of the pattern, then another one renamed into it.
        t.link_up(5, "x-a", &mut out);
        t.link_up(6, "tmp", &mut out);
        t.link_up(6, "h-b", &mut out);
        t.link_gone(6, &mut out);
        t.link_gone(1, &mut out);
        assert_eq!(
            out,
            vec![
                LinkEvent::Removed("h-a".into()),
                LinkEvent::Added("h-b".into()),
                LinkEvent::Removed("h-b".into()),
            ]
        );
    }

    #[test]
    fn resync_reports_the_difference() {
        let mut t = tracker();
        let mut out = Vec::new();
        t.resync(
            &BTreeMap::from([(1, "lo".into()), (2, "h-a".into()), (3, "h-b".into())]),
            &mut out,
        );
        assert_eq!(
            out,
            vec![
                LinkEvent::Added("h-a".into()),
                LinkEvent::Added("h-b".into())
            ]
        );
        out.clear();
        t.resync(
            &BTreeMap::from([(1, "lo".into()), (3, "h-b".into()), (4, "h-c".into())]),
            &mut out,
        );
        assert_eq!(
            out,
            vec![
                LinkEvent::Removed("h-a".into()),
                LinkEvent::Added("h-c".into())
            ]
        );
    }

    const NLMSG_HDR_LEN: usize = 16;
    const IFINFOMSG_LEN: usize = 16;
    const RTA_HDR_LEN: usize = 4;

    /// A netlink message as the kernel writes it, byte by byte.
    fn message(kind: u16, index: u32, name: Option<&str>) -> Vec<u8> {
        let mut body = vec![0u8; IFINFOMSG_LEN];
        body[4..8].copy_from_slice(&index.to_ne_bytes());
        // An attribute before the name, as the kernel sends (IFLA_MTU).
        body.extend_from_slice(&8u16.to_ne_bytes());
        body.extend_from_slice(&4u16.to_ne_bytes());
        body.extend_from_slice(&1500u32.to_ne_bytes());
        if let Some(name) = name {
            let value_len = name.len() + 1;
            body.extend_from_slice(
                &u16::try_from(RTA_HDR_LEN + value_len)
                    .unwrap()
                    .to_ne_bytes(),
            );
            body.extend_from_slice(&libc::IFLA_IFNAME.to_ne_bytes());
            body.extend_from_slice(name.as_bytes());
            body.push(0);
            body.resize(align4(body.len()), 0);
        }
        let mut msg = Vec::new();
        msg.extend_from_slice(
            &u32::try_from(NLMSG_HDR_LEN + body.len())
                .unwrap()
                .to_ne_bytes(),
        );
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&[0u8; 10]);
        msg.extend_from_slice(&body);
        msg
    }

    #[test]
    fn parses_new_and_del_link_messages() {
        let mut datagram = message(libc::RTM_NEWLINK, 7, Some("h-pod1"));
        datagram.extend(message(libc::RTM_DELLINK, 3, Some("h-old")));
        // Another message type and a truncated tail are skipped.
        datagram.extend(message(libc::RTM_NEWADDR, 9, None));
        datagram.extend_from_slice(&[0xff, 0, 0]);
        assert_eq!(
            parse_link_messages(&datagram),
            vec![
                LinkMessage::New {
                    index: 7,
                    name: "h-pod1".into()
                },
                LinkMessage::Del { index: 3 },
            ]
        );
    }

    #[test]
    fn an_undecodable_link_message_asks_for_a_listing() {
        // An RTM_NEWLINK too short for its ifinfomsg.
        let mut datagram = message(libc::RTM_NEWLINK, 7, None);
        datagram.truncate(NLMSG_HDR_LEN + 4);
        datagram[..4].copy_from_slice(&u32::try_from(NLMSG_HDR_LEN + 4).unwrap().to_ne_bytes());
        datagram.extend(message(libc::RTM_DELLINK, 3, None));
        assert_eq!(
            parse_link_messages(&datagram),
            vec![LinkMessage::Unreadable, LinkMessage::Del { index: 3 }]
        );
    }
}
