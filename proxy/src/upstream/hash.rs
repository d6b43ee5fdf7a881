//! Request hashing for RING_HASH and MAGLEV.
//!
//! Envoy hashes with xxHash64 (seed 0) everywhere: the route's `hash_policy` values and the
//! host keys placed on the ring or in the Maglev table. Using the very same function means a
//! given request maps to the same backend in Sluice as in Envoy for the same endpoint list,
//! which keeps sessions sticky across a migration. The function is small and stable, so it is
//! implemented here rather than pulled in as a dependency.

use std::net::IpAddr;

use http::{HeaderMap, Uri};
use sluice_config::model::HashPolicy;

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

fn read_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn read_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn round(acc: u64, input: u64) -> u64 {
    acc.wrapping_add(input.wrapping_mul(P2)).rotate_left(31).wrapping_mul(P1)
}

fn merge_round(acc: u64, val: u64) -> u64 {
    (acc ^ round(0, val)).wrapping_mul(P1).wrapping_add(P4)
}

/// XXH64 of `data` with `seed` (the reference algorithm, little-endian).
pub fn xxhash64(data: &[u8], seed: u64) -> u64 {
    let len = data.len() as u64;
    let mut rest = data;
    let mut h = if data.len() >= 32 {
        let mut v1 = seed.wrapping_add(P1).wrapping_add(P2);
        let mut v2 = seed.wrapping_add(P2);
        let mut v3 = seed;
        let mut v4 = seed.wrapping_sub(P1);
        while rest.len() >= 32 {
            v1 = round(v1, read_u64(&rest[0..]));
            v2 = round(v2, read_u64(&rest[8..]));
            v3 = round(v3, read_u64(&rest[16..]));
            v4 = round(v4, read_u64(&rest[24..]));
            rest = &rest[32..];
        }
        let mut h = v1
            .rotate_left(1)
            .wrapping_add(v2.rotate_left(7))
            .wrapping_add(v3.rotate_left(12))
            .wrapping_add(v4.rotate_left(18));
        h = merge_round(h, v1);
        h = merge_round(h, v2);
        h = merge_round(h, v3);
        merge_round(h, v4)
    } else {
        seed.wrapping_add(P5)
    };
    h = h.wrapping_add(len);
    while rest.len() >= 8 {
        h ^= round(0, read_u64(rest));
        h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
        rest = &rest[8..];
    }
    if rest.len() >= 4 {
        h ^= u64::from(read_u32(rest)).wrapping_mul(P1);
        h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
        rest = &rest[4..];
    }
    for &b in rest {
        h ^= u64::from(b).wrapping_mul(P5);
        h = h.rotate_left(11).wrapping_mul(P1);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^ (h >> 32)
}

/// The request hash for a route's `hash_policy`, as Envoy computes it, or `None` when no policy
/// produced a value (RING_HASH and MAGLEV then pick a random host).
///
/// - `header`: all values of the header, sorted (so that their order does not matter), hashed
///   as one concatenated string. `:authority` reads the URI authority, else `Host`; `:path`
///   the URI's path and query.
/// - `cookie`: the first cookie with that name; empty values do not count. (Sluice does not
///   generate cookies for a `ttl`.)
/// - `connection_properties.source_ip`: the downstream address as text.
/// - `query_parameter`: the raw (undecoded) value of the first parameter with that name.
///
/// Values of several policies are combined as in Envoy (`rotl(old, 1) ^ new`), and a
/// `terminal` policy that produced a value stops the evaluation.
pub fn hash_key(policies: &[HashPolicy], uri: &Uri, headers: &HeaderMap, source_ip: Option<IpAddr>) -> Option<u64> {
    let mut hash: Option<u64> = None;
    for policy in policies {
        let (value, terminal) = match policy {
            HashPolicy::Header { name, terminal } => (header_hash(name, uri, headers), *terminal),
            HashPolicy::Cookie { name, terminal } => {
                (cookie_value(headers, name).map(|v| xxhash64(v.as_bytes(), 0)), *terminal)
            }
            HashPolicy::SourceIp { terminal } => {
                (source_ip.map(|ip| xxhash64(ip.to_string().as_bytes(), 0)), *terminal)
            }
            HashPolicy::QueryParameter { name, terminal } => {
                (query_value(uri.query(), name).map(|v| xxhash64(v.as_bytes(), 0)), *terminal)
            }
        };
        if let Some(new) = value {
            let old = hash.map_or(0, |h| h.rotate_left(1));
            hash = Some(old ^ new);
        }
        if terminal && hash.is_some() {
            break;
        }
    }
    hash
}

fn header_hash(name: &str, uri: &Uri, headers: &HeaderMap) -> Option<u64> {
    match name {
        ":authority" => {
            let authority = uri
                .authority()
                .map(|a| a.as_str())
                .or_else(|| headers.get(http::header::HOST).and_then(|v| v.to_str().ok()))?;
            return Some(xxhash64(authority.as_bytes(), 0));
        }
        ":path" => {
            let path = uri.path_and_query().map_or("/", |p| p.as_str());
            return Some(xxhash64(path.as_bytes(), 0));
        }
        ":method" => return None,
        _ => {}
    }
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let Some(second) = values.next() else {
        return Some(xxhash64(first.as_bytes(), 0));
    };
    let mut all: Vec<&[u8]> = vec![first.as_bytes(), second.as_bytes()];
    all.extend(values.map(|v| v.as_bytes()));
    all.sort_unstable();
    Some(xxhash64(&all.concat(), 0))
}

/// The value of cookie `name` in the `Cookie` header(s), surrounding quotes removed, as
/// Envoy's `parseCookieValue` does.
fn cookie_value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    for header in headers.get_all(http::header::COOKIE) {
        let Ok(header) = header.to_str() else { continue };
        for pair in header.split(';') {
            let Some((k, v)) = pair.trim_start().split_once('=') else { continue };
            if k == name {
                let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
                if v.is_empty() {
                    return None;
                }
                return Some(v);
            }
        }
    }
    None
}

fn query_value<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn xxhash64_reference_vectors() {
        assert_eq!(xxhash64(b"", 0), 0xEF46_DB37_51D8_E999);
        assert_eq!(xxhash64(b"abc", 0), 0x44BC_2CF5_AD77_0999);
        assert_eq!(xxhash64(b"xxhash", 0), 0x32DD_3895_2C4B_C720);
        assert_eq!(xxhash64(b"xxhash", 20141025), 0xB559_B98D_844E_0635);
        // 39 bytes: exercises the 32-byte stripes, the 8-byte and the 4-byte tails.
        assert_eq!(xxhash64(b"Nobody inspects the spammish repetition", 0), 0xFBCE_A83C_8A37_8BF1);
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn header_policy(name: &str, terminal: bool) -> HashPolicy {
        HashPolicy::Header { name: name.to_string(), terminal }
    }

    #[test]
    fn header_hash_ignores_value_order_and_is_absent_without_header() {
        let uri: Uri = "/".parse().unwrap();
        let p = [header_policy("x-user", false)];
        let a = hash_key(&p, &uri, &headers(&[("x-user", "alice"), ("x-user", "bob")]), None);
        let b = hash_key(&p, &uri, &headers(&[("x-user", "bob"), ("x-user", "alice")]), None);
        assert_eq!(a, b);
        assert_eq!(a, Some(xxhash64(b"alicebob", 0)));
        assert_eq!(hash_key(&p, &uri, &headers(&[("x-user", "alice")]), None), Some(xxhash64(b"alice", 0)));
        assert_eq!(hash_key(&p, &uri, &headers(&[]), None), None);
    }

    #[test]
    fn policies_combine_and_terminal_stops() {
        let uri: Uri = "/p?a=1&user=carol&user=dave".parse().unwrap();
        let h = headers(&[("x-user", "alice")]);
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let header = xxhash64(b"alice", 0);
        let src = xxhash64(b"10.0.0.7", 0);
        let both =
            hash_key(&[header_policy("x-user", false), HashPolicy::SourceIp { terminal: false }], &uri, &h, Some(ip));
        assert_eq!(both, Some(header.rotate_left(1) ^ src));
        let stopped =
            hash_key(&[header_policy("x-user", true), HashPolicy::SourceIp { terminal: false }], &uri, &h, Some(ip));
        assert_eq!(stopped, Some(header));
        // A terminal policy without a value does not stop the evaluation.
        let skipped =
            hash_key(&[header_policy("absent", true), HashPolicy::SourceIp { terminal: false }], &uri, &h, Some(ip));
        assert_eq!(skipped, Some(src));
        let query = hash_key(&[HashPolicy::QueryParameter { name: "user".into(), terminal: false }], &uri, &h, None);
        assert_eq!(query, Some(xxhash64(b"carol", 0)));
    }

    #[test]
    fn cookie_and_pseudo_headers() {
        let uri: Uri = "http://example.com:8080/a/b?x=1".parse().unwrap();
        let h = headers(&[("cookie", "a=1; session=\"xyz\""), ("host", "ignored")]);
        let cookie = hash_key(&[HashPolicy::Cookie { name: "session".into(), terminal: false }], &uri, &h, None);
        assert_eq!(cookie, Some(xxhash64(b"xyz", 0)));
        let missing = hash_key(&[HashPolicy::Cookie { name: "other".into(), terminal: false }], &uri, &h, None);
        assert_eq!(missing, None);
        assert_eq!(
            hash_key(&[header_policy(":authority", false)], &uri, &h, None),
            Some(xxhash64(b"example.com:8080", 0))
        );
        let origin_form: Uri = "/a".parse().unwrap();
        assert_eq!(
            hash_key(&[header_policy(":authority", false)], &origin_form, &h, None),
            Some(xxhash64(b"ignored", 0))
        );
        assert_eq!(hash_key(&[header_policy(":path", false)], &uri, &h, None), Some(xxhash64(b"/a/b?x=1", 0)));
    }
}
