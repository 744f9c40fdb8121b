//! Small value types used by the configuration: durations, sizes, socket addresses, upstream
//! targets.
//! Each parses from a YAML string and rejects bad input with a message that says what was
//! expected; serde-saphyr attaches the file position.

use serde::de::{self, Deserializer};
use serde::Deserialize;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

/// A duration written with a unit: `250ms`, `5s`, `1m`, `2h`. Bare numbers are rejected so that
/// nobody has to guess whether `30` meant seconds or milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Dur(pub Duration);

impl Dur {
    /// A duration of whole seconds.
    pub const fn secs(s: u64) -> Self {
        Dur(Duration::from_secs(s))
    }
    /// A duration of milliseconds.
    pub const fn millis(ms: u64) -> Self {
        Dur(Duration::from_millis(ms))
    }
}

impl FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("duration `{s}` has no unit; write e.g. `5s`, `250ms`, `1m`"))?;
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("duration `{s}` must start with a whole number"))?;
        let ms = match unit {
            "ms" => Some(n),
            "s" => n.checked_mul(1_000),
            "m" => n.checked_mul(60_000),
            "h" => n.checked_mul(3_600_000),
            _ => {
                return Err(format!(
                    "duration `{s}` has unknown unit `{unit}`; use ms, s, m or h"
                ))
            }
        }
        .ok_or_else(|| format!("duration `{s}` is too large"))?;
        Ok(Dur(Duration::from_millis(ms)))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.0.as_millis())
    }
}

/// A size in bytes: a whole number (`65536`) or a number with a unit (`64KiB`, `10MiB`,
/// `1GiB`; `KB`/`MB`/`GB` are powers of 1000).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("size `{s}` must start with a whole number"))?;
        let factor: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            other => {
                return Err(format!(
                    "size `{s}` has unknown unit `{other}`; use B, KiB, MiB, GiB, KB, MB or GB"
                ))
            }
        };
        n.checked_mul(factor)
            .map(ByteSize)
            .ok_or_else(|| format!("size `{s}` is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(ByteSize(n)),
            Raw::Text(s) => s.parse().map_err(de::Error::custom),
        }
    }
}

/// A listening or connecting address, `IP:PORT` (`0.0.0.0:8080`, `[::1]:9901`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Addr(pub SocketAddr);

impl<'de> Deserialize<'de> for Addr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse::<SocketAddr>().map(Addr).map_err(|_| {
            de::Error::custom(format!(
                "`{s}` is not an address of the form IP:PORT (e.g. 0.0.0.0:8080)"
            ))
        })
    }
}

/// An upstream target: `host:port` or `ip:port`, with an optional weight.
///
/// Written either as a plain string (`"user-service:3001"`) or as a map
/// (`{ address: "user-service:3001", weight: 3 }`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    /// Host name or IP literal.
    pub host: String,
    /// Port to connect to.
    pub port: u16,
    /// Relative weight for balancing (1..=100).
    pub weight: u32,
}

impl Target {
    /// The literal IP address if the host is one (no DNS needed).
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }

    fn parse_address(s: &str) -> Result<(String, u16), String> {
        let bad = || format!("target `{s}` must be HOST:PORT (e.g. user-service:3001)");
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, p) = rest.split_once("]:").ok_or_else(bad)?;
            (h, p)
        } else {
            s.rsplit_once(':').ok_or_else(bad)?
        };
        if host.is_empty() || host.contains(':') && host.parse::<IpAddr>().is_err() {
            return Err(bad());
        }
        let valid_name = host.parse::<IpAddr>().is_ok()
            || host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
        if !valid_name {
            return Err(format!("target `{s}`: `{host}` is not a valid host name"));
        }
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("target `{s}`: port must be 1-65535"))?;
        Ok((host.to_ascii_lowercase(), port))
    }
}

impl<'de> Deserialize<'de> for Target {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Plain(String),
            Full(Full),
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Full {
            address: String,
            #[serde(default = "one")]
            weight: u32,
        }
        fn one() -> u32 {
            1
        }
        let (address, weight) = match Raw::deserialize(d)? {
            Raw::Plain(s) => (s, 1),
            Raw::Full(f) => (f.address, f.weight),
        };
        if !(1..=100).contains(&weight) {
            return Err(de::Error::custom(format!(
                "target `{address}`: weight must be 1-100, got {weight}"
            )));
        }
        let (host, port) = Target::parse_address(&address).map_err(de::Error::custom)?;
        Ok(Target { host, port, weight })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_units() {
        assert_eq!("250ms".parse::<Dur>().unwrap(), Dur::millis(250));
        assert_eq!("5s".parse::<Dur>().unwrap(), Dur::secs(5));
        assert_eq!("2m".parse::<Dur>().unwrap(), Dur::secs(120));
        assert_eq!("1h".parse::<Dur>().unwrap(), Dur::secs(3600));
        assert!("30".parse::<Dur>().is_err());
        assert!("5 days".parse::<Dur>().is_err());
        assert!("s".parse::<Dur>().is_err());
        assert!("99999999999999999999h".parse::<Dur>().is_err());
    }

    #[test]
    fn targets_parse_host_and_port() {
        assert_eq!(
            Target::parse_address("User-Service:3001").unwrap(),
            ("user-service".into(), 3001)
        );
        assert_eq!(
            Target::parse_address("[::1]:80").unwrap(),
            ("::1".into(), 80)
        );
        assert!(Target::parse_address("user-service").is_err());
        assert!(Target::parse_address("user-service:0").is_err());
        assert!(Target::parse_address(":80").is_err());
        assert!(Target::parse_address("a b:80").is_err());
    }
}
