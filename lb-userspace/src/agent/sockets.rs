//! Connected UDP sockets of the node whose backend left: destroyed
//! (`sock_diag` `SOCK_DESTROY`), so that the application gets an error and
//! reconnects, and its new `connect()` is load-balanced to a backend that
//! serves. A connected UDP socket never passes the `sendmsg` hook again
//! (the kernel runs it only for datagrams with an address), so it cannot
//! be re-translated at its next datagram; left alone it would keep talking
//! to the backend that left (Cilium's most reported socket-LB bug).
//!
//! Which sockets: the socket programs record every socket they sent to a
//! backend in the socket reverse-translation maps (cookie, backend ->
//! frontend). After a sync that changed backends, an entry whose backend
//! is no longer a serving backend of its frontend names a socket to
//! destroy; `sock_diag` finds it by cookie among this namespace's
//! connected UDP sockets. TCP sockets are left alone: a TCP flow to an
//! endpoint that left ends with a reset, and draining ones go on, as on
//! the TC path.
//!
//! With `--socket-lb=all` pods' sockets are translated too, and
//! `sock_diag` sees only the namespace of its netlink socket: the cookies
//! not found in the agent's namespace are looked for in every other
//! network namespace of the node (`net::netns`: `/run/netns` and
//! `/proc/PID/ns/net`), from a thread that joined it. Chosen over a BPF
//! socket iterator calling the `bpf_sock_destroy` kfunc: an iterator too
//! walks only the namespace it was created in (so it would need the same
//! `setns`), needs kernel 6.5, and would be a new program type to load,
//! pin and upgrade; `sock_diag` works wherever `SOCK_DESTROY` does. The
//! walk happens only after a sync that left a pod socket on a departed
//! backend, and stops once every such socket is found. Socket cookies
//! are unique across namespaces, so another namespace's socket is never
//! taken for one of ours.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, Map, MapData};
use lb_common::{Addr4, Addr6, SockRevNat, SockRevNatKey, backend_flags, map_names};

use crate::{
    error::Causes,
    net::{netns, sockdiag},
    plan::DatapathState,
};

/// One socket reverse-translation entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct SockEntry {
    /// The socket's cookie.
    pub(super) cookie: u64,
    /// The backend it was sent to.
    pub(super) backend: (IpAddr, u16),
    /// The frontend it asked for.
    pub(super) rev_nat_id: u32,
}

/// The cookies of ENTRIES whose backend is no longer a serving backend of
/// their frontend in STATE (removed from the frontend, or no longer
/// serving).
pub(super) fn stale(entries: &[SockEntry], state: &DatapathState) -> BTreeSet<u64> {
    let frontends: BTreeSet<u32> = entries.iter().map(|e| e.rev_nat_id).collect();
    let serving: BTreeSet<(u32, IpAddr, u16)> = state
        .backends
        .values()
        .filter(|b| {
            frontends.contains(&b.key.rev_nat_id) && b.flags & backend_flags::NOT_SERVING == 0
        })
        .map(|b| (b.key.rev_nat_id, b.key.addr, b.key.port))
        .collect();
    entries
        .iter()
        .filter(|e| !serving.contains(&(e.rev_nat_id, e.backend.0, e.backend.1)))
        .map(|e| e.cookie)
        .collect()
}

/// Destroys the node's connected UDP sockets whose backend left.
pub(super) struct Reaper {
    pin_path: PathBuf,
    /// `--socket-lb=all`: pods' namespaces hold translated sockets too.
    pods: bool,
    /// A namespace could not be entered already (warned once).
    warned: std::sync::atomic::AtomicBool,
}

/// What one namespace's pass did.
#[derive(Default)]
struct Pass {
    /// Cookies of the sockets found (destroyed or not).
    found: BTreeSet<u64>,
    destroyed: usize,
}

/// Destroys this thread's namespace's connected UDP sockets whose cookie
/// is in `to_destroy`.
fn destroy_here(to_destroy: &BTreeSet<u64>) -> Pass {
    let mut pass = Pass::default();
    for family in [libc::AF_INET, libc::AF_INET6] {
        let family = u8::try_from(family).unwrap_or_default();
        let sockets = match sockdiag::connected_udp(family) {
            Ok(sockets) => sockets,
            Err(error) => {
                tracing::warn!(%error, "cannot list connected UDP sockets (sock_diag)");
                continue;
            }
        };
        for socket in sockets.iter().filter(|s| to_destroy.contains(&s.cookie)) {
            pass.found.insert(socket.cookie);
            match sockdiag::destroy(socket) {
                Ok(()) => pass.destroyed += 1,
                Err(error) => tracing::warn!(
                    cookie = socket.cookie,
                    peer = ?socket.peer,
                    error = %Causes(&error),
                    "cannot destroy a UDP socket whose backend left"
                ),
            }
        }
    }
    pass
}

impl Reaper {
    pub(super) fn new(pin_path: &Path, pods: bool) -> Self {
        Self {
            pin_path: pin_path.to_owned(),
            pods,
            warned: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Looks for the sockets of LEFT in the node's other namespaces until
    /// all are found; the number destroyed.
    fn destroy_in_pods(&self, mut left: BTreeSet<u64>) -> usize {
        let mut destroyed = 0;
        for ns in netns::others() {
            if left.is_empty() {
                break;
            }
            match netns::run_in(&ns.path, || destroy_here(&left)) {
                Ok(pass) => {
                    destroyed += pass.destroyed;
                    left.retain(|c| !pass.found.contains(c));
                }
                // Gone meanwhile (a process or pod that ended): nothing
                // of it to destroy.
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    tracing::debug!(netns = %ns.path.display(), %error, "cannot enter a network namespace");
                    if !self.warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        tracing::warn!(
                            netns = %ns.path.display(),
                            error = %Causes(&error),
                            "cannot enter a pod network namespace to end its UDP sockets whose \
                             backend left (needs CAP_SYS_ADMIN, CAP_SYS_PTRACE and the host's \
                             PID namespace); such sockets keep their backend"
                        );
                    }
                }
            }
        }
        if !left.is_empty() {
            tracing::debug!(
                sockets = left.len(),
                "sockets whose backend left not found (closed meanwhile)"
            );
        }
        destroyed
    }

    /// After a sync that changed backends (STATE: what the maps now hold).
    pub(super) fn after_backend_change(&self, state: &DatapathState) {
        let mut entries = Vec::new();
        for name in [map_names::SOCK_REVNAT4, map_names::SOCK_REVNAT6] {
            if let Err(error) = self.read(name, &mut entries) {
                tracing::warn!(map = name, %error, "cannot read the socket reverse-translation map");
            }
        }
        if entries.is_empty() {
            return;
        }
        let to_destroy = stale(&entries, state);
        if to_destroy.is_empty() {
            return;
        }
        let here = destroy_here(&to_destroy);
        let mut destroyed = here.destroyed;
        if self.pods {
            let left: BTreeSet<u64> = to_destroy.difference(&here.found).copied().collect();
            if !left.is_empty() {
                destroyed += self.destroy_in_pods(left);
            }
        }
        self.forget(&entries, &to_destroy);
        if destroyed > 0 {
            tracing::info!(
                destroyed,
                "destroyed connected UDP sockets whose backend left"
            );
        }
    }

    fn read(&self, name: &'static str, out: &mut Vec<SockEntry>) -> Result<(), String> {
        let map = open(&self.pin_path.join(name))?;
        if name == map_names::SOCK_REVNAT4 {
            let map: HashMap<_, SockRevNatKey<Addr4>, SockRevNat<Addr4>> =
                HashMap::try_from(map).map_err(|e| e.to_string())?;
            out.extend(map.iter().flatten().map(|(k, v)| SockEntry {
                cookie: u64::from_ne_bytes(k.cookie),
                backend: (IpAddr::from(k.addr), u16::from_be(k.port_be)),
                rev_nat_id: v.rev_nat_id,
            }));
        } else {
            let map: HashMap<_, SockRevNatKey<Addr6>, SockRevNat<Addr6>> =
                HashMap::try_from(map).map_err(|e| e.to_string())?;
            out.extend(map.iter().flatten().map(|(k, v)| SockEntry {
                cookie: u64::from_ne_bytes(k.cookie),
                backend: (IpAddr::from(k.addr), u16::from_be(k.port_be)),
                rev_nat_id: v.rev_nat_id,
            }));
        }
        Ok(())
    }

    /// Removes the entries of the destroyed sockets (a destroyed socket
    /// is disconnected: the release program would not find them).
    fn forget(&self, entries: &[SockEntry], stale: &BTreeSet<u64>) {
        for entry in entries.iter().filter(|e| stale.contains(&e.cookie)) {
            let result =
                match entry.backend.0 {
                    IpAddr::V4(addr) => open(&self.pin_path.join(map_names::SOCK_REVNAT4))
                        .and_then(|m| {
                            let mut map: HashMap<_, SockRevNatKey<Addr4>, SockRevNat<Addr4>> =
                                HashMap::try_from(m).map_err(|e| e.to_string())?;
                            map.remove(&key(entry.cookie, addr.octets(), entry.backend.1))
                                .map_err(|e| e.to_string())
                        }),
                    IpAddr::V6(addr) => open(&self.pin_path.join(map_names::SOCK_REVNAT6))
                        .and_then(|m| {
                            let mut map: HashMap<_, SockRevNatKey<Addr6>, SockRevNat<Addr6>> =
                                HashMap::try_from(m).map_err(|e| e.to_string())?;
                            map.remove(&key(entry.cookie, addr.octets(), entry.backend.1))
                                .map_err(|e| e.to_string())
                        }),
                };
            if let Err(error) = result {
                tracing::debug!(%error, cookie = entry.cookie, "socket entry already gone");
            }
        }
    }
}

fn key<A>(cookie: u64, addr: A, port: u16) -> SockRevNatKey<A> {
    SockRevNatKey {
        cookie: cookie.to_ne_bytes(),
        addr,
        port_be: port.to_be(),
        _pad: 0,
    }
}

fn open(pin: &Path) -> Result<Map, String> {
    let data = MapData::from_pin(pin).map_err(|e| format!("{}: {e}", pin.display()))?;
    Map::from_map_data(data).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use lb_common::backend_flags;

    use super::*;
    use crate::{
        model::Protocol,
        plan::{BackendEntry, BackendKey},
    };

    fn backend(rev_nat_id: u32, last: u8, flags: u8) -> BackendEntry {
        BackendEntry {
            key: BackendKey {
                rev_nat_id,
                addr: IpAddr::V4(Ipv4Addr::new(198, 18, 2, last)),
                port: 8080,
                proto: Protocol::Udp,
            },
            flags,
        }
    }

    fn entry(cookie: u64, rev_nat_id: u32, last: u8) -> SockEntry {
        SockEntry {
            cookie,
            backend: (IpAddr::V4(Ipv4Addr::new(198, 18, 2, last)), 8080),
            rev_nat_id,
        }
    }

    #[test]
    fn sockets_whose_backend_left_its_frontend_or_stopped_serving_are_stale() {
        let mut state = DatapathState::default();
        state.backends.insert(1, backend(7, 2, 0));
        state
            .backends
            .insert(2, backend(7, 3, backend_flags::TERMINATING));
        state.backends.insert(
            3,
            backend(
                7,
                4,
                backend_flags::TERMINATING | backend_flags::NOT_SERVING,
            ),
        );
        // The same endpoint behind another frontend does not keep a
        // socket of frontend 7 alive.
        state.backends.insert(4, backend(9, 5, 0));
        let entries = [
            entry(100, 7, 2), // serving
            entry(101, 7, 3), // terminating but serving: kept, as TC keeps its flows
            entry(102, 7, 4), // not serving
            entry(103, 7, 5), // left frontend 7 (only frontend 9 has it)
            entry(104, 8, 2), // frontend gone
        ];
        assert_eq!(stale(&entries, &state), BTreeSet::from([102, 103, 104]));
    }
}
