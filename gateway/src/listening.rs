//! Whether the client listeners are bound. Pingora binds them in its service threads after
//! start-up, retrying an address in use for 30 s and then giving up on that service while the
//! process lives on. So `/ready` answers 503 until every listener is listening, and start-up
//! fails, naming the listener, when one is still not bound after Pingora's retries: for
//! example when another process took its address between the start-up check and the bind.
//!
//! On Linux the process's listening sockets are read from `/proc` (its TCP sockets in the
//! `LISTEN` state whose inodes are among its own descriptors); elsewhere the listeners are
//! taken as bound.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{error, info};

/// How long Pingora's bind may take: it tries an address in use 30 times, a second apart.
pub const BIND_WAIT: Duration = Duration::from_secs(35);
const CHECK_EVERY: Duration = Duration::from_millis(20);

/// Waits until every listener (`(field, address)`) is listening, then sets `bound`; the first
/// listener still unbound after `wait` is the error.
pub async fn watch(
    listeners: &[(String, SocketAddr)],
    bound: &AtomicBool,
    wait: Duration,
) -> Result<(), (String, SocketAddr)> {
    let started = Instant::now();
    loop {
        let unbound = match listening() {
            Some(listening) => listeners.iter().find(|(_, addr)| !listening.contains(addr)),
            None => None,
        };
        let Some((field, addr)) = unbound else {
            bound.store(true, Ordering::Release);
            info!("listeners bound");
            return Ok(());
        };
        if started.elapsed() >= wait {
            return Err((field.clone(), *addr));
        }
        tokio::time::sleep(CHECK_EVERY).await;
    }
}

/// [`watch`] for the process: a listener still unbound after [`BIND_WAIT`] ends it.
pub async fn watch_or_exit(listeners: Vec<(String, SocketAddr)>, bound: Arc<AtomicBool>) {
    if let Err((field, addr)) = watch(&listeners, &bound, BIND_WAIT).await {
        error!(
            %field,
            address = %addr,
            "cannot listen on {addr}: still not bound after {} s (the address is in use)",
            BIND_WAIT.as_secs()
        );
        std::process::exit(1);
    }
}

/// The addresses this process has TCP sockets listening on; `None` where that cannot be told
/// (not Linux, or `/proc` unreadable): then the listeners are taken as bound.
pub fn listening() -> Option<Vec<SocketAddr>> {
    #[cfg(target_os = "linux")]
    {
        let inodes = own_socket_inodes()?;
        let mut addrs = Vec::new();
        let mut read_any = false;
        for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
            // A kernel without IPv6 has no tcp6 table.
            let Ok(text) = std::fs::read_to_string(table) else {
                continue;
            };
            read_any = true;
            addrs.extend(
                text.lines()
                    .skip(1)
                    .filter_map(parse_listening)
                    .filter(|(_, inode)| inodes.contains(inode))
                    .map(|(addr, _)| addr),
            );
        }
        // Without the tables (a sandbox may hide them) nothing can be told.
        read_any.then_some(addrs)
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// The inodes of the sockets among this process's descriptors.
#[cfg(target_os = "linux")]
fn own_socket_inodes() -> Option<std::collections::HashSet<u64>> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    Some(
        entries
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter_map(|target| {
                let target = target.to_str()?;
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse()
                    .ok()
            })
            .collect(),
    )
}

/// One row of `/proc/net/tcp` or `tcp6`: its local address and inode when the socket is
/// listening (state `0A`).
fn parse_listening(row: &str) -> Option<(SocketAddr, u64)> {
    let fields: Vec<&str> = row.split_whitespace().collect();
    // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
    if fields.len() < 10 || fields[3] != "0A" {
        return None;
    }
    let (ip_hex, port_hex) = fields[1].split_once(':')?;
    let port = u16::from_str_radix(port_hex, 16).ok()?;
    let inode = fields[9].parse().ok()?;
    // The address is printed as the 32-bit words of its memory, each in the machine's order.
    let mut bytes = Vec::with_capacity(16);
    for word in ip_hex.as_bytes().chunks(8) {
        let word = u32::from_str_radix(std::str::from_utf8(word).ok()?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip: std::net::IpAddr = match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok()?.into(),
        16 => <[u8; 16]>::try_from(bytes).ok()?.into(),
        _ => return None,
    };
    Some((SocketAddr::new(ip, port), inode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_of_the_kernel_tables() {
        // Rows as a little-endian kernel prints them (the machine's order decides the words).
        let v4 = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 41234 1 0000000000000000 100 0 0 10 0";
        let v6 = "   1: 00000000000000000000000001000000:01BB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 998877 1 0000000000000000 100 0 0 10 0";
        let established = "   2: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 41240 1 0000000000000000 20 4 30 10 -1";
        if cfg!(target_endian = "little") {
            assert_eq!(
                parse_listening(v4),
                Some(("127.0.0.1:8080".parse().unwrap(), 41234))
            );
            assert_eq!(
                parse_listening(v6),
                Some(("[::1]:443".parse().unwrap(), 998877))
            );
        }
        assert_eq!(parse_listening(established), None);
        assert_eq!(
            parse_listening("  sl  local_address rem_address   st"),
            None
        );
        assert_eq!(parse_listening(""), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn finds_its_own_listeners() {
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let v4_addr = v4.local_addr().unwrap();
        let found = listening().unwrap();
        assert!(found.contains(&v4_addr), "{found:?}");
        // A socket of this process that is not listening is not counted.
        let client = std::net::TcpStream::connect(v4_addr).unwrap();
        assert!(!listening().unwrap().contains(&client.local_addr().unwrap()));
        drop(v4);
        assert!(!listening().unwrap().contains(&v4_addr));
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn waits_for_its_own_listener_and_not_another_process() {
        // Another process listens on the address: that is not this one's listener.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut other = std::process::Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import socket,sys,time\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('127.0.0.1',{port}))\ns.listen()\nprint('up',flush=True)\ntime.sleep(30)"
            ))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut up = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(other.stdout.take().unwrap()),
            &mut up,
        )
        .unwrap();
        assert_eq!(up.trim(), "up");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let listeners = vec![("listeners.http.address".to_string(), addr)];
        let bound = AtomicBool::new(false);
        let waited = Instant::now();
        let result = watch(&listeners, &bound, Duration::from_millis(300)).await;
        assert_eq!(result, Err(("listeners.http.address".to_string(), addr)));
        assert!(waited.elapsed() >= Duration::from_millis(300));
        assert!(!bound.load(Ordering::Acquire));
        other.kill().unwrap();
        other.wait().unwrap();

        // This process binds it a moment after the wait began: then the wait ends, bound.
        let binder = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            std::net::TcpListener::bind(addr).unwrap()
        });
        let result = watch(&listeners, &bound, Duration::from_secs(10)).await;
        assert_eq!(result, Ok(()));
        assert!(bound.load(Ordering::Acquire));
        drop(binder.await.unwrap());
    }
}
