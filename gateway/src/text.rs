//! Small text writers for the request path and the access-log thread: addresses written into
//! stack buffers without `core::fmt`, which costs more through `Display` (`bench/README.md`).

use std::io::Write;
use std::net::{IpAddr, SocketAddr};

/// Room for any IP address (`ffff:...:255.255.255.255` is 45 bytes).
pub const IP_LEN: usize = 45;
/// Room for any socket address (`[v6]:65535`).
pub const SOCKET_LEN: usize = IP_LEN + 8;

/// Writes `ip` into `buf` and returns the text: digits, dots, colons and hex letters, as bytes
/// (no UTF-8 check needed by any caller). IPv4 digit by digit; IPv6 through `Display`.
pub fn ip(ip: IpAddr, buf: &mut [u8; IP_LEN]) -> &[u8] {
    let n = match ip {
        IpAddr::V4(v4) => write_v4(v4.octets(), buf),
        IpAddr::V6(v6) => {
            let mut cursor = std::io::Cursor::new(&mut buf[..]);
            match write!(cursor, "{v6}") {
                Ok(()) => cursor.position() as usize,
                Err(_) => 0,
            }
        }
    };
    &buf[..n]
}

/// Writes `addr` (`ip:port`, `[ip6]:port`) into `buf` and returns the text, as [`ip`] does.
pub fn socket(addr: SocketAddr, buf: &mut [u8; SOCKET_LEN]) -> &[u8] {
    let n = match addr {
        SocketAddr::V4(v4) => {
            let mut n = write_v4(v4.ip().octets(), buf);
            buf[n] = b':';
            n += 1;
            n + write_u16(v4.port(), &mut buf[n..])
        }
        SocketAddr::V6(v6) => {
            let mut cursor = std::io::Cursor::new(&mut buf[..]);
            match write!(cursor, "{v6}") {
                Ok(()) => cursor.position() as usize,
                Err(_) => 0,
            }
        }
    };
    &buf[..n]
}

fn write_v4(octets: [u8; 4], buf: &mut [u8]) -> usize {
    let mut n = 0;
    for (i, octet) in octets.into_iter().enumerate() {
        if i > 0 {
            buf[n] = b'.';
            n += 1;
        }
        if octet >= 100 {
            buf[n] = b'0' + octet / 100;
            n += 1;
        }
        if octet >= 10 {
            buf[n] = b'0' + octet / 10 % 10;
            n += 1;
        }
        buf[n] = b'0' + octet % 10;
        n += 1;
    }
    n
}

fn write_u16(value: u16, buf: &mut [u8]) -> usize {
    let mut digits = [0u8; 5];
    let mut v = value;
    let mut len = 0;
    loop {
        digits[len] = b'0' + (v % 10) as u8;
        len += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for i in 0..len {
        buf[i] = digits[len - 1 - i];
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_read_as_display_writes_them() {
        for text in [
            "0.0.0.0",
            "1.2.3.4",
            "10.0.10.100",
            "255.255.255.255",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:255.255.255.255",
        ] {
            let addr: IpAddr = text.parse().unwrap();
            assert_eq!(ip(addr, &mut [0; IP_LEN]), addr.to_string().as_bytes());
            for port in [0, 1, 80, 8080, 65535] {
                let sa = SocketAddr::new(addr, port);
                assert_eq!(socket(sa, &mut [0; SOCKET_LEN]), sa.to_string().as_bytes());
            }
        }
    }
}
