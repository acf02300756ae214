//! Backend servers: threads of the test process, each in its pod's
//! namespace, answering every request on TCP and UDP with
//! `NAME PORT PEER` (which backend, which of its ports, and the client
//! address it saw). Dropping them stops and joins every thread (they poll
//! a stop flag every 200 ms).

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use super::netns::enter_netns;
use super::topo::Pod;

/// How long a server blocks before it looks at the stop flag again.
const POLL: Duration = Duration::from_millis(200);

type Ready = mpsc::Sender<Result<(), String>>;

/// TCP and UDP servers on `[::]:PORT` (dual-stack) for every port, in every
/// pod given to `start`.
pub(crate) struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    /// Starts the servers and waits until every one is bound.
    pub(crate) fn start(pods: &[&Pod], ports: &[u16]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut servers = Self {
            stop: Arc::clone(&stop),
            threads: Vec::new(),
        };
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        for pod in pods {
            for &port in ports {
                for udp in [false, true] {
                    let (name, ns, stop, ready) = (
                        pod.name.clone(),
                        pod.ns().to_owned(),
                        Arc::clone(&stop),
                        ready_tx.clone(),
                    );
                    servers.threads.push(std::thread::spawn(move || {
                        enter_netns(&ns);
                        if udp {
                            udp_server(&name, port, &stop, &ready);
                        } else {
                            tcp_server(&name, port, &stop, &ready);
                        }
                    }));
                }
            }
        }
        drop(ready_tx);
        for _ in 0..servers.threads.len() {
            match ready_rx.recv_timeout(Duration::from_secs(5)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => panic!("backend server failed to start: {e}"),
                Err(e) => panic!("backend server did not report readiness: {e}"),
            }
        }
        servers
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                eprintln!("warning: a backend server thread panicked");
            }
        }
    }
}

/// The reply to every request: `NAME PORT PEER`.
fn reply(name: &str, port: u16, peer: SocketAddr) -> String {
    format!("{name} {port} {peer}\n")
}

/// A non-blocking listener on [::]:PORT; READY says whether there is one.
fn listen(name: &str, port: u16, ready: &Ready) -> Option<TcpListener> {
    match TcpListener::bind(("::", port)).and_then(|l| l.set_nonblocking(true).map(|()| l)) {
        Ok(listener) => {
            let _ = ready.send(Ok(()));
            Some(listener)
        }
        Err(e) => {
            let _ = ready.send(Err(format!("{name}: tcp bind [::]:{port}: {e}")));
            None
        }
    }
}

fn tcp_server(name: &str, port: u16, stop: &Arc<AtomicBool>, ready: &Ready) {
    let Some(listener) = listen(name, port, ready) else {
        return;
    };
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let (name, stop) = (name.to_owned(), Arc::clone(stop));
                connections.push(std::thread::spawn(move || {
                    serve_tcp(&name, port, stream, peer, &stop);
                }));
                connections.retain(|c| !c.is_finished());
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => {
                eprintln!("{name}: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    for c in connections {
        let _ = c.join();
    }
}

/// Answers every line with `reply`, keeping the connection open.
fn serve_tcp(name: &str, port: u16, mut stream: TcpStream, peer: SocketAddr, stop: &AtomicBool) {
    if stream.set_nonblocking(false).is_err() || stream.set_read_timeout(Some(POLL)).is_err() {
        return;
    }
    let mut pending = Vec::new();
    let mut chunk = [0_u8; 512];
    while !stop.load(Ordering::SeqCst) {
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => {
                pending.extend_from_slice(&chunk[..n]);
                while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
                    pending.drain(..=pos);
                    if stream
                        .write_all(reply(name, port, peer).as_bytes())
                        .is_err()
                    {
                        return;
                    }
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

fn udp_server(name: &str, port: u16, stop: &AtomicBool, ready: &Ready) {
    let socket = match UdpSocket::bind(("::", port))
        .and_then(|s| s.set_read_timeout(Some(POLL)).map(|()| s))
    {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(format!("{name}: udp bind [::]:{port}: {e}")));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let mut buf = [0_u8; 1500];
    while !stop.load(Ordering::SeqCst) {
        match socket.recv_from(&mut buf) {
            Ok((_, peer)) => {
                let _ = socket.send_to(reply(name, port, peer).as_bytes(), peer);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => {
                eprintln!("{name}: udp recv: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// A TCP server on `[::]:PORT` in a pod's namespace that writes
/// `NAME PORT PEER` to every connection and closes it at once: the server
/// closes first, so the backend holds each connection's tuple in
/// `TIME_WAIT`, as an HTTP server answering `Connection: close` does.
/// Dropping it stops and joins its thread.
pub(crate) struct ClosingServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ClosingServer {
    /// Starts the server in POD's namespace and waits until it is bound.
    pub(crate) fn start(pod: &Pod, port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let (name, ns, flag) = (pod.name.clone(), pod.ns().to_owned(), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            enter_netns(&ns);
            closing_server(&name, port, &flag, &ready_tx);
        });
        let server = Self {
            stop,
            thread: Some(thread),
        };
        match ready_rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => server,
            Ok(Err(e)) => panic!("closing server failed to start: {e}"),
            Err(e) => panic!("closing server did not report readiness: {e}"),
        }
    }
}

impl Drop for ClosingServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            eprintln!("warning: the closing server thread panicked");
        }
    }
}

fn closing_server(name: &str, port: u16, stop: &AtomicBool, ready: &Ready) {
    let Some(listener) = listen(name, port, ready) else {
        return;
    };
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            // Dropped right after the write: the server's FIN goes first.
            Ok((mut stream, peer)) => {
                let _ = stream.write_all(reply(name, port, peer).as_bytes());
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => {
                eprintln!("{name}: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}
