//! Small text writers for the request path and the access-log thread: addresses written into
//! stack buffers without `core::fmt`, which costs more through `Display` (`bench/README.md`),
//! and the hex ids the gateway makes, as header values.

use http::HeaderValue;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};

/// Room for any IP address (`ffff:...:255.255.255.255` is 45 bytes).
pub const IP_LEN: usize = 45;
/// Room for any socket address (`[v6]:65535`).
pub const SOCKET_LEN: usize = IP_LEN + 8;

/// An IP address written on the stack, to be moved whole into the one allocation of a `Bytes`
/// that its clones share (`Bytes::from_owner`; a copied slice allocates again when first cloned).
pub struct IpText {
    buf: [u8; IP_LEN],
    len: usize,
}

impl IpText {
    /// `addr` as text.
    pub fn new(addr: IpAddr) -> Self {
        let mut buf = [0; IP_LEN];
        let len = ip(addr, &mut buf).len();
        IpText { buf, len }
    }
}

impl AsRef<[u8]> for IpText {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

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

/// The text of an id the gateway makes (a request id, a `traceparent`): `N` bytes of dashes,
/// over which numbers are written in lower-case hex, most significant digit first. Nothing
/// else can be written, so the text is always a valid header value.
pub struct HexText<const N: usize>([u8; N]);

impl<const N: usize> Default for HexText<N> {
    fn default() -> Self {
        HexText([b'-'; N])
    }
}

impl<const N: usize> HexText<N> {
    /// `v` as 32 digits from `at` (within the text: the offsets are the caller's constants).
    pub fn put_u128(&mut self, at: usize, v: u128) {
        self.put_u64(at, (v >> 64) as u64);
        self.put_u64(at + 16, v as u64);
    }

    /// `v` as 16 digits from `at`.
    pub fn put_u64(&mut self, at: usize, v: u64) {
        self.0[at..at + 8].copy_from_slice(&hex_u32((v >> 32) as u32));
        self.0[at + 8..at + 16].copy_from_slice(&hex_u32(v as u32));
    }

    /// `v` as 2 digits from `at`.
    pub fn put_u8(&mut self, at: usize, v: u8) {
        self.0[at..at + 2].copy_from_slice(&hex_u32(u32::from(v))[6..]);
    }

    /// The text as a header value, in one allocation that its clones share.
    pub fn value(self) -> HeaderValue {
        let text = bytes::Bytes::from_owner(self.0);
        // SAFETY: the text is valid UTF-8, which the call requires: only dashes and hex
        // digits are ever written (visible ASCII, as a header value must be). Unchecked, so
        // the bytes are not read again.
        unsafe { HeaderValue::from_maybe_shared_unchecked(text) }
    }
}

/// `v` as 8 lower-case hex digits, most significant first, worked out eight at a time in one
/// word: each nibble spread to a byte of its own, then `0`-`9` or `a`-`f` added.
fn hex_u32(v: u32) -> [u8; 8] {
    let mut x = u64::from(v);
    x = (x | (x << 16)) & 0x0000_ffff_0000_ffff;
    x = (x | (x << 8)) & 0x00ff_00ff_00ff_00ff;
    x = (x | (x << 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    // 1 in each byte whose nibble is 10 or more, which then goes to 'a' (0x61) not ':' (0x3a).
    let letters = ((x + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
    (x + 0x3030_3030_3030_3030 + letters * 0x27).to_be_bytes()
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
    fn hex_text_is_what_format_writes() {
        for v in [0u32, 9, 10, 0xabcd_ef01, 0x1234_5678, u32::MAX] {
            assert_eq!(hex_u32(v), format!("{v:08x}").as_bytes(), "{v:#x}");
        }
        let mut text = HexText::<55>::default();
        let (a, b) = (
            0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c_u128,
            0xb7ad_6b71_6920_3331_u64,
        );
        text.put_u8(0, 0);
        text.put_u128(3, a);
        text.put_u64(36, b);
        text.put_u8(53, 0xf1);
        let v = text.value();
        assert_eq!(v.as_bytes(), format!("00-{a:032x}-{b:016x}-f1").as_bytes());
        assert!(http::HeaderValue::from_bytes(v.as_bytes()).is_ok());
        assert_eq!(HexText::<3>::default().value().as_bytes(), b"---");
    }

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
            assert_eq!(IpText::new(addr).as_ref(), addr.to_string().as_bytes());
            for port in [0, 1, 80, 8080, 65535] {
                let sa = SocketAddr::new(addr, port);
                assert_eq!(socket(sa, &mut [0; SOCKET_LEN]), sa.to_string().as_bytes());
            }
        }
    }
}
