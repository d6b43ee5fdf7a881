//! Reads a TLS ClientHello without consuming it (Envoy's `tls_inspector`): whether the
//! connection is TLS at all, the SNI, and the ALPN list. Filter chains are chosen from these
//! before any handshake, which is what makes SNI routing and TLS passthrough possible.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// What the first bytes of a connection revealed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ClientHello {
    pub tls: bool,
    pub server_name: Option<String>,
    pub alpn: Vec<String>,
}

/// Largest ClientHello we are willing to buffer (several records of post-quantum key shares
/// fit easily).
const MAX_HELLO: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PeekError {
    #[error("timed out waiting for the first bytes")]
    Timeout,
    #[error("connection closed before the ClientHello was complete")]
    Closed,
    #[error("ClientHello larger than {MAX_HELLO} bytes")]
    TooLarge,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads from `io` into `buf` until the ClientHello is complete (or it is clear the
/// connection is not TLS). The bytes stay in `buf`; the caller replays them.
pub async fn peek<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut Vec<u8>,
    timeout: Duration,
) -> Result<ClientHello, PeekError> {
    tokio::time::timeout(timeout, async {
        loop {
            match inspect(buf) {
                Inspect::Done(h) => return Ok(h),
                Inspect::NeedMore => {}
            }
            if buf.len() >= MAX_HELLO {
                return Err(PeekError::TooLarge);
            }
            let mut chunk = [0u8; 4096];
            let n = io.read(&mut chunk).await?;
            if n == 0 {
                if buf.is_empty() {
                    return Err(PeekError::Closed);
                }
                // A short non-TLS request (or a truncated hello): decide with what we have.
                return Ok(match inspect(buf) {
                    Inspect::Done(h) => h,
                    Inspect::NeedMore => ClientHello { tls: buf.first() == Some(&0x16), ..Default::default() },
                });
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .map_err(|_| PeekError::Timeout)?
}

enum Inspect {
    Done(ClientHello),
    NeedMore,
}

fn inspect(buf: &[u8]) -> Inspect {
    if buf.is_empty() {
        return Inspect::NeedMore;
    }
    if buf[0] != 0x16 {
        return Inspect::Done(ClientHello::default());
    }
    if buf.len() >= 3 && buf[1] != 0x03 {
        return Inspect::Done(ClientHello::default());
    }
    // Reassemble the handshake message from consecutive handshake records.
    let mut hs = Vec::new();
    let mut pos = 0;
    loop {
        if buf.len() < pos + 5 {
            return Inspect::NeedMore;
        }
        if buf[pos] != 0x16 {
            return Inspect::Done(ClientHello { tls: true, ..Default::default() });
        }
        let len = usize::from(u16::from_be_bytes([buf[pos + 3], buf[pos + 4]]));
        if buf.len() < pos + 5 + len {
            return Inspect::NeedMore;
        }
        hs.extend_from_slice(&buf[pos + 5..pos + 5 + len]);
        pos += 5 + len;
        if hs.len() >= 4 {
            if hs[0] != 0x01 {
                return Inspect::Done(ClientHello { tls: true, ..Default::default() });
            }
            let body_len = (usize::from(hs[1]) << 16) | (usize::from(hs[2]) << 8) | usize::from(hs[3]);
            if hs.len() >= 4 + body_len {
                return Inspect::Done(parse_client_hello(&hs[4..4 + body_len]));
            }
        }
    }
}

/// Parses the body of a ClientHello handshake message. Malformed input yields what could be
/// read: the connection is still TLS, the handshake itself will fail later.
fn parse_client_hello(b: &[u8]) -> ClientHello {
    let mut out = ClientHello { tls: true, ..Default::default() };
    let mut r = Reader(b);
    let parsed = (|| {
        r.skip(2)?; // legacy_version
        r.skip(32)?; // random
        let sid = r.u8()? as usize;
        r.skip(sid)?;
        let cs = r.u16()? as usize;
        r.skip(cs)?;
        let comp = r.u8()? as usize;
        r.skip(comp)?;
        let ext_len = r.u16()? as usize;
        let mut exts = Reader(r.take(ext_len)?);
        while !exts.0.is_empty() {
            let ty = exts.u16()?;
            let len = exts.u16()? as usize;
            let mut data = Reader(exts.take(len)?);
            match ty {
                0 => {
                    let list_len = data.u16()? as usize;
                    let mut list = Reader(data.take(list_len)?);
                    while !list.0.is_empty() {
                        let kind = list.u8()?;
                        let n = list.u16()? as usize;
                        let name = list.take(n)?;
                        if kind == 0 && out.server_name.is_none() {
                            out.server_name =
                                std::str::from_utf8(name).ok().map(|s| s.trim_end_matches('.').to_ascii_lowercase());
                        }
                    }
                }
                16 => {
                    let list_len = data.u16()? as usize;
                    let mut list = Reader(data.take(list_len)?);
                    while !list.0.is_empty() {
                        let n = list.u8()? as usize;
                        let p = list.take(n)?;
                        out.alpn.push(String::from_utf8_lossy(p).into_owned());
                    }
                }
                _ => {}
            }
        }
        Some(())
    })();
    let _ = parsed;
    out
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as rustls sends it, captured through an in-memory handshake.
    fn rustls_hello(sni: &str, alpn: &[&[u8]]) -> Vec<u8> {
        use std::sync::Arc;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[tokio::test]
    async fn reads_sni_and_alpn_from_a_real_hello() {
        let hello = rustls_hello("Api.Example.com", &[b"h2", b"http/1.1"]);
        // Deliver it in small pieces to exercise reassembly.
        let (mut a, mut b) = tokio::io::duplex(64);
        let h2 = hello.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for c in h2.chunks(7) {
                a.write_all(c).await.unwrap();
            }
        });
        let mut buf = Vec::new();
        let h = peek(&mut b, &mut buf, Duration::from_secs(5)).await.unwrap();
        assert!(h.tls);
        assert_eq!(h.server_name.as_deref(), Some("api.example.com"));
        assert_eq!(h.alpn, vec!["h2", "http/1.1"]);
        assert_eq!(buf, hello, "every byte read is kept for replay");
    }

    #[tokio::test]
    async fn plain_http_is_not_tls() {
        let mut input: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let mut buf = Vec::new();
        let h = peek(&mut input, &mut buf, Duration::from_secs(1)).await.unwrap();
        assert!(!h.tls);
        assert!(buf.starts_with(b"GET"));
    }

    #[tokio::test]
    async fn garbage_after_record_header_is_handled() {
        let mut input: &[u8] = &[0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0xff];
        let mut buf = Vec::new();
        let h = peek(&mut input, &mut buf, Duration::from_secs(1)).await.unwrap();
        assert!(h.tls);
        assert_eq!(h.server_name, None);
    }
}
