//! Who may publish and who may listen: the API key, signed uids, the `Origin`
//! allow-list and the client address behind trusted proxies. Pure checks on header
//! values; the server decides when to ask and `Refusal` says what to answer.

use std::fmt;
use std::net::IpAddr;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::hub::FilterError;

type HmacSha256 = Hmac<Sha256>;

/// Why a request or connection was turned away. The labels name the counters in
/// `/stats` and `/metrics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `/send`, `/stats` or `/metrics` without the right `Authorization: Bearer` key.
    ApiKey,
    /// `/ws` without a valid, unexpired token for its uid.
    Token(TokenError),
    /// `/ws` from an `Origin` outside `-origins`.
    Origin,
    /// The client address already holds `-max-per-ip` connections.
    PerIp,
    /// The server holds `-max-connections` connections.
    Capacity,
    /// A type filter over `-max-types` or `-max-type-len`: `400` on `/ws`, close
    /// `1008` on a subscribe op.
    Types(FilterError),
    /// Forwarding headers that name more than one client (`X-Real-IP` lines that
    /// disagree): which one a proxy meant cannot be known.
    Forwarded,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenError {
    Missing(&'static str),
    Malformed(&'static str),
    Expired,
    Invalid,
}

impl Refusal {
    /// The one place refusals map to HTTP statuses.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::ApiKey | Refusal::Token(_) => 401,
            Refusal::Origin => 403,
            Refusal::PerIp => 429,
            Refusal::Capacity => 503,
            Refusal::Types(_) | Refusal::Forwarded => 400,
        }
    }

    /// Every label, in the order of [`Refusal::index`].
    pub const LABELS: [&'static str; 7] = [
        "api_key",
        "token",
        "origin",
        "per_ip",
        "max_connections",
        "types",
        "forwarded",
    ];

    pub fn index(&self) -> usize {
        match self {
            Refusal::ApiKey => 0,
            Refusal::Token(_) => 1,
            Refusal::Origin => 2,
            Refusal::PerIp => 3,
            Refusal::Capacity => 4,
            Refusal::Types(_) => 5,
            Refusal::Forwarded => 6,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::ApiKey => write!(f, "missing or wrong API key (Authorization: Bearer …)"),
            Refusal::Token(TokenError::Missing(what)) => write!(f, "{what} is required"),
            Refusal::Token(TokenError::Malformed(what)) => write!(f, "{what} is malformed"),
            Refusal::Token(TokenError::Expired) => write!(f, "token has expired"),
            Refusal::Token(TokenError::Invalid) => write!(f, "token is not valid for this uid"),
            Refusal::Origin => write!(f, "origin not allowed"),
            Refusal::PerIp => write!(f, "too many connections from this address"),
            Refusal::Capacity => write!(f, "too many connections"),
            Refusal::Types(e) => write!(f, "{e}"),
            Refusal::Forwarded => write!(f, "X-Real-IP given more than once with different values"),
        }
    }
}

impl std::error::Error for Refusal {}

/// Compares without an early exit, so the time taken does not reveal how much of a
/// guessed key was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, x) in a.iter().enumerate() {
        diff |= x ^ b.get(i).copied().unwrap_or(!x);
    }
    diff == 0
}

/// Checks an `Authorization` header against the API key.
pub fn check_api_key(key: &[u8], authorization: Option<&[u8]>) -> Result<(), Refusal> {
    let value = authorization.ok_or(Refusal::ApiKey)?.trim_ascii();
    let (scheme, given) = value.split_at(
        value
            .iter()
            .position(|&b| b == b' ')
            .ok_or(Refusal::ApiKey)?,
    );
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err(Refusal::ApiKey);
    }
    if constant_time_eq(given.trim_ascii(), key) {
        Ok(())
    } else {
        Err(Refusal::ApiKey)
    }
}

/// The token a backend gives a client: lowercase hex HMAC-SHA256 of `uid:expires`.
pub fn sign(secret: &[u8], uid: &str, expires: u64) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(format!("{uid}:{expires}").as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Verifies a `/ws` token. A token is valid while `now < expires`.
pub fn verify_token(
    secret: &[u8],
    uid: Option<&str>,
    expires: Option<&str>,
    token: Option<&str>,
    now: u64,
) -> Result<(), Refusal> {
    let err = |e| Err(Refusal::Token(e));
    let Some(uid) = uid else {
        return err(TokenError::Missing("uid"));
    };
    let Some(expires) = expires else {
        return err(TokenError::Missing("expires"));
    };
    let Some(token) = token else {
        return err(TokenError::Missing("token"));
    };
    let Ok(expires_at) = expires.parse::<u64>() else {
        return err(TokenError::Malformed("expires"));
    };
    let Some(tag) = decode_hex(token) else {
        return err(TokenError::Malformed("token"));
    };
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    // Sign exactly the text the client sent, so `007` and `7` are different tokens.
    mac.update(uid.as_bytes());
    mac.update(b":");
    mac.update(expires.as_bytes());
    // verify_slice compares in constant time.
    if mac.verify_slice(&tag).is_err() {
        return err(TokenError::Invalid);
    }
    if now >= expires_at {
        return err(TokenError::Expired);
    }
    Ok(())
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() != 64 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// Origins compare as ASCII-case-insensitive strings (`https://example.com:8443`).
/// Without an `Origin` header the request is not from a browser page and passes.
pub fn origin_allowed(allowed: &[String], origin: Option<&[u8]>) -> bool {
    match origin {
        None => true,
        Some(o) => allowed
            .iter()
            .any(|a| a.as_bytes().eq_ignore_ascii_case(o.trim_ascii())),
    }
}

/// An address range such as `10.0.0.0/8` or a single address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    pub const fn new_v4(octets: [u8; 4], prefix: u8) -> IpNet {
        let [a, b, c, d] = octets;
        IpNet {
            addr: IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, d)),
            prefix,
        }
    }

    pub const fn new_v6_host(segments: [u16; 8]) -> IpNet {
        let [a, b, c, d, e, f, g, h] = segments;
        IpNet {
            addr: IpAddr::V6(std::net::Ipv6Addr::new(a, b, c, d, e, f, g, h)),
            prefix: 128,
        }
    }

    pub fn parse(s: &str) -> Option<IpNet> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, Some(p.parse::<u8>().ok()?)),
            None => (s.parse::<IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(IpNet { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// IPv4 peers on a dual-stack socket appear as `::ffff:a.b.c.d`; treat them as IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

pub fn is_trusted(trusted: &[IpNet], ip: IpAddr) -> bool {
    trusted.iter().any(|n| n.contains(ip))
}

/// The client's address. Forwarding headers count only when the peer itself is a
/// trusted proxy; `X-Forwarded-For` (all its lines joined, RFC 9110 §5.3) is read
/// from the right, skipping trusted hops, so a client cannot choose its address by
/// sending the header itself, on its own line or not.
pub fn client_ip(
    peer: IpAddr,
    trusted: &[IpNet],
    forwarded_for: Option<&[u8]>,
    real_ip: Option<&[u8]>,
) -> IpAddr {
    let peer = canonical(peer);
    if !is_trusted(trusted, peer) {
        return peer;
    }
    let parse = |b: &[u8]| {
        std::str::from_utf8(b)
            .ok()?
            .trim()
            .parse::<IpAddr>()
            .ok()
            .map(canonical)
    };
    if let Some(list) = forwarded_for {
        let hops: Vec<IpAddr> = list.split(|&b| b == b',').filter_map(parse).collect();
        if let Some(ip) = hops.iter().rev().find(|ip| !is_trusted(trusted, **ip)) {
            return *ip;
        }
        if let Some(first) = hops.first() {
            return *first;
        }
    }
    real_ip.and_then(parse).unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_needs_the_bearer_scheme_and_the_exact_key() {
        assert_eq!(check_api_key(b"k3y", Some(b"Bearer k3y")), Ok(()));
        assert_eq!(check_api_key(b"k3y", Some(b"bearer  k3y ")), Ok(()));
        for bad in [
            &b"Bearer k3"[..],
            b"Bearer k3yy",
            b"Basic k3y",
            b"k3y",
            b"Bearer",
            b"",
        ] {
            assert_eq!(
                check_api_key(b"k3y", Some(bad)),
                Err(Refusal::ApiKey),
                "{bad:?}"
            );
        }
        assert_eq!(check_api_key(b"k3y", None), Err(Refusal::ApiKey));
    }

    #[test]
    fn tokens_bind_uid_and_expiry() {
        let t = sign(b"s", "7", 1000);
        assert_eq!(t.len(), 64);
        let v = |uid, exp, tok: &str, now| verify_token(b"s", Some(uid), Some(exp), Some(tok), now);
        assert_eq!(v("7", "1000", &t, 999), Ok(()));
        assert_eq!(v("7", "1000", &t.to_uppercase(), 999), Ok(()));
        assert_eq!(
            v("7", "1000", &t, 1000),
            Err(Refusal::Token(TokenError::Expired))
        );
        assert_eq!(
            v("8", "1000", &t, 999),
            Err(Refusal::Token(TokenError::Invalid))
        );
        assert_eq!(
            v("7", "1001", &t, 999),
            Err(Refusal::Token(TokenError::Invalid))
        );
        assert_eq!(
            v("7", "01000", &t, 999),
            Err(Refusal::Token(TokenError::Invalid))
        );
        assert_eq!(
            v("7", "soon", &t, 999),
            Err(Refusal::Token(TokenError::Malformed("expires")))
        );
        assert_eq!(
            v("7", "1000", &t[1..], 999),
            Err(Refusal::Token(TokenError::Malformed("token")))
        );
        assert_eq!(
            verify_token(b"other", Some("7"), Some("1000"), Some(&t), 999),
            Err(Refusal::Token(TokenError::Invalid))
        );
        assert_eq!(
            verify_token(b"s", None, Some("1000"), Some(&t), 999),
            Err(Refusal::Token(TokenError::Missing("uid")))
        );
    }

    #[test]
    fn known_hmac_vector() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let mut mac = HmacSha256::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        let hex: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn origins() {
        let list = vec!["https://app.example.com".to_string()];
        assert!(origin_allowed(&list, Some(b"https://APP.example.com")));
        assert!(!origin_allowed(&list, Some(b"https://evil.example.com")));
        assert!(!origin_allowed(&list, Some(b"null")));
        assert!(origin_allowed(&list, None));
    }

    #[test]
    fn nets_and_forwarded_addresses() {
        let trusted = vec![
            IpNet::parse("10.0.0.0/8").unwrap(),
            IpNet::parse("::1").unwrap(),
        ];
        assert!(trusted[0].contains("10.2.3.4".parse().unwrap()));
        assert!(trusted[0].contains("::ffff:10.2.3.4".parse().unwrap()));
        assert!(!trusted[0].contains("11.0.0.1".parse().unwrap()));
        assert!(
            IpNet::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        assert_eq!(IpNet::parse("10.0.0.0/33"), None);
        assert_eq!(IpNet::parse("nope"), None);

        let proxy: IpAddr = "10.0.0.5".parse().unwrap();
        let stranger: IpAddr = "203.0.113.9".parse().unwrap();
        let ip = |peer, xff: Option<&str>, real: Option<&str>| {
            client_ip(
                peer,
                &trusted,
                xff.map(str::as_bytes),
                real.map(str::as_bytes),
            )
            .to_string()
        };
        // A direct client cannot pick its address with the header.
        assert_eq!(ip(stranger, Some("1.1.1.1"), None), "203.0.113.9");
        // Behind the proxy: the rightmost untrusted hop, not a spoofed leftmost one.
        assert_eq!(
            ip(proxy, Some("6.6.6.6, 1.2.3.4, 10.0.0.7"), None),
            "1.2.3.4"
        );
        assert_eq!(ip(proxy, None, Some("5.6.7.8")), "5.6.7.8");
        assert_eq!(ip(proxy, None, None), "10.0.0.5");
        assert_eq!(ip(proxy, Some("junk"), Some("5.6.7.8")), "5.6.7.8");
        // Two lines joined as the proxy appended them: the client's own line is first.
        assert_eq!(
            ip(proxy, Some("10.9.9.9, 203.0.113.5"), None),
            "203.0.113.5"
        );
    }

    #[test]
    fn every_refusal_has_a_status_and_a_label() {
        for r in [
            Refusal::ApiKey,
            Refusal::Token(TokenError::Expired),
            Refusal::Origin,
            Refusal::PerIp,
            Refusal::Capacity,
            Refusal::Types(FilterError::TooMany(64)),
            Refusal::Forwarded,
        ] {
            assert!(matches!(r.status(), 400 | 401 | 403 | 429 | 503));
            assert!(!Refusal::LABELS[r.index()].is_empty());
            assert!(!r.to_string().is_empty());
        }
    }
}
