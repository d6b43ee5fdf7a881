//! Base64 (RFC 4648, standard alphabet, padded) for gRPC-Web's text mode, in pieces.
//!
//! Text-mode bodies arrive and leave in chunks cut at arbitrary places, so both directions keep
//! a little state between chunks instead of buffering a whole body:
//! - [`Decoder`] carries up to three characters of an incomplete 4-character group. Padding
//!   may end any group, not just the last one: clients may send several independently padded
//!   segments back to back, and each group then decodes on its own.
//! - [`SegmentEncoder`] carries up to two bytes of an incomplete 3-byte group until more bytes
//!   or the end of the segment (one gRPC frame) arrive; the segment is then padded, so the
//!   output is the same as encoding each frame in one go.

use bytes::{BufMut, BytesMut};

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Marks bytes outside the alphabet in [`DECODE`].
const INVALID: u8 = 0xff;

const DECODE: [u8; 256] = {
    let mut table = [INVALID; 256];
    let mut i = 0;
    while i < 64 {
        table[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    table
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid base64 character {0:#04x}")]
    InvalidByte(u8),
    #[error("misplaced base64 padding")]
    Padding,
    #[error("base64 text ends inside a 4-character group")]
    Truncated,
}

/// Encodes `input` completely (padded) onto `out`.
pub fn encode_into(input: &[u8], out: &mut BytesMut) {
    out.reserve(input.len().div_ceil(3) * 4);
    let mut groups = input.chunks_exact(3);
    for g in &mut groups {
        out.put_slice(&encode_group(g[0], g[1], g[2]));
    }
    match *groups.remainder() {
        [a] => {
            let e = encode_group(a, 0, 0);
            out.put_slice(&[e[0], e[1], b'=', b'=']);
        }
        [a, b] => {
            let e = encode_group(a, b, 0);
            out.put_slice(&[e[0], e[1], e[2], b'=']);
        }
        _ => {}
    }
}

fn encode_group(a: u8, b: u8, c: u8) -> [u8; 4] {
    let n = (u32::from(a) << 16) | (u32::from(b) << 8) | u32::from(c);
    [
        ALPHABET[(n >> 18) as usize & 63],
        ALPHABET[(n >> 12) as usize & 63],
        ALPHABET[(n >> 6) as usize & 63],
        ALPHABET[n as usize & 63],
    ]
}

/// Encodes one padded segment that arrives in pieces.
#[derive(Debug, Default)]
pub struct SegmentEncoder {
    carry: [u8; 2],
    carried: usize,
}

impl SegmentEncoder {
    /// Encodes every complete 3-byte group of what has arrived so far.
    pub fn push(&mut self, mut input: &[u8], out: &mut BytesMut) {
        if self.carried > 0 {
            let take = (3 - self.carried).min(input.len());
            self.carry_or_emit(&input[..take], out);
            input = &input[take..];
            if self.carried > 0 {
                return;
            }
        }
        let whole = input.len() / 3 * 3;
        encode_into(&input[..whole], out);
        let rest = &input[whole..];
        self.carry[..rest.len()].copy_from_slice(rest);
        self.carried = rest.len();
    }

    /// Appends `bytes` to the carried ones; emits the group once it has three bytes.
    fn carry_or_emit(&mut self, bytes: &[u8], out: &mut BytesMut) {
        let mut group = [0u8; 3];
        group[..self.carried].copy_from_slice(&self.carry[..self.carried]);
        group[self.carried..self.carried + bytes.len()].copy_from_slice(bytes);
        let n = self.carried + bytes.len();
        if n == 3 {
            out.put_slice(&encode_group(group[0], group[1], group[2]));
            self.carried = 0;
        } else {
            self.carry[..n].copy_from_slice(&group[..n]);
            self.carried = n;
        }
    }

    /// Ends the segment: encodes the carried bytes with padding.
    pub fn finish(&mut self, out: &mut BytesMut) {
        encode_into(&self.carry[..self.carried], out);
        self.carried = 0;
    }
}

/// Decodes base64 text that arrives in pieces.
#[derive(Debug, Default)]
pub struct Decoder {
    pending: [u8; 4],
    pending_len: usize,
}

impl Decoder {
    /// Decodes every complete 4-character group of what has arrived so far onto `out`.
    pub fn push(&mut self, mut input: &[u8], out: &mut BytesMut) -> Result<(), DecodeError> {
        out.reserve((self.pending_len + input.len()) / 4 * 3);
        if self.pending_len > 0 {
            let take = (4 - self.pending_len).min(input.len());
            self.pending[self.pending_len..self.pending_len + take].copy_from_slice(&input[..take]);
            self.pending_len += take;
            input = &input[take..];
            if self.pending_len < 4 {
                return Ok(());
            }
            decode_group(self.pending, out)?;
            self.pending_len = 0;
        }
        let mut groups = input.chunks_exact(4);
        for g in &mut groups {
            decode_group([g[0], g[1], g[2], g[3]], out)?;
        }
        let rest = groups.remainder();
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
        Ok(())
    }

    /// Whether no partial group is waiting for more characters.
    pub fn is_empty(&self) -> bool {
        self.pending_len == 0
    }

    /// The text ended: a partial group left over is an error (padding is mandatory).
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.pending_len == 0 { Ok(()) } else { Err(DecodeError::Truncated) }
    }
}

fn decode_group(g: [u8; 4], out: &mut BytesMut) -> Result<(), DecodeError> {
    let value = |c: u8| -> Result<u32, DecodeError> {
        match DECODE[c as usize] {
            INVALID if c == b'=' => Err(DecodeError::Padding),
            INVALID => Err(DecodeError::InvalidByte(c)),
            v => Ok(u32::from(v)),
        }
    };
    let (a, b) = (value(g[0])?, value(g[1])?);
    match (g[2], g[3]) {
        (b'=', b'=') => {
            out.put_u8(((a << 2) | (b >> 4)) as u8);
        }
        (b'=', _) => return Err(DecodeError::Padding),
        (c, b'=') => {
            let n = (a << 18) | (b << 12) | (value(c)? << 6);
            out.put_slice(&[(n >> 16) as u8, (n >> 8) as u8]);
        }
        (c, d) => {
            let n = (a << 18) | (b << 12) | (value(c)? << 6) | value(d)?;
            out.put_slice(&[(n >> 16) as u8, (n >> 8) as u8, n as u8]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(input: &[u8]) -> String {
        let mut out = BytesMut::new();
        encode_into(input, &mut out);
        String::from_utf8(out.to_vec()).unwrap()
    }

    fn decode_pieces(pieces: &[&[u8]]) -> Result<Vec<u8>, DecodeError> {
        let mut d = Decoder::default();
        let mut out = BytesMut::new();
        for p in pieces {
            d.push(p, &mut out)?;
        }
        d.finish()?;
        Ok(out.to_vec())
    }

    #[test]
    fn rfc4648_vectors() {
        let vectors: [(&str, &str); 7] = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, coded) in vectors {
            assert_eq!(encode(plain.as_bytes()), coded);
            assert_eq!(decode_pieces(&[coded.as_bytes()]).unwrap(), plain.as_bytes());
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(decode_pieces(&[encode(&all).as_bytes()]).unwrap(), all);
    }

    #[test]
    fn decodes_across_arbitrary_cuts() {
        let data: Vec<u8> = (0..100u8).map(|i| i.wrapping_mul(37)).collect();
        let text = encode(&data);
        let t = text.as_bytes();
        for cut in 0..t.len() {
            for cut2 in cut..t.len() {
                assert_eq!(decode_pieces(&[&t[..cut], &t[cut..cut2], &t[cut2..]]).unwrap(), data, "{cut} {cut2}");
            }
        }
    }

    #[test]
    fn concatenated_padded_segments() {
        // Two messages encoded separately, as text-mode clients and servers do per frame.
        let text = format!("{}{}", encode(b"ab"), encode(b"cde"));
        assert_eq!(decode_pieces(&[text.as_bytes()]).unwrap(), b"abcde");
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(decode_pieces(&[b"Zm9"]), Err(DecodeError::Truncated));
        assert_eq!(decode_pieces(&[b"Zm9v*A=="]), Err(DecodeError::InvalidByte(b'*')));
        assert_eq!(decode_pieces(&[b"Z==="]), Err(DecodeError::Padding));
        assert_eq!(decode_pieces(&[b"Zm=v"]), Err(DecodeError::Padding));
        assert_eq!(decode_pieces(&[b"Zm9v\nZm9v"]), Err(DecodeError::InvalidByte(b'\n')));
    }

    #[test]
    fn segments_encode_like_one_piece() {
        let data: Vec<u8> = (0..50u8).collect();
        for cut in 0..data.len() {
            for cut2 in cut..data.len() {
                let mut e = SegmentEncoder::default();
                let mut out = BytesMut::new();
                e.push(&data[..cut], &mut out);
                e.push(&data[cut..cut2], &mut out);
                e.push(&data[cut2..], &mut out);
                e.finish(&mut out);
                assert_eq!(std::str::from_utf8(&out).unwrap(), encode(&data), "{cut} {cut2}");
            }
        }
        let mut e = SegmentEncoder::default();
        let mut out = BytesMut::new();
        e.finish(&mut out);
        assert!(out.is_empty());
    }
}
