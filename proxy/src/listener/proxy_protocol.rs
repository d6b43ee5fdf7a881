//! PROXY protocol v1 and v2 (`envoy.filters.listener.proxy_protocol`): the real client and
//! destination addresses, sent by a load balancer in front of Sluice.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

#[derive(Debug, thiserror::Error)]
pub enum ProxyProtocolError {
    #[error("no PROXY protocol header")]
    Missing,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    #[error("timed out reading the PROXY protocol header")]
    Timeout,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Source and destination announced by the header; `None` for `LOCAL`/`UNKNOWN` (health
/// checks from the load balancer itself), where the socket addresses apply.
pub type Addresses = Option<(SocketAddr, SocketAddr)>;

/// Reads the header from the start of `io`. Bytes read past the header are returned for
/// replay.
pub async fn read_header<R: AsyncRead + Unpin>(
    io: &mut R,
    timeout: Duration,
) -> Result<(Addresses, Vec<u8>), ProxyProtocolError> {
    tokio::time::timeout(timeout, read_inner(io)).await.map_err(|_| ProxyProtocolError::Timeout)?
}

async fn read_inner<R: AsyncRead + Unpin>(io: &mut R) -> Result<(Addresses, Vec<u8>), ProxyProtocolError> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    loop {
        if let Some((addrs, used)) = parse(&buf)? {
            return Ok((addrs, buf.split_off(used)));
        }
        if buf.len() > 4096 {
            return Err(ProxyProtocolError::Malformed("header too long"));
        }
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(ProxyProtocolError::Missing);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `Ok(None)`: need more bytes. `Ok(Some((addrs, header_len)))`: parsed.
pub fn parse(buf: &[u8]) -> Result<Option<(Addresses, usize)>, ProxyProtocolError> {
    if buf.len() >= 12 && &buf[..12] == V2_SIG {
        return parse_v2(buf);
    }
    if buf.len() >= 6 && &buf[..6] == b"PROXY " {
        return parse_v1(buf);
    }
    let n = buf.len();
    if (n < 12 && V2_SIG.starts_with(buf)) || (n < 6 && b"PROXY ".starts_with(buf)) {
        return Ok(None);
    }
    Err(ProxyProtocolError::Missing)
}

fn parse_v1(buf: &[u8]) -> Result<Option<(Addresses, usize)>, ProxyProtocolError> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() > 107 {
            return Err(ProxyProtocolError::Malformed("v1 line longer than 107 bytes"));
        }
        return Ok(None);
    };
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| ProxyProtocolError::Malformed("v1 line is not ASCII"))?;
    let parts: Vec<&str> = line.split(' ').collect();
    let addrs = match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => None,
        ["PROXY", proto @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let src: IpAddr = src.parse().map_err(|_| ProxyProtocolError::Malformed("bad source address"))?;
            let dst: IpAddr = dst.parse().map_err(|_| ProxyProtocolError::Malformed("bad destination address"))?;
            if (*proto == "TCP4") != src.is_ipv4() || src.is_ipv4() != dst.is_ipv4() {
                return Err(ProxyProtocolError::Malformed("address family mismatch"));
            }
            let sport: u16 = sport.parse().map_err(|_| ProxyProtocolError::Malformed("bad source port"))?;
            let dport: u16 = dport.parse().map_err(|_| ProxyProtocolError::Malformed("bad destination port"))?;
            Some((SocketAddr::new(src, sport), SocketAddr::new(dst, dport)))
        }
        _ => return Err(ProxyProtocolError::Malformed("v1 line")),
    };
    Ok(Some((addrs, end + 2)))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(Addresses, usize)>, ProxyProtocolError> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(ProxyProtocolError::Malformed("v2 version"));
    }
    let fam = buf[13];
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if buf.len() < 16 + len {
        return Ok(None);
    }
    let body = &buf[16..16 + len];
    let addrs = match (ver_cmd & 0x0f, fam) {
        (0, _) => None, // LOCAL
        (1, 0x11) if body.len() >= 12 => {
            let src = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            let dst = Ipv4Addr::new(body[4], body[5], body[6], body[7]);
            let sp = u16::from_be_bytes([body[8], body[9]]);
            let dp = u16::from_be_bytes([body[10], body[11]]);
            Some((SocketAddr::new(src.into(), sp), SocketAddr::new(dst.into(), dp)))
        }
        (1, 0x21) if body.len() >= 36 => {
            let mut s = [0u8; 16];
            let mut d = [0u8; 16];
            s.copy_from_slice(&body[0..16]);
            d.copy_from_slice(&body[16..32]);
            let sp = u16::from_be_bytes([body[32], body[33]]);
            let dp = u16::from_be_bytes([body[34], body[35]]);
            Some((SocketAddr::new(Ipv6Addr::from(s).into(), sp), SocketAddr::new(Ipv6Addr::from(d).into(), dp)))
        }
        (1, 0x00) => None, // UNSPEC
        (1, _) => return Err(ProxyProtocolError::Malformed("unsupported v2 address family")),
        _ => return Err(ProxyProtocolError::Malformed("v2 command")),
    };
    Ok(Some((addrs, 16 + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1() {
        let (a, n) = parse(b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\nGET").unwrap().unwrap();
        assert_eq!(n, 45);
        let (s, d) = a.unwrap();
        assert_eq!(s, "192.0.2.1:56324".parse().unwrap());
        assert_eq!(d, "198.51.100.1:443".parse().unwrap());
        assert!(parse(b"PROXY TCP4 192.0.2.1").unwrap().is_none());
        assert!(parse(b"GET / HTTP/1.1\r\n").is_err());
        assert!(parse(b"PROXY TCP4 ::1 ::1 1 2\r\n").is_err());
    }

    #[test]
    fn v2() {
        let mut h = V2_SIG.to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0, 12, 10, 0, 0, 1, 10, 0, 0, 2, 0x1f, 0x90, 0x00, 0x50]);
        h.extend_from_slice(b"rest");
        let (a, n) = parse(&h).unwrap().unwrap();
        assert_eq!(n, 28);
        assert_eq!(a.unwrap().0, "10.0.0.1:8080".parse().unwrap());
        assert!(parse(&h[..20]).unwrap().is_none());
    }

    #[tokio::test]
    async fn read_returns_the_rest() {
        let mut input: &[u8] = b"PROXY TCP6 ::1 ::2 1000 2000\r\nhello";
        let (a, rest) = read_header(&mut input, Duration::from_secs(1)).await.unwrap();
        assert_eq!(a.unwrap().1, "[::2]:2000".parse().unwrap());
        assert_eq!(rest, b"hello");
    }
}
